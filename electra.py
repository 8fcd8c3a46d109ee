"""A from-scratch ELECTRA (and BERT) encoder that loads Hugging Face safetensors checkpoints.

MTOP (Sec. 3.1 of the paper) prepends a pool of soft prompts to the *embedded* text, so the encoder
here takes an optional block of prefix vectors that enters right after the embedding LayerNorm,
before `embeddings_project`, with no position or token-type embedding of its own. Everything else is
the ELECTRA discriminator of Clark et al. (2020), which is BERT's encoder (Devlin et al., 2019):

    x = LayerNorm(word[ids] + position[0..T-1] + token_type[types])      (B, T, E)
    x = [prefix ; x]                                                     (B, P+T, E)
    x = embeddings_project(x)          only when E != D                  (B, P+T, D)
    x = LayerNorm(x + Attention(x)); x = LayerNorm(x + FFN(x))           x num_hidden_layers

Shapes: B batch, T text tokens, P prefix (prompt) vectors, E embedding size, D hidden size,
H attention heads, K = D / H head size.

References: Clark et al., "ELECTRA: Pre-training Text Encoders as Discriminators Rather Than
Generators", ICLR 2020; Devlin et al., "BERT", NAACL 2019. Weight layout: Hugging Face
`config.json` + `model.safetensors` (REFERENCE.md section 4).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

HUB_URL = "https://huggingface.co"
DEFAULT_CACHE = Path.home() / ".cache" / "mtop"


@dataclass
class ElectraConfig:
    """Encoder hyperparameters, with the field names of a Hugging Face `config.json`."""

    vocab_size: int = 30522
    embedding_size: int = 768
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "ElectraConfig":
        """Read an ELECTRA or BERT config; refuse what this encoder does not implement."""
        model_type = raw.get("model_type")
        if model_type not in ("electra", "bert"):
            raise ValueError(f"{source}: model_type {model_type!r} is not supported (use 'electra' or 'bert')")
        # NOTE: "gelu" in Hugging Face configs is the exact erf GELU, not the tanh approximation.
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (only 'gelu')")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{source}: only absolute position embeddings are supported")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        values.setdefault("embedding_size", raw.get("hidden_size", cls.hidden_size))  # BERT: E = D
        config = cls(**values)
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"{source}: hidden_size {config.hidden_size} is not divisible by "
                             f"num_attention_heads {config.num_attention_heads}")
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> "ElectraConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json; a model folder needs config.json "
                                    "next to model.safetensors") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict:
        return {"model_type": "electra", "hidden_act": "gelu", **asdict(self)}


class Layer(nn.Module):
    """One post-LayerNorm Transformer block: attention, then a GELU feed-forward network."""

    def __init__(self, config: ElectraConfig):
        super().__init__()
        D, eps = config.hidden_size, config.layer_norm_eps
        self.num_heads = config.num_attention_heads
        # Query, key and value in one (3D, D) projection: one matrix product instead of three (fewer
        # kernel launches on GPUs). Checkpoints keep them apart; the loader stacks them (hf_name_table).
        self.qkv = nn.Linear(D, 3 * D)
        self.attn_out = nn.Linear(D, D)
        self.attn_norm = nn.LayerNorm(D, eps=eps)
        self.ffn_in = nn.Linear(D, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, D)
        self.ffn_norm = nn.LayerNorm(D, eps=eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.attn_dropout = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, S, D = x.shape
        H = self.num_heads
        # (B, S, D) -> (B, H, S, K): one attention map per head
        q, k, v = self.qkv(x).view(B, S, 3, H, D // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, S, K)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        a = a.transpose(1, 2).reshape(B, S, D)  # (B, S, D)
        # NOTE: post-LayerNorm (BERT/ELECTRA), not the pre-LayerNorm of GPT-2 and later models.
        x = self.attn_norm(x + self.dropout(self.attn_out(a)))
        h = self.ffn_out(F.gelu(self.ffn_in(x)))  # NOTE: exact erf GELU, as in the checkpoints
        return self.ffn_norm(x + self.dropout(h))


class Electra(nn.Module):
    """The encoder: token ids (+ optional prefix vectors) -> last hidden states (B, P+T, D)."""

    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.config = config
        E, D = config.embedding_size, config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, E, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, E)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, E)
        self.embedding_norm = nn.LayerNorm(E, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # NOTE: ELECTRA-small embeds in E = 128 and projects to D = 256; base and BERT have E = D.
        self.embeddings_project = nn.Linear(E, D) if E != D else None
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # BERT's initialisation (normal, std 0.02); only used for models trained from scratch or tests.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embedded text, after LayerNorm and dropout: (B, T) -> (B, T, E)."""
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise ValueError(f"{T} tokens exceed max_position_embeddings={self.config.max_position_embeddings}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(T, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + \
            self.token_type_embeddings(token_type_ids)
        return self.dropout(self.embedding_norm(x))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                prefix: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, attention_mask (1 = token, 0 = padding), token_type_ids: (B, T).

        prefix: (B, P, E) or (P, E) vectors prepended to the embedded text, always attended to.
        They take no position embedding, so the text keeps positions 0..T-1 as in pre-training and
        P is not limited by max_position_embeddings. Returns (B, P+T, D).
        """
        B, T = input_ids.shape
        x = self.embed(input_ids, token_type_ids)  # (B, T, E)
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
        keep = attention_mask.bool()
        if prefix is not None:
            if prefix.dim() == 2:
                prefix = prefix.unsqueeze(0)
            prefix = prefix.to(x.dtype).expand(B, -1, -1)  # (B, P, E)
            x = torch.cat([prefix, x], dim=1)  # (B, P+T, E)
            keep = torch.cat([keep.new_ones(B, prefix.shape[1]), keep], dim=1)  # (B, P+T)
        if self.embeddings_project is not None:
            x = self.embeddings_project(x)  # (B, P+T, D)
        # Without padding, pass no mask: SDPA can then take its fastest kernel.
        mask = None if bool(keep.all()) else keep[:, None, None, :]  # (B, 1, 1, P+T), True = attend
        for layer in self.layers:
            x = layer(x, mask)
        return x

    # -- checkpoints --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path, cache_dir: str | Path | None = None,
                        hub_url: str = HUB_URL) -> "Electra":
        """Load a Hugging Face folder, a `.safetensors` file (config.json beside it) or a hub name."""
        path = resolve_pretrained(path_or_name, cache_dir=cache_dir, hub_url=hub_url)
        folder, weights = (path.parent, path) if path.is_file() else (path, path / "model.safetensors")
        config = ElectraConfig.from_json(folder / "config.json")
        model = cls(config)
        model.load_state_dict(read_checkpoint(weights, config, model.state_dict()))
        return model

    def save_pretrained(self, folder: str | Path) -> None:
        """Write config.json + model.safetensors in Hugging Face's ElectraModel layout."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        tensors = {hf: (state[ours] if part is None else state[ours].chunk(3)[part]).detach().contiguous().cpu()
                   for hf, (ours, part) in hf_name_table(self.config).items()}
        atomic_write(folder / "config.json", lambda p: p.write_text(json.dumps(self.config.to_dict(), indent=2)))
        atomic_write(folder / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))


