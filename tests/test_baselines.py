"""The baselines beside MTOP: P-Tuning v2's deep prompts (baselines/ptuning_v2.py) against attention with
prefix keys and values worked out by hand, its gradients, its passes, and a run through train.py."""

import math
import sys

import pytest
import torch
import torch.nn.functional as F

import electra
from conftest import ROOT, count_encoder_passes, padded_batch, run_args, tiny_encoder
from mtop import PromptConfig

sys.path.insert(0, str(ROOT / "baselines"))
import ptuning_v2  # noqa: E402

TINY_LAYER = dict(vocab_size=64, embedding_size=24, hidden_size=24, num_hidden_layers=1,
                  num_attention_heads=3, intermediate_size=48, max_position_embeddings=32,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def test_prefix_keys_and_values_join_attention_as_worked_by_hand():
    """Layer.forward with a prefix: each head attends to [prefix keys ; the positions' keys] (the prefix
    never masked, padding masked) and averages [prefix values ; values]; then the output projection,
    LayerNorms and feed-forward as without it. The reference is the block written out with einsum; an
    empty prefix gives the layer without one."""
    torch.manual_seed(0)
    config = electra.ElectraConfig(**TINY_LAYER)
    layer = electra.Layer(config).eval()
    B, S, D, H, P = 3, 7, 24, 3, 4
    K = D // H
    x = torch.randn(B, S, D)
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[1, 5:], keep[2, 2:] = False, False
    prefix_k, prefix_v = torch.randn(P, D), torch.randn(P, D)
    with torch.no_grad():
        found = layer(x, keep[:, None, None, :], prefix=(prefix_k, prefix_v))
        W, b = layer.qkv.weight, layer.qkv.bias
        q, k, v = (x @ W[i * D:(i + 1) * D].T + b[i * D:(i + 1) * D] for i in range(3))  # (B, S, D) each
        keys = torch.cat([prefix_k.expand(B, P, D), k], dim=1).view(B, P + S, H, K)
        values = torch.cat([prefix_v.expand(B, P, D), v], dim=1).view(B, P + S, H, K)
        scores = torch.einsum("bshk,bthk->bhst", q.view(B, S, H, K), keys) / math.sqrt(K)
        attend = torch.cat([torch.ones(B, P, dtype=torch.bool), keep], dim=1)  # the prefix: always
        scores = scores.masked_fill(~attend[:, None, None, :], float("-inf"))
        mixed = torch.einsum("bhst,bthk->bshk", scores.softmax(-1), values).reshape(B, S, D)
        h = F.layer_norm(x + mixed @ layer.attn_out.weight.T + layer.attn_out.bias, (D,),
                         layer.attn_norm.weight, layer.attn_norm.bias, config.layer_norm_eps)
        inner = F.gelu(h @ layer.ffn_in.weight.T + layer.ffn_in.bias)
        ffn = inner @ layer.ffn_out.weight.T + layer.ffn_out.bias
        eps = config.layer_norm_eps
        expected = F.layer_norm(h + ffn, (D,), layer.ffn_norm.weight, layer.ffn_norm.bias, eps)
        torch.testing.assert_close(found, expected, atol=1e-5, rtol=1e-5)
        empty = layer(x, keep[:, None, None, :], prefix=(torch.zeros(0, D), torch.zeros(0, D)))
        torch.testing.assert_close(empty, layer(x, keep[:, None, None, :]), atol=1e-6, rtol=1e-6)


def test_ptuning_v2_reads_each_task_in_its_own_pass_and_trains_only_its_prefixes():
    """A step on task a sends gradient to a's deep prompts only (every layer's keys and values); at
    inference the N tasks take N encoder passes, each task's logits those of its own pass."""
    tasks = [("a", 2), ("b", 3), ("c", 1)]
    model = ptuning_v2.PTuningV2(tiny_encoder(), tasks, PromptConfig("separate", task_prompt_len=3))
    assert model.deep_prompts.shape == (3, 2, 2, 3, 32)  # (N, layers, 2, L, D)
    ids, mask, types = padded_batch(64, T=9)
    logits = model(ids, mask, types, active_task="a")
    model.loss(logits, torch.tensor([0, 1, 1]), "a").backward()
    grad = model.deep_prompts.grad
    assert grad[0].abs().sum(dim=(-1, -2)).min() > 0 and torch.all(grad[1:] == 0)
    model.eval()
    passes = count_encoder_passes(model)
    with torch.no_grad():
        every = model(ids, mask, types)
        assert len(passes) == 3
        for name in ("a", "b", "c"):
            torch.testing.assert_close(every[name], model(ids, mask, types, active_task=name)[name])


def test_ptuning_v2_trains_through_train_py(tiny_model, token_cache, tmp_path, capsys):
    """baselines/ptuning_v2.py runs train.py with the deep-prompt model: a few steps, an evaluation and
    best/; without --no-test it refuses (its best/ is not a model --predict loads)."""
    flags = run_args(tiny_model, token_cache, tmp_path / "run", "--tasks", "RTE,STS-B", "--mode", "separate",
                     "--max-steps", "4", "--sampler", "uniform")
    with pytest.raises(SystemExit, match="give --no-test"):
        ptuning_v2.main(flags)
    result = ptuning_v2.main(flags + ["--no-test"])
    assert result["finished"] and (tmp_path / "run" / "best" / "model.safetensors").exists()
    assert "dev at step 4" in capsys.readouterr().out
