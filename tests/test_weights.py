"""electra.py's weights: loud loading (every bad key named), old key names, hub downloads through
huggingface_hub against a local server."""

import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import electra
import glue_data
from conftest import TINY, minilm_folder, padded_batch, publish

# -- electra.py: loud loading ----------------------------------------------------------------------

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
    with pytest.raises(ValueError,
                       match=r"model\.safetensors(.|\n)*missing keys: "
                       r"encoder\.layer\.1\.attention\.self\.key\.bias"):
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

@pytest.mark.parametrize("pickled", [False, True])
def test_hub_download_caches_and_loads(tmp_path, hub, monkeypatch, pickled):
    """A hub name is fetched through huggingface_hub into its cache (a .bin stored as safetensors in
    --cache-dir) and loads; then, offline (HF_HUB_OFFLINE) or with the hub gone, the caches answer alone."""
    import huggingface_hub.constants
    root, url, seen = hub
    torch.manual_seed(0)
    source = electra.Electra(electra.ElectraConfig(**TINY)).eval()
    publish(root, "org/tiny", source, pickled=pickled)
    cache = tmp_path / "cache"
    model = electra.Electra.from_pretrained("org/tiny", cache_dir=cache, hub_url=url).eval()
    folder = electra.resolve_pretrained("org/tiny", cache_dir=cache, hub_url=url)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert (str(folder).startswith(str(cache)) if pickled else str(tmp_path / "hf-cache") in str(folder))
    for a, b in zip(model.state_dict().values(), source.state_dict().values()):
        assert torch.equal(a, b)
    shutil.rmtree(root / "org")  # the hub forgets the repo: only the caches can answer
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    requests = len(seen)
    electra.Electra.from_pretrained("org/tiny", cache_dir=cache, hub_url=url)
    assert len(seen) == requests  # offline: no request at all


def test_hub_models_honour_revision_tokenizer_config_and_token(tmp_path, hub, monkeypatch):
    """--revision picks the weights of a branch; the repo's tokenizer_config.json comes with the model, so
    a cased model's texts keep their case (transformers' BertTokenizer the reference); HF_TOKEN is sent."""
    root, url, seen = hub
    torch.manual_seed(0)
    main, other = (electra.Electra(electra.ElectraConfig(**TINY)) for _ in range(2))
    words = [w for w in (minilm_folder() / "vocab.txt").read_text(encoding="utf-8").split("\n") if w]
    vocab = "\n".join(words[:TINY["vocab_size"] - 3] + ["Paris", "US", "Apple"]) + "\n"
    publish(root, "org/cased", main, vocab=vocab, tokenizer_config={"do_lower_case": False})
    publish(root, "org/cased", other, revision="v2", vocab=vocab, tokenizer_config={"do_lower_case": False})
    monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")
    loaded = electra.Electra.from_pretrained("org/cased", cache_dir=tmp_path, hub_url=url, revision="v2")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), other.state_dict().values()))
    assert any("/resolve/v2/" in path and auth == "Bearer hf_local_test_token" for path, auth in seen)
    folder = electra.resolve_pretrained("org/cased", cache_dir=tmp_path, hub_url=url)
    text = "Apple opened a store in Paris, US."
    reference = transformers.BertTokenizer(str(folder / "vocab.txt"), do_lower_case=False)
    assert glue_data.load_tokenizer(folder).encode(text).ids == reference(text)["input_ids"]


def tiny_bert_config() -> "transformers.BertConfig":
    return transformers.BertConfig(vocab_size=TINY["vocab_size"], hidden_size=TINY["hidden_size"],
                                   num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                   max_position_embeddings=64)


def bert_outputs(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Our encoder's and transformers' BertModel's last hidden states for one padded batch of the folder."""
    ids, mask, types = padded_batch(TINY["vocab_size"])
    ours = electra.Electra.from_pretrained(folder).eval()
    reference = transformers.BertModel.from_pretrained(folder, add_pooling_layer=False).eval()
    with torch.no_grad():
        return ours(ids, mask, types), reference(ids, attention_mask=mask, token_type_ids=types)[0]


def test_layernorm_gamma_and_beta_load_as_weight_and_bias(tmp_path):
    """A BERT checkpoint whose LayerNorms are named gamma/beta (TensorFlow exports) loads as transformers
    loads it (the reference: its outputs); a file naming one parameter twice is refused."""
    torch.manual_seed(0)
    transformers.BertModel(tiny_bert_config(), add_pooling_layer=False).save_pretrained(tmp_path / "new")
    state = load_file(str(tmp_path / "new" / "model.safetensors"))
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in state.items()}
    assert sum(k.endswith(("gamma", "beta")) for k in renamed) == 2 * (1 + 2 * 2)
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    save_file(renamed, str(tmp_path / "old" / "model.safetensors"), metadata={"format": "pt"})
    ours, reference = bert_outputs(tmp_path / "old")
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, bert_outputs(tmp_path / "new")[0], atol=0, rtol=0)
    both = renamed | {"embeddings.LayerNorm.weight": state["embeddings.LayerNorm.weight"].clone()}
    save_file(both, str(tmp_path / "old" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="both name 'embeddings.LayerNorm.weight'; keep one"):
        electra.Electra.from_pretrained(tmp_path / "old")


def test_a_hub_model_with_only_a_tied_masked_lm_bin_downloads_and_loads(tmp_path, hub):
    """A repo that ships only pytorch_model.bin of a BertForMaskedLM (its decoder tied to the word
    embeddings, so two keys share memory) is converted without the keys the encoder never reads and
    loads to transformers' own outputs."""
    root, url, _ = hub
    torch.manual_seed(0)
    masked_lm = transformers.BertForMaskedLM(tiny_bert_config())
    state = masked_lm.state_dict()
    tied = ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight")
    assert state[tied[0]].data_ptr() == state[tied[1]].data_ptr()  # what safetensors refuses to save
    folder = root / "org" / "mlm" / "main"
    folder.mkdir(parents=True)
    masked_lm.config.to_json_file(folder / "config.json")
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    torch.save(state, folder / "pytorch_model.bin")
    cache = tmp_path / "cache"
    downloaded = electra.resolve_pretrained("org/mlm", cache_dir=cache, hub_url=url)
    assert downloaded.parent == cache / "models" and downloaded.name.startswith("org--mlm--")
    assert not any(k.startswith("cls.") for k in load_file(str(downloaded / "model.safetensors")))
    ids, mask, types = padded_batch(TINY["vocab_size"])
    with torch.no_grad():
        ours = electra.Electra.from_pretrained(downloaded).eval()(ids, mask, types)
        reference = masked_lm.eval().bert(ids, attention_mask=mask, token_type_ids=types)[0]
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_failed_download_leaves_nothing_in_the_cache(tmp_path, hub):
    """A repo whose weights are missing fails with the file named and no partial folder left; an unknown
    repo is one OSError too."""
    root, url, _ = hub
    folder = publish(root, "org/broken", electra.Electra(electra.ElectraConfig(**TINY)))
    (folder / "model.safetensors").unlink()
    cache = tmp_path / "cache"
    with pytest.raises(OSError, match=r"org/broken: no pytorch_model\.bin"):
        electra.Electra.from_pretrained("org/broken", cache_dir=cache, hub_url=url)
    assert not (cache / "models").exists() or list((cache / "models").iterdir()) == []
    with pytest.raises(OSError, match="org/absent: config.json could not be fetched"):
        electra.Electra.from_pretrained("org/absent", cache_dir=cache, hub_url=url)