# -- weight loading: one name table, one list of keys dropped on purpose, one strict check ------

# Hugging Face key prefixes of whole-model wrappers (ElectraForPreTraining, BertForMaskedLM, ...).
WRAPPER_PREFIXES = ("electra.", "bert.")
# Keys that are not part of the encoder and are dropped on purpose: the discriminator and
# classification heads, BERT's pooler and pre-training heads, and the position_ids buffer.
DROPPED = ("discriminator_predictions.", "classifier.", "pooler.", "cls.", "embeddings.position_ids",
           "generator_predictions.", "generator_lm_head.")


def hf_name_table(config: ElectraConfig) -> dict[str, tuple[str, int | None]]:
    """Hugging Face key -> (our key, part): part k of our fused query/key/value tensor, else None."""
    table = {
        "embeddings.word_embeddings.weight": "word_embeddings.weight",
        "embeddings.position_embeddings.weight": "position_embeddings.weight",
        "embeddings.token_type_embeddings.weight": "token_type_embeddings.weight",
        "embeddings.LayerNorm.weight": "embedding_norm.weight",
        "embeddings.LayerNorm.bias": "embedding_norm.bias",
    }
    if config.embedding_size != config.hidden_size:
        table |= {f"embeddings_project.{p}": f"embeddings_project.{p}" for p in ("weight", "bias")}
    table = {hf: (ours, None) for hf, ours in table.items()}
    per_layer = {  # {} is the layer index
        "encoder.layer.{}.attention.self.query": ("layers.{}.qkv", 0),
        "encoder.layer.{}.attention.self.key": ("layers.{}.qkv", 1),
        "encoder.layer.{}.attention.self.value": ("layers.{}.qkv", 2),
        "encoder.layer.{}.attention.output.dense": ("layers.{}.attn_out", None),
        "encoder.layer.{}.attention.output.LayerNorm": ("layers.{}.attn_norm", None),
        "encoder.layer.{}.intermediate.dense": ("layers.{}.ffn_in", None),
        "encoder.layer.{}.output.dense": ("layers.{}.ffn_out", None),
        "encoder.layer.{}.output.LayerNorm": ("layers.{}.ffn_norm", None),
    }
    for i in range(config.num_hidden_layers):
        for hf, (ours, part) in per_layer.items():
            for p in ("weight", "bias"):  # Linear weights are stored (out, in) in both: no transposes
                table[f"{hf.format(i)}.{p}"] = (f"{ours.format(i)}.{p}", part)
    return table


