"""A from-scratch ELECTRA (and BERT) encoder that loads Hugging Face safetensors checkpoints.

MTOP (Sec. 3.1 of the paper) prepends a pool of soft prompts to the *embedded* text, so the encoder is
split into its two halves: `embed` (token ids -> embedded text) and `embed_vectors` (prompt vectors
embedded like tokens), then `encode` (the Transformer layers on whatever was embedded). `forward` is
the plain path, with an optional block of prefix vectors joined after the embedding LayerNorm. The
model is the ELECTRA discriminator of Clark et al. (2020), which is BERT's encoder (Devlin et al., 2019):

    x = LayerNorm(word[ids] + position[0..T-1] + token_type[types])      (B, T, E)      embed
    x = [prefix ; x]                                                     (B, P+T, E)
    x = embeddings_project(x)          only when E != D                  (B, P+T, D)    encode
    x = LayerNorm(x + Attention(x)); x = LayerNorm(x + FFN(x))           x num_hidden_layers

Two things here are for speed and change no result: the last layer can compute only the rows a caller
reads (`rows`: MTOP's heads read N*L of the P+T positions), and on CPUs dropout draws its mask two
elements per random word (keep_mask), the largest single cost of a CPU training step before.

Shapes: B batch, T text tokens, P prefix (prompt) vectors, R rows the last layer computes, E embedding
size, D hidden size, H attention heads, K = D / H head size.

References: Clark et al., "ELECTRA: Pre-training Text Encoders as Discriminators Rather Than
Generators", ICLR 2020; Devlin et al., "BERT", NAACL 2019. Weight layout: Hugging Face `config.json` +
`model.safetensors`, key names in hf_name_table.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from huggingface_hub import _CACHED_NO_EXIST, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

from support.files import atomic_write, read_json

DEFAULT_CACHE = Path.home() / ".cache" / "mtop"  # tokenized splits; hub models converted from .bin


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
    def from_dict(cls, raw: dict, source: str = "config") -> ElectraConfig:
        """Read an ELECTRA or BERT config; refuse what this encoder does not implement."""
        model_type = raw.get("model_type")
        if model_type not in ("electra", "bert"):
            raise ValueError(f"{source}: model_type {model_type!r} is not supported (use 'electra' or "
                             "'bert')")
        # NOTE: "gelu" in Hugging Face configs is the exact erf GELU, not the tanh approximation.
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (only 'gelu')")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{source}: only absolute position embeddings are supported")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known and v is not None}  # null: the default
        values.setdefault("embedding_size", raw.get("hidden_size", cls.hidden_size))  # BERT: E = D
        for key, value in values.items():  # a number written as a string, a negative size, NaN ...
            if not _in_range(key, value):
                raise ValueError(f"{source}: {key} must be {_range_text(key)}, got {value!r}")
        config = cls(**values)
        if config.pad_token_id >= config.vocab_size:
            raise ValueError(f"{source}: pad_token_id {config.pad_token_id} is not below vocab_size "
                             f"{config.vocab_size}")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"{source}: hidden_size {config.hidden_size} is not divisible by "
                             f"num_attention_heads {config.num_attention_heads}")
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> ElectraConfig:
        raw = read_json(Path(path), "a model folder needs config.json next to model.safetensors")
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict:
        return {"model_type": "electra", "hidden_act": "gelu", **asdict(self)}


# The largest sizes a config may give: far above any released ELECTRA or BERT (24 layers, hidden 1024),
# low enough that an absurd file is refused before anything is built.
LIMITS = {"num_hidden_layers": 256, "num_attention_heads": 1024, "hidden_size": 65536,
          "embedding_size": 65536, "intermediate_size": 262144, "vocab_size": 10_000_000,
          "max_position_embeddings": 1_000_000, "type_vocab_size": 1024}


FRACTIONS = ("layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob")  # the rest: sizes


def _in_range(key: str, value) -> bool:
    """Sizes: whole numbers from 1 (pad_token_id from 0) to LIMITS (2^31 - 1 without one); the dropout
    probabilities in [0, 1); layer_norm_eps in (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float) if key in FRACTIONS else int):
        return False
    if key in FRACTIONS:
        return 0 < value < 1 if key == "layer_norm_eps" else 0 <= value < 1
    return (0 if key == "pad_token_id" else 1) <= value <= LIMITS.get(key, 2**31 - 1)