def read_checkpoint(path: Path, config: ElectraConfig,
                    expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read a safetensors checkpoint into our key names; one error names every bad key."""
    try:
        raw = load_file(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no weights file (expected model.safetensors)") from None
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: cannot read safetensors ({err}); the file is truncated or corrupt, "
                         "delete it and download or save it again") from None
    table = hf_name_table(config)
    found, unexpected = {}, []
    for key, tensor in raw.items():
        bare = next((key[len(p):] for p in WRAPPER_PREFIXES if key.startswith(p)), key)
        if bare.startswith(DROPPED):
            continue
        if bare in table:
            found[bare] = tensor
        else:
            unexpected.append(key)
    shape_of = {hf: expected[ours].shape if part is None else expected[ours].chunk(3)[part].shape
                for hf, (ours, part) in table.items()}
    missing = [hf for hf in table if hf not in found]
    bad_shape = [f"{hf} {tuple(t.shape)} != {tuple(shape_of[hf])}"
                 for hf, t in found.items() if t.shape != shape_of[hf]]
    if missing or unexpected or bad_shape:
        problems = [f"missing keys: {', '.join(missing)}" if missing else "",
                    f"unexpected keys: {', '.join(unexpected)}" if unexpected else "",
                    f"wrong shapes: {'; '.join(bad_shape)}" if bad_shape else ""]
        raise ValueError(f"{path} does not match its config.json:\n  " + "\n  ".join(p for p in problems if p))
    state, parts = {}, {}
    for hf, (ours, part) in table.items():
        if part is None:
            state[ours] = found[hf]
        else:
            parts.setdefault(ours, [None] * 3)[part] = found[hf]
    state |= {ours: torch.cat(qkv) for ours, qkv in parts.items()}  # (3D, D): query, key, value
    return state


# -- finding and downloading checkpoints --------------------------------------------------------

HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_pretrained(path_or_name: str | Path, cache_dir: str | Path | None = None,
                       hub_url: str = HUB_URL) -> Path:
    """A local folder or .safetensors file as it is; a hub name -> its folder in the cache."""
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path
    name = str(path_or_name)
    if not HUB_NAME.match(name) or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{name}: no such model folder or file (give a folder with config.json "
                                "and model.safetensors, or a hub name like google/electra-base-discriminator)")
    folder = Path(cache_dir or DEFAULT_CACHE) / "models" / name.replace("/", "--")
    if not (folder / "model.safetensors").exists():
        download_model(name, folder, hub_url)
    return folder


def download_model(name: str, folder: Path, hub_url: str = HUB_URL) -> None:
    """Fetch config.json, the vocabulary and the weights of a hub model into `folder`, atomically.

    Everything goes to a temporary folder beside the target, which is renamed into place only when
    complete, so a failed or killed download leaves nothing half-written in the cache.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", suffix=".part", dir=folder.parent))
    try:
        base = f"{hub_url.rstrip('/')}/{name}/resolve/main"
        fetch(f"{base}/config.json", tmp / "config.json")
        got_vocab = [fetch(f"{base}/{f}", tmp / f, optional=True) for f in ("vocab.txt", "tokenizer.json")]
        if not any(got_vocab):
            raise FileNotFoundError(f"{base}: neither vocab.txt nor tokenizer.json exists")
        if not fetch(f"{base}/model.safetensors", tmp / "model.safetensors", optional=True):
            # Older hub repos only have a pickled state dict: read it safely, store it as safetensors.
            fetch(f"{base}/pytorch_model.bin", tmp / "pytorch_model.bin")
            state = torch.load(tmp / "pytorch_model.bin", map_location="cpu", weights_only=True)
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
            (tmp / "pytorch_model.bin").unlink()
        if folder.exists():  # another process finished first
            shutil.rmtree(tmp)
            return
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fetch(url: str, dest: Path, optional: bool = False) -> bool:
    """Download url -> dest with progress on stderr; False if optional and the server says 404."""
    try:
        response = urllib.request.urlopen(url, timeout=60)
    except urllib.error.HTTPError as err:
        if optional and err.code == 404:
            return False
        raise OSError(f"downloading {url} failed: HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        raise OSError(f"downloading {url} failed: {err.reason} (no network? pass a local folder)") from None
    total = int(response.headers.get("Content-Length") or 0)
    done, step = 0, 1 << 20
    print(f"downloading {url} ({total / 1e6:.1f} MB)", file=sys.stderr, flush=True)
    with response, open(dest, "wb") as out:
        while chunk := response.read(step):
            out.write(chunk)
            done += len(chunk)
            if total > 50 * step and done % (25 * step) < step:
                print(f"  {done / 1e6:.0f}/{total / 1e6:.0f} MB", file=sys.stderr, flush=True)
    if total and done != total:
        raise OSError(f"downloading {url} failed: got {done} of {total} bytes")
    return True


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename tmp_path over `path`: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