def _range_text(key: str) -> str:
    if key in FRACTIONS:
        return "a number above 0 and below 1" if key == "layer_norm_eps" else "a number from 0 to below 1"
    return f"a whole number from {0 if key == 'pad_token_id' else 1} to {LIMITS.get(key, 2**31 - 1)}"


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """Bernoulli(1 - p) draws, True = keep, independent per element: a bool tensor of `shape`.

    On a CPU, torch's own dropout calls bernoulli_, which draws one number from the mt19937 generator
    per element; it was the largest single cost of a training step (about half of MTOP's forward in
    bf16). Here each 64-bit word of that same generator gives two draws: its low 32 bits, uniform on
    [0, 2^32), and its high 31 bits (random_ on int64 is uniform on [0, 2^63)). An element is dropped
    when its draw is below round(p * 2^32), resp. round(p * 2^31): P(drop) = p to within 2^-32.
    The generator is torch's, so torch.manual_seed and torch.get_rng_state cover it as before.
    """
    n = math.prod(shape)
    words = torch.empty((n + 1) // 2, dtype=torch.int64, device=device).random_()  # (ceil(n/2),)
    halves = words.view(torch.int32).view(-1, 2)  # (ceil(n/2), 2): each word's two halves
    low, high = (0, 1) if sys.byteorder == "little" else (1, 0)
    keep = torch.empty(halves.shape, dtype=torch.bool, device=device)
    # the low half read as int32 is uniform on [-2^31, 2^31), the high half on [0, 2^31); two strided
    # comparisons are twice as fast as one against a broadcast pair of thresholds
    torch.ge(halves[:, low], -2**31 + round(p * 2**32), out=keep[:, low])
    torch.ge(halves[:, high], round(p * 2**31), out=keep[:, high])
    return keep.view(-1)[:n].view(shape)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout, as F.dropout: zero each element with probability p, scale the rest by 1/(1-p).
    CPUs take the faster mask of keep_mask; other devices keep torch's kernel."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    return x * keep_mask(x.shape, p, x.device) * (1 / (1 - p))  # a product by a bool mask beats masked_fill


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              p: float, training: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(K) + mask) v with dropout p on the probabilities: (B, H, R, K) from
    q (B, H, R, K), k and v (B, H, S, K); mask (B, 1, 1, S), True = attend."""
    if not training or p == 0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p if training else 0.0)
    # CPU training: SDPA's dropout falls back to its unfused path and torch's bernoulli_; the same
    # computation written out uses the faster mask (and no extra copies of the probabilities).
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, R, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype)  # fp32 softmax, as SDPA under autocast
    probs = probs * keep_mask(probs.shape, p, probs.device)
    return (probs @ v) * (1 / (1 - p))  # the dropout scale, applied to the (R, K) output: fewer elements


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
        self.hidden_dropout = config.hidden_dropout_prob
        self.attn_dropout = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rows: slice | None = None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, S, D) -> (B, S, D); with `rows`, only those positions' outputs (B, R, D): every
        position is still attended to, but queries, the feed-forward network and the norms run on
        R rows instead of S (the last layer, where only the rows the heads read are needed).
        prefix: keys and values (P, D) each, attended to before the S positions and always kept: a hook
        for deep prompts (baselines/ptuning_v2.py); MTOP's prompts enter as input vectors instead."""
        B, S, D = x.shape
        H = self.num_heads
        if rows is None:
            # (B, S, D) -> (B, H, S, K): one attention map per head
            q, k, v = self.qkv(x).view(B, S, 3, H, D // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, S, K)
        else:
            x_all, x = x, x[:, rows]  # (B, S, D), (B, R, D)
            weight, bias = self.qkv.weight, self.qkv.bias  # rows 0..D-1 are the query projection
            q = F.linear(x, weight[:D], bias[:D]).view(B, -1, H, D // H).transpose(1, 2)  # (B, H, R, K)
            k, v = F.linear(x_all, weight[D:], bias[D:]).view(B, S, 2, H, D // H).permute(2, 0, 3, 1, 4)
        if prefix is not None:
            P = prefix[0].shape[0]
            pk, pv = (p.to(k.dtype).view(1, P, H, D // H).transpose(1, 2) for p in prefix)  # (1, H, P, K)
            k = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2)  # (B, H, P+S, K)
            v = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)
            if mask is not None:
                mask = torch.cat([mask.new_ones(B, 1, 1, P), mask], dim=-1)  # (B, 1, 1, P+S)
        a = attention(q, k, v, mask, self.attn_dropout, self.training)  # (B, H, R, K)
        a = a.transpose(1, 2).reshape(B, -1, D)  # (B, R, D)
        # NOTE: post-LayerNorm (BERT/ELECTRA), not the pre-LayerNorm of GPT-2 and later models.
        x = self.attn_norm(x + dropout(self.attn_out(a), self.hidden_dropout, self.training))
        h = self.ffn_out(F.gelu(self.ffn_in(x)))  # NOTE: exact erf GELU, as in the checkpoints
        return self.ffn_norm(x + dropout(h, self.hidden_dropout, self.training))


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

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
              first_position: int = 0) -> torch.Tensor:
        """Embedded text, after LayerNorm and dropout: (B, T) -> (B, T, E). The text takes positions
        first_position .. first_position+T-1 (0 unless prompts take the first positions)."""
        T = input_ids.shape[1]
        if first_position + T > self.config.max_position_embeddings:
            raise ValueError(f"{first_position + T} positions exceed max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(first_position, first_position + T, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + \
            self.token_type_embeddings(token_type_ids)
        return dropout(self.embedding_norm(x), self.config.hidden_dropout_prob, self.training)

    def embed_vectors(self, vectors: torch.Tensor, with_positions: bool = False) -> torch.Tensor:
        """Vectors that stand in for word embeddings (soft prompts), embedded as tokens of segment 0
        are: + token-type embedding (+ positions 0..P-1 if with_positions), LayerNorm, dropout.
        (B, P, E) -> (B, P, E)."""
        x = vectors + self.token_type_embeddings.weight[0]
        if with_positions:
            P = vectors.shape[-2]
            if P > self.config.max_position_embeddings:
                raise ValueError(f"{P} prompt positions exceed max_position_embeddings="
                                 f"{self.config.max_position_embeddings}")
            x = x + self.position_embeddings.weight[:P]
        return dropout(self.embedding_norm(x), self.config.hidden_dropout_prob, self.training)

    def encode(self, x: torch.Tensor, keep: torch.Tensor, rows: slice | None = None,
               prefixes: torch.Tensor | None = None) -> torch.Tensor:
        """The Transformer layers on embedded input x (B, S, E); keep (B, S) bool, True = a real
        position. Returns (B, S, D), or (B, R, D) with `rows`: the last layer computes only the
        outputs of those positions (the rest would be thrown away). prefixes: (layers, 2, P, D), each
        layer's prefix keys and values (Layer.forward), or None."""
        if self.embeddings_project is not None:
            x = self.embeddings_project(x)  # (B, S, D)
        # Without padding, pass no mask: SDPA can then take its fastest kernel.
        mask = None if bool(keep.all()) else keep[:, None, None, :]  # (B, 1, 1, S), True = attend
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, rows if i == len(self.layers) - 1 else None,
                      None if prefixes is None else (prefixes[i, 0], prefixes[i, 1]))
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, prefix: torch.Tensor | None = None,
                rows: slice | None = None) -> torch.Tensor:
        """input_ids, attention_mask (1 = token, 0 = padding), token_type_ids: (B, T).

        prefix: (B, P, E) or (P, E) vectors prepended to the embedded text (after its LayerNorm and
        dropout), always attended to. They take no position embedding, so the text keeps positions
        0..T-1 as in pre-training and P is not limited by max_position_embeddings. Returns
        (B, P+T, D), or (B, R, D) for the positions in `rows` (see encode).
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
        return self.encode(x, keep, rows)

    # -- checkpoints --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path, cache_dir: str | Path | None = None,
                        hub_url: str | None = None, revision: str | None = None) -> Electra:
        """Load a Hugging Face folder, a `.safetensors` file (config.json beside it) or a hub name (at
        `revision`, from `hub_url` instead of HF_ENDPOINT or huggingface.co)."""
        path = resolve_pretrained(path_or_name, cache_dir=cache_dir, hub_url=hub_url, revision=revision)
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
        tensors = {hf: (state[ours] if part is None
                        else state[ours].chunk(3)[part]).detach().contiguous().cpu()
                   for hf, (ours, part) in hf_name_table(self.config).items()}
        atomic_write(folder / "config.json", lambda p: p.write_text(json.dumps(self.config.to_dict(),
                                                                               indent=2)))
        atomic_write(folder / "model.safetensors", lambda p: save_file(tensors, str(p),
                                                                       metadata={"format": "pt"}))


# -- weight loading: one name table, one list of keys dropped on purpose, one strict check ------

# Hugging Face key prefixes of whole-model wrappers (ElectraForPreTraining, BertForMaskedLM, ...).
WRAPPER_PREFIXES = ("electra.", "bert.")
# Keys that are not part of the encoder and are dropped on purpose: the discriminator and
# classification heads, BERT's pooler and pre-training heads, and the position_ids buffer.
DROPPED = ("discriminator_predictions.", "classifier.", "pooler.", "cls.", "embeddings.position_ids",
           "generator_predictions.", "generator_lm_head.")
# Older names of the table's keys, read as today's: BERT checkpoints exported from TensorFlow name a
# LayerNorm's scale and shift gamma and beta (transformers maps them on load too).
OLD_NAMES = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"}


def current_name(key: str) -> str:
    """A checkpoint key as the name table spells it: the wrapper prefix dropped, an old name renamed."""
    bare = next((key[len(p):] for p in WRAPPER_PREFIXES if key.startswith(p)), key)
    old = next((o for o in OLD_NAMES if bare.endswith(o)), None)
    return bare[:-len(old)] + OLD_NAMES[old] if old else bare


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
    found, source, unexpected = {}, {}, []
    for key, tensor in raw.items():
        bare = current_name(key)
        if bare.startswith(DROPPED):
            continue
        if bare in found:  # e.g. both LayerNorm.gamma and LayerNorm.weight: which one is meant?
            raise ValueError(f"{path}: keys {source[bare]!r} and {key!r} both name {bare!r}; keep one")
        if bare in table:
            found[bare], source[bare] = tensor, key
        else:
            unexpected.append(key)
    shape_of = {hf: expected[ours].shape if part is None else expected[ours].chunk(3)[part].shape
                for hf, (ours, part) in table.items()}
    check_keys(path, "its config.json", {k: t.shape for k, t in found.items()}, shape_of, unexpected)
    state, parts = {}, {}
    for hf, (ours, part) in table.items():
        if part is None:
            state[ours] = found[hf]
        else:
            parts.setdefault(ours, [None] * 3)[part] = found[hf]
    state |= {ours: torch.cat(qkv) for ours, qkv in parts.items()}  # (3D, D): query, key, value
    return state


def check_keys(path: Path, against: str, found: dict[str, torch.Size], expected: dict[str, torch.Size],
               unexpected: list[str] = ()) -> None:
    """One error that names the missing, unexpected and mis-shaped keys of a weights file (the first 20 of
    each, and how many), or nothing."""
    missing = [k for k in expected if k not in found]
    unexpected = list(unexpected) + [k for k in found if k not in expected]
    bad_shape = [f"{k} {tuple(found[k])} != {tuple(shape)}" for k, shape in expected.items()
                 if k in found and found[k] != shape]

    def listed(items: list[str], sep: str = ", ") -> str:  # at most 20 named: a message stays readable
        return sep.join(items[:20]) + (f"{sep}... ({len(items)} in all)" if len(items) > 20 else "")
    if missing or unexpected or bad_shape:
        problems = [f"missing keys: {listed(missing)}" if missing else "",
                    f"unexpected keys: {listed(unexpected)}" if unexpected else "",
                    f"wrong shapes: {listed(bad_shape, '; ')}" if bad_shape else ""]
        raise ValueError(f"{path} does not match {against}:\n  " + "\n  ".join(p for p in problems if p))


# -- finding and downloading checkpoints --------------------------------------------------------

HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_pretrained(path_or_name: str | Path, cache_dir: str | Path | None = None,
                       hub_url: str | None = None, revision: str | None = None) -> Path:
    """A local folder or .safetensors file as it is; a hub name -> a folder of its files (download_model)."""
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path
    name = str(path_or_name)
    if not HUB_NAME.match(name) or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{name}: no such model folder or file (give a folder with config.json "
                                "and model.safetensors, or a hub name like "
                                "google/electra-base-discriminator)")
    return download_model(name, Path(cache_dir or DEFAULT_CACHE), hub_url, revision)


def download_model(name: str, cache_dir: Path, hub_url: str | None = None,
                   revision: str | None = None) -> Path:
    """A hub model's folder, through huggingface_hub (its cache, HF_HOME, HF_HUB_OFFLINE, HF_ENDPOINT or
    `hub_url`, HF_TOKEN): config.json, vocab.txt or tokenizer.json, tokenizer_config.json when there is
    one, and model.safetensors. A repo that ships only pytorch_model.bin has it read without running code
    (torch's weights_only) and stored as safetensors, with the other files, in
    cache_dir/models/<name>--<commit>, written whole or not at all. OSError names what failed."""
    def get(filename: str, optional: bool = False) -> Path | None:
        try:
            return Path(hf_hub_download(name, filename, revision=revision, endpoint=hub_url))
        except LocalEntryNotFoundError:  # not in the cache, and the hub not asked (offline) or not reached
            known_absent = try_to_load_from_cache(name, filename, revision=revision) is _CACHED_NO_EXIST
            if optional and known_absent:  # the hub said so when the model was fetched
                return None
            raise OSError(f"{name}: {filename} is not in the Hugging Face cache and the hub could not be "
                          "asked (offline, or no network): fetch the model once online, or give a local "
                          "folder") from None
        except EntryNotFoundError:  # the hub says the repo has no such file
            if optional:
                return None
            raise OSError(f"{name}: no {filename} on the hub at revision {revision or 'main'}") from None
        except (HfHubHTTPError, OSError) as err:  # no such repo, gated, network
            raise OSError(f"{name}: {filename} could not be fetched ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200]})") from None
    config = get("config.json")
    if not any([get(f, optional=True) for f in ("vocab.txt", "tokenizer.json")]):
        raise OSError(f"{name}: neither vocab.txt nor tokenizer.json exists")
    get("tokenizer_config.json", optional=True)  # casing: glue_data.load_tokenizer reads it
    if get("model.safetensors", optional=True):
        return config.parent  # the snapshot folder of huggingface_hub's cache holds every file fetched
    folder = cache_dir / "models" / f"{name.replace('/', '--')}--{config.parent.name}"
    if not (folder / "model.safetensors").exists():
        convert_pickled(get("pytorch_model.bin"), config.parent, folder)
    return folder


def convert_pickled(weights: Path, snapshot: Path, folder: Path) -> None:
    """pytorch_model.bin -> folder/model.safetensors, beside copies of the snapshot's other files; the
    folder appears only when complete. Keys the encoder never reads go (a masked-LM head whose decoder is
    tied to the word embeddings among them), and each kept tensor gets storage of its own: safetensors
    refuses tensors that share memory."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", suffix=".part", dir=folder.parent))
    try:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises UnpicklingError or RuntimeError for what it refuses
            raise ValueError(f"{weights} was refused: its pickle holds more than tensors "
                             f"({type(err).__name__}), and loading it could run code. Nothing was "
                             "installed; use a model that ships model.safetensors") from None
        kept = {k: v.detach().clone().contiguous() for k, v in state.items()
                if isinstance(v, torch.Tensor) and not current_name(k).startswith(DROPPED)}
        save_file(kept, str(tmp / "model.safetensors"))
        for name in ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json"):
            if (snapshot / name).is_file():
                shutil.copyfile(snapshot / name, tmp / name)  # through huggingface_hub's links
        if folder.exists():  # another process finished first
            shutil.rmtree(tmp)
            return
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
