"""MTOP's prompt sharing: one encoder pass that predicts all N tasks (Sec. 3.1 of the paper).

The encoder reads [P~_S ; P_S ; X]: a pool of N*L task prompts, then S shared prompts, then the
embedded text. Task i's feature is the mean of the encoder outputs at its own L prompt positions
(Eq. 1), and a two-layer head per task turns it into logits (Eq. 2). While training on task i, the
gradient reaches only task i's block of the pool ("gradient stopping", Fig. 1c); the shared prompts
always get gradients (Fig. 1d). `mode` picks a prompt setting of Fig. 1, for the ablation of Sec. 4.4:

    "none"      [X], every head reads [CLS]                        MT-DNN baseline        1 pass
    "separate"  [P_i ; X], task i's prompts only                   Fig. 1(a) prompt tuning N passes
    "concat"    [P_1 ; ... ; P_N ; X], all prompts get gradients   Fig. 1(b)              1 pass
    "stopgrad"  as concat, only P_i gets task i's gradient         Fig. 1(c)              1 pass
    "mtop"      [P~_S ; P_S ; X]: stopgrad + S shared prompts      Fig. 1(d), the paper   1 pass

Paper map:
    prompt and pooling settings                -> PromptConfig (mtop.json)
    input [P~_S ; P_S ; X], gradient stopping  -> MTOP.prompt_pool
    Eq. (1) task feature a_i                   -> MTOP.features (pooling "mean+cls": ours)
    Eq. (2) Softmax(V_i sigma(W_i a_i + b))    -> TaskHead (logits; the softmax is in MTOP.loss)
    prompt tuning's vocabulary initialisation  -> initial_prompts

Where prompts enter and how they start is left open by the paper; PromptConfig holds both with the
lengths and the mode, and RESULTS.md compares the options. By default ("after-norm") the prompts join
the embedded text after the embedding LayerNorm, with no position embedding: the text keeps positions
0..T-1 as in pre-training and the number of tasks is not capped by max_position_embeddings. "input"
embeds the prompts like tokens (token-type embedding, LayerNorm, dropout), "input-positions" also gives
them positions 0..P-1 (prompt-tuning libraries). Without position embeddings self-attention is
permutation-equivariant over the prompts: a prompt has no identity but its learned vector, and what
ties task i to its feature is only that Eq. (1) reads back the very slots where P_i was put.

Shapes: B batch, T text tokens, N tasks, L prompt tokens per task, S shared prompt tokens,
C labels of a task, E embedding size (prompts live there: they are added before
`embeddings_project`), D hidden size.

References: this paper (MTOP, "All Birds with One Stone"); Lester et al., "The Power of Scale for
Parameter-Efficient Prompt Tuning", EMNLP 2021; Liu et al., "Multi-Task Deep Neural Networks for
Natural Language Understanding" (MT-DNN), ACL 2019; Clark et al., "ELECTRA", ICLR 2020.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from electra import Electra, ElectraConfig, check_keys
from support.files import atomic_write, name_problem, read_json

MODES = ("none", "separate", "concat", "stopgrad", "mtop")
# Where the prompt vectors join the embedded text (a choice the paper leaves open; RESULTS.md compares them):
#   "after-norm"       after the embedding LayerNorm and dropout, no position embedding
#   "input"            as input embeddings: + token-type embedding, LayerNorm, dropout; no position
#   "input-positions"  as "input", and the prompts take positions 0..P-1, the text P..P+T-1
PROMPT_ENTRIES = ("after-norm", "input", "input-positions")
# How the prompt vectors start (the paper does not say; initial_prompts; RESULTS.md section 2 compares them).
PROMPT_INITS = ("vocab", "vocab-pos0", "random")
# What a task head reads (RESULTS.md section 6 compares them):
#   "mean"      the mean of the task's L prompt outputs (Eq. 1, the paper)
#   "mean+cls"  that mean plus the [CLS] output of the same pass (this project's option, beyond the paper)
POOLINGS = ("mean", "mean+cls")
WEIGHTS_FILE = "model.safetensors"
SETTINGS_FILE = "mtop.json"


@dataclass(frozen=True)
class PromptConfig:
    """The prompt settings of an MTOP model, validated when made; MTOP.save writes them to mtop.json and
    MTOP.load reads them back with from_dict, so the file and the model never disagree.

    mode:              a prompt setting of Fig. 1 (MODES; "none" is MT-DNN)
    task_prompt_len:   L, prompt tokens per task (stored as 0 in "none", which has none)
    shared_prompt_len: S (L' of the paper), shared prompt tokens (stored as 0 in every mode but "mtop")
    prompt_entry:      where prompts join the embedded text (PROMPT_ENTRIES)
    prompt_init:       how prompt vectors start (PROMPT_INITS, initial_prompts)
    pooling:           what a task head reads (POOLINGS): Eq. (1)'s mean, or the mean plus [CLS]
    Raises ValueError naming the setting and its valid values.
    """

    mode: str = "mtop"
    task_prompt_len: int = 4
    shared_prompt_len: int = 32
    prompt_entry: str = "after-norm"
    prompt_init: str = "random"
    pooling: str = "mean"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of: {', '.join(MODES)}")
        if self.prompt_entry not in PROMPT_ENTRIES or self.prompt_init not in PROMPT_INITS:
            raise ValueError(f"prompt entry {self.prompt_entry!r} / init {self.prompt_init!r}: choose an "
                             f"entry from {', '.join(PROMPT_ENTRIES)} and an init from "
                             f"{', '.join(PROMPT_INITS)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of: {', '.join(POOLINGS)}")
        if self.pooling != "mean" and self.mode == "none":
            raise ValueError(f"pooling {self.pooling!r} needs prompts; mode 'none' reads [CLS] only")
        if self.prompt_init == "vocab-pos0" and self.prompt_entry != "after-norm":
            raise ValueError("prompt init 'vocab-pos0' is defined for prompt entry 'after-norm' only")
        for name in ("task_prompt_len", "shared_prompt_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.mode != "none" and self.task_prompt_len < 1:
            raise ValueError(f"mode {self.mode!r} needs task_prompt_len >= 1, got {self.task_prompt_len}")
        if self.mode == "mtop" and self.shared_prompt_len < 0:
            raise ValueError(f"shared_prompt_len must be >= 0, got {self.shared_prompt_len}")
        # Lengths a mode does not use are stored as 0: two configs that build the same model are equal.
        object.__setattr__(self, "task_prompt_len", self.task_prompt_len if self.mode != "none" else 0)
        object.__setattr__(self, "shared_prompt_len", self.shared_prompt_len if self.mode == "mtop" else 0)

    def to_dict(self) -> dict:
        return asdict(self)

    def prompt_positions(self, num_tasks: int) -> int:
        """Prompt vectors in front of the text in one pass: N*L + S (one task's L in "separate")."""
        return self.task_prompt_len * (1 if self.mode == "separate" else num_tasks) + self.shared_prompt_len

    @classmethod
    def from_dict(cls, raw: dict, source: str = "prompt settings") -> PromptConfig:
        """Read the keys to_dict writes (a folder written before prompt_entry, prompt_init and pooling
        existed used "after-norm", "vocab-pos0" and "mean"); a missing or invalid one is a ValueError
        naming `source`."""
        try:
            return cls(mode=raw["mode"], task_prompt_len=raw["task_prompt_len"],
                       shared_prompt_len=raw["shared_prompt_len"],
                       prompt_entry=raw.get("prompt_entry", "after-norm"),
                       prompt_init=raw.get("prompt_init", "vocab-pos0"),
                       pooling=raw.get("pooling", "mean"))
        except KeyError as err:
            raise ValueError(f"{source}: missing field {err.args[0]!r}") from None
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None


class TaskHead(nn.Module):
    """Eq. (2) up to the softmax: logits = V_i act(W_i a_i + b), dropout before each linear layer.

    The activation is GELU, as in ELECTRA's own classification head and its feed-forward layers
    (the paper writes sigma without naming it; BERT's pooler would use tanh). Unlike the paper's
    formula, V_i has a bias, as in ELECTRA's head.
    """

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden_size, hidden_size)  # W_i, b
        self.out_proj = nn.Linear(hidden_size, num_labels)  # V_i

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.dense(self.dropout(features)))  # (B, D)
        return self.out_proj(self.dropout(x))  # Eq. (2): (B, C)


def initial_prompts(encoder: Electra, count: int, entry: str, init: str) -> torch.Tensor:
    """`count` starting prompt vectors for prompts that enter at `entry`: (count, E). Uses torch's RNG.

    "vocab": the embeddings of vocabulary tokens drawn at random (Lester et al., 2021), so prompts
    start at the scale of what the encoder sees at their entry: word-embedding rows for the "input"
    entries; after the embedding LayerNorm, each token embedded alone with its token-type embedding
    and no position for "after-norm". (With BERT's vocabulary ~3% of draws are [unusedN] rows.)
    "vocab-pos0" ("after-norm" only): as "vocab", but each token embedded as the first token of a
    sentence, with position 0's embedding; the first version of this code did that, and it makes
    the prompts alike (RESULTS.md). "random" (the default): Gaussian vectors at the same scale:
    through the embedding LayerNorm for "after-norm", with the word-embedding table's standard
    deviation for the "input" entries. RESULTS.md compares the three.
    """
    PromptConfig(prompt_entry=entry, prompt_init=init)  # a ValueError names a wrong entry or init
    words = encoder.word_embeddings.weight  # (V, E)
    with torch.no_grad():
        if init == "random":
            vectors = torch.randn(count, words.shape[1], device=words.device)  # (count, E)
            if entry == "after-norm":
                return encoder.embedding_norm(vectors)
            return vectors * words.std()
        ids = torch.randint(encoder.config.vocab_size, (count,), device=words.device)
        vectors = words[ids]  # (count, E)
        if entry != "after-norm":
            return vectors.clone()
        vectors = vectors + encoder.token_type_embeddings.weight[0]
        if init == "vocab-pos0":
            vectors = vectors + encoder.position_embeddings.weight[0]
        return encoder.embedding_norm(vectors)


class MTOP(nn.Module):
    """An encoder, task prompts (per `mode`) and one head per task; forward returns every task's logits."""

    def __init__(self, encoder: Electra, tasks: list[tuple[str, int]], prompts: PromptConfig | None = None,
                 freeze_encoder: bool = False):
        """tasks: (name, num_labels) pairs, num_labels = 1 for regression; prompts: the prompt settings
        (default PromptConfig()); freeze_encoder: train prompts and heads only (prompt tuning)."""
        super().__init__()
        prompts = PromptConfig() if prompts is None else prompts
        if not isinstance(prompts, PromptConfig):
            raise ValueError(f"prompts must be a PromptConfig, got {type(prompts).__name__}")
        tasks = [(str(name), int(num_labels)) for name, num_labels in tasks]
        names = [name for name, _ in tasks]
        if not tasks:
            raise ValueError("MTOP needs at least one (name, num_labels) task")
        if duplicates := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"duplicate task names: {', '.join(duplicates)}; give every task its own name")
        if bad := [f"{name} ({n})" for name, n in tasks if n < 1]:
            raise ValueError(f"num_labels must be >= 1 (1 means regression), got: {', '.join(bad)}")
        mode, prompt_entry, prompt_init = prompts.mode, prompts.prompt_entry, prompts.prompt_init

        self.encoder = encoder
        self.mode = mode
        self.tasks = tasks
        self.task_names = names
        self.num_labels = dict(tasks)
        self.task_index = {name: i for i, name in enumerate(names)}
        self.prompts = prompts
        self.task_prompt_len, self.shared_prompt_len = prompts.task_prompt_len, prompts.shared_prompt_len
        self.freeze_encoder = freeze_encoder
        self.prompt_entry, self.prompt_init = prompt_entry, prompt_init
        if freeze_encoder:  # pure prompt tuning: only prompts and heads train
            encoder.requires_grad_(False)

        N, L, S = len(tasks), self.task_prompt_len, self.shared_prompt_len
        E, D = encoder.config.embedding_size, encoder.config.hidden_size
        # One (L, E) parameter per task, P_i, rather than one (N, L, E) tensor: a task that is not
        # trained in a step then has no gradient at all (None, not zeros), so AdamW skips its prompts:
        # no step from momentum gathered on earlier steps, no weight decay. P_j changes only when
        # task j is trained, which is what gradient stopping means for an optimizer with state.
        initial = initial_prompts(encoder, N * L, prompt_entry, prompt_init).view(N, L, E)
        self.task_prompts = nn.ParameterList(nn.Parameter(p.clone()) for p in initial) if L else None
        self.shared_prompts = nn.Parameter(initial_prompts(encoder, S, prompt_entry,
                                                           prompt_init)) if S else None
        # A list, not a dict keyed by name: task names may hold characters ('.') modules refuse.
        self.heads = nn.ModuleList(TaskHead(D, n, encoder.config.hidden_dropout_prob) for _, n in tasks)
        self.heads.apply(Electra._init_weights)  # BERT's init: normal(0, 0.02), zero bias
        self._stacked_heads: tuple | None = None  # inference copies of the heads' weights (all_heads)

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, tasks={len(self.tasks)}, task_prompt_len={self.task_prompt_len}, "
                f"shared_prompt_len={self.shared_prompt_len}, prompt_entry={self.prompt_entry!r}, "
                f"prompt_init={self.prompt_init!r}, pooling={self.prompts.pooling!r}")

    @property
    def max_text_length(self) -> int:
        """Positions left for the text: the encoder's, less the prompts' with prompt entry "input-positions"
        (batches padded for speed must stop there: glue_data.collate's limit)."""
        taken = self.prompts.prompt_positions(len(self.tasks))
        return self.encoder.config.max_position_embeddings - (taken if self.prompt_entry == "input-positions"
                                                              else 0)

    def prompt_parameters(self) -> list[nn.Parameter]:
        """Every prompt vector block: the N task prompts P_i (L, E) and the shared prompts (S, E)."""
        task = list(self.task_prompts) if self.task_prompts is not None else []
        return task + ([self.shared_prompts] if self.shared_prompts is not None else [])

    def _check_task(self, task: str) -> int:
        if task not in self.task_index:
            raise ValueError(f"unknown task {task!r}; this model has: {', '.join(self.task_names)}")
        return self.task_index[task]

    def prompt_pool(self, active_task: str | None = None) -> torch.Tensor | None:
        """What a one-pass mode prepends to the embedded text: (N*L + S, E); None in "none", "separate".

        In "stopgrad" and "mtop" only the active task's block stays in the autograd graph, so every
        other task's prompts get no gradient at all (Sec. 3.1.3). With active_task=None (inference)
        nothing is detached: the values are the same either way.
        """
        if self.mode in ("none", "separate"):
            return None
        blocks = list(self.task_prompts)  # N x (L, E)
        if self.mode in ("stopgrad", "mtop") and active_task is not None:
            i = self._check_task(active_task)
            blocks = [p if j == i else p.detach() for j, p in enumerate(blocks)]
        pool = torch.cat(blocks)  # P~_S: (N*L, E)
        if self.shared_prompts is not None:
            pool = torch.cat([pool, self.shared_prompts])  # [P~_S ; P_S]: (N*L + S, E)
        return pool

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               token_type_ids: torch.Tensor | None, prompts: torch.Tensor | None,
               rows: slice | None = None) -> torch.Tensor:
        """The encoder on [prompts ; X], the prompts joining at self.prompt_entry: (B, P+T, D), or
        (B, R, D) for the positions in `rows` (the last layer then computes only those)."""
        encoder = self.encoder
        B, T = input_ids.shape
        keep = (torch.ones(B, T, dtype=torch.bool, device=input_ids.device) if attention_mask is None
                else attention_mask.bool())  # (B, T)
        if prompts is None:
            return encoder.encode(encoder.embed(input_ids, token_type_ids), keep, rows)
        P = prompts.shape[0]
        prompts = prompts.expand(B, -1, -1)  # (B, P, E): the same prompts in front of every text
        if self.prompt_entry == "after-norm":
            text = encoder.embed(input_ids, token_type_ids)  # (B, T, E)
        else:  # embedded like tokens; "input-positions" gives them 0..P-1 and shifts the text
            with_positions = self.prompt_entry == "input-positions"
            prompts = encoder.embed_vectors(prompts, with_positions)
            text = encoder.embed(input_ids, token_type_ids, first_position=P if with_positions else 0)
        x = torch.cat([prompts.to(text.dtype), text], dim=1)  # (B, P+T, E)
        keep = torch.cat([keep.new_ones(B, P), keep], dim=1)  # (B, P+T)
        return encoder.encode(x, keep, rows)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                active_task: str | None = None) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask, token_type_ids: (B, T) -> {task name: logits (B, C)}: Eq. (2) on
        `features`.

        active_task=None (inference): every task's logits, so a batch may mix documents meant for
        different tasks. active_task=name (the task of a training step, one per step as in the paper,
        or a single task's evaluation): that task's logits only, and in "stopgrad" and "mtop" only its
        prompts get gradients. Regression tasks (C = 1) get (B, 1), like the others.
        """
        names = self.task_names if active_task is None else [self.task_names[self._check_task(active_task)]]
        features = self.features(input_ids, attention_mask, token_type_ids, active_task)
        if active_task is None and not self.training and not torch.is_grad_enabled():
            return self.all_heads(features)  # labelling: N heads in two batched products
        return {name: self.heads[self.task_index[name]](features[:, k]) for k, name in enumerate(names)}

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None, active_task: str | None = None) -> torch.Tensor:
        """What the heads read, a_i of Eq. (1): (B, N, D) for every task, or (B, 1, D) for active_task
        (gradients as in forward). The last encoder layer computes only the rows read (the task's prompts;
        with pooling "mean+cls" the rows from the first task's prompts to [CLS], row P), which gives the
        same features as the full pass. "separate" runs one pass per task.
        """
        names = self.task_names if active_task is None else [self.task_names[self._check_task(active_task)]]
        L = self.task_prompt_len
        reads_cls = int(self.prompts.pooling == "mean+cls")  # 1: heads also read [CLS], the first text row
        if self.mode == "separate":  # Fig. 1(a): [P_i ; X] gives a different encoding per task
            return torch.cat([self._pool(self.encode(input_ids, attention_mask, token_type_ids,
                                                     self.task_prompts[self.task_index[name]],
                                                     rows=slice(0, L + reads_cls)), 1)  # Eq. (1), N = 1
                              for name in names], dim=1)  # (B, len(names), D)
        if self.mode == "none":  # MT-DNN: every head reads the [CLS] output
            cls = self.encode(input_ids, attention_mask, token_type_ids, None, rows=slice(0, 1))  # (B, 1, D)
            return cls.expand(-1, len(names), -1)  # (B, len(names), D)
        first = 0 if active_task is None else self.task_index[active_task]  # the first task read
        pool = self.prompt_pool(active_task)  # (P, E)
        end = pool.shape[0] + 1 if reads_cls else (first + len(names)) * L  # [CLS] is row P
        hidden = self.encode(input_ids, attention_mask, token_type_ids, pool,
                             rows=slice(first * L, end))  # (B, end - first*L, D)
        return self._pool(hidden, len(names))  # Eq. (1): (B, len(names), D)

    def _pool(self, hidden: torch.Tensor, count: int) -> torch.Tensor:
        """Eq. (1) for `count` tasks whose L prompt outputs are the first count*L rows of hidden (B, R, D):
        their means (B, count, D); with pooling "mean+cls", plus the [CLS] output, hidden's last row."""
        L = self.task_prompt_len
        features = hidden[:, :count * L].unflatten(1, (count, L)).mean(dim=2)  # (B, count, D)
        return features + hidden[:, -1:] if self.prompts.pooling == "mean+cls" else features

    @torch.no_grad()
    def all_heads(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Eq. (2) for every task at once, at inference (no dropout): features (B, N, D) -> {task: (B, C)}.

        The heads stay separate modules for training (a task's step must leave the other heads, and
        their AdamW state, untouched); for labelling, a copy of their weights stacked into (N, D, D)
        and (N, C_max, D) turns N small products into two batched ones. The copy is rebuilt whenever a
        head's weights change (their version counters or storage move).
        """
        params = list(self.heads.parameters())
        key = tuple((p._version, p.data_ptr()) for p in params)
        if self._stacked_heads is None or self._stacked_heads[0] != key:
            C = max(self.num_labels.values())
            out_weight = features.new_zeros(len(self.heads), C, features.shape[-1])  # (N, C_max, D)
            out_bias = features.new_zeros(len(self.heads), C)  # (N, C_max)
            for i, head in enumerate(self.heads):
                out_weight[i, :head.out_proj.out_features] = head.out_proj.weight
                out_bias[i, :head.out_proj.out_features] = head.out_proj.bias
            dense_weight = torch.stack([head.dense.weight for head in self.heads])  # (N, D, D)
            dense_bias = torch.stack([head.dense.bias for head in self.heads])  # (N, D)
            self._stacked_heads = (key, dense_weight, dense_bias, out_weight, out_bias)
        _, dense_weight, dense_bias, out_weight, out_bias = self._stacked_heads
        x = features.transpose(0, 1).to(dense_weight.dtype)  # (N, B, D)
        x = F.gelu(torch.baddbmm(dense_bias[:, None], x, dense_weight.transpose(1,
                                                                                2)))  # W_i a_i + b: (N, B, D)
        logits = torch.baddbmm(out_bias[:, None], x, out_weight.transpose(1, 2))  # (N, B, C_max)
        return {name: logits[i, :, :n] for i, (name, n) in enumerate(self.tasks)}

    def loss(self, logits: dict[str, torch.Tensor] | torch.Tensor, labels: torch.Tensor,
             task: str) -> torch.Tensor:
        """Cross-entropy (labels: class ids) or, for num_labels = 1, mean squared error (labels: floats).

        logits: forward's dict (its entry for `task` is used) or that task's (B, C) tensor.
        """
        self._check_task(task)
        if isinstance(logits, dict):
            if task not in logits:
                raise ValueError(f"the logits hold no entry for task {task!r} (they have: "
                                 f"{', '.join(logits)}); in mode 'separate' call forward with "
                                 f"active_task={task!r}")
            logits = logits[task]
        if self.num_labels[task] == 1:
            prediction = logits.squeeze(-1)  # (B, 1) -> (B,)
            return F.mse_loss(prediction.float(), labels.float())  # fp32 even under bf16 autocast
        return F.cross_entropy(logits, labels)

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self, folder: str | Path, metadata: dict | None = None) -> None:
        """Write model.safetensors (every parameter, the encoder's under "encoder.") and mtop.json
        (tasks, prompt settings, encoder config, the caller's JSON-serialisable metadata)."""
        folder = Path(folder)
        text = self.settings_text(metadata)  # before touching the disk: a bad value leaves the folder be
        if len(text.encode()) > MAX_SETTINGS_BYTES:  # load would refuse it
            raise ValueError(f"{SETTINGS_FILE} would be {len(text.encode())} bytes, over "
                             f"{MAX_SETTINGS_BYTES}: keep large metadata in a file of its own")
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(folder / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        atomic_write(folder / SETTINGS_FILE, lambda p: p.write_text(text, encoding="utf-8"))

    def settings_text(self, metadata: dict | None = None) -> str:
        """mtop.json's text: tasks, prompt settings, encoder config and the caller's metadata (ValueError
        when the metadata is not JSON); save refuses a text over MAX_SETTINGS_BYTES, as load would."""
        settings = {"format": "mtop", "version": 1, "tasks": [list(task) for task in self.tasks],
                    **self.prompts.to_dict(), "freeze_encoder": self.freeze_encoder,
                    "encoder_config": self.encoder.config.to_dict(), "metadata": metadata or {}}
        try:
            return json.dumps(settings, indent=2)
        except TypeError as err:
            raise ValueError(f"metadata must be JSON-serialisable: {err}") from None

    @classmethod
    def load(cls, folder: str | Path, map_location: str | torch.device = "cpu") -> tuple[MTOP, dict]:
        """Read a folder written by `save`: (model in eval mode, the metadata given to save)."""
        folder = Path(folder)
        settings_path = folder / SETTINGS_FILE
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder (MTOP.save writes {SETTINGS_FILE} and "
                                    f"{WEIGHTS_FILE})")
        if settings_path.is_file() and settings_path.stat().st_size > MAX_SETTINGS_BYTES:
            raise ValueError(f"{settings_path}: {settings_path.stat().st_size} bytes; a settings file "
                             f"written by MTOP.save is a few KB (at most {MAX_SETTINGS_BYTES})")
        run = (folder / "best" / SETTINGS_FILE).is_file()  # a run folder: its model is best/
        settings = read_json(settings_path, "this is not a folder written by MTOP.save (" + (
            f"a run folder's model is {folder / 'best'}" if run else
            "a bare encoder folder loads with electra.Electra.from_pretrained") + ")")
        if settings.get("format") != "mtop" or settings.get("version") != 1:
            raise ValueError(f"{settings_path}: not a version 1 MTOP settings file (written by MTOP.save)")
        check_settings(settings, settings_path)
        try:
            config = ElectraConfig.from_dict(settings["encoder_config"], source=str(settings_path))
            # Built on the meta device: no memory and no random init for values read from disk next.
            prompts = PromptConfig.from_dict(settings, source=str(settings_path))
            with torch.device("meta"):
                model = cls(Electra(config), settings["tasks"], prompts, settings["freeze_encoder"])
        except KeyError as err:
            raise ValueError(f"{settings_path}: missing field {err.args[0]!r}") from None
        except TypeError as err:
            raise ValueError(f"{settings_path}: a field has the wrong type ({err})") from None
        state = read_weights(folder / WEIGHTS_FILE, model.state_dict(), map_location)
        model.load_state_dict(state, assign=True)
        return model.eval(), settings.get("metadata", {})


MAX_SETTINGS_BYTES = 1 << 20
MAX_TASKS = 10_000


def check_settings(settings: dict, path: Path) -> None:
    """mtop.json's fields that PromptConfig and ElectraConfig do not check themselves: the task list (at
    most MAX_TASKS (name, num_labels) pairs), freeze_encoder, encoder_config and metadata."""
    tasks = settings.get("tasks")
    if tasks is None:
        raise ValueError(f"{path}: missing field 'tasks'")
    if not isinstance(tasks, list) or not 0 < len(tasks) <= MAX_TASKS:
        raise ValueError(f"{path}: field 'tasks' must be a list of 1 to {MAX_TASKS} [name, num_labels] pairs")
    for i, task in enumerate(tasks):
        ok = isinstance(task, list) and len(task) == 2 and isinstance(task[0], str) and \
            isinstance(task[1], int) and not isinstance(task[1], bool) and 1 <= task[1] <= 100_000
        if not ok:
            raise ValueError(f"{path}: field 'tasks' item {i} is {str(task)[:60]!r}, not a [name, "
                             "num_labels] pair with num_labels from 1 to 100000")
        if problem := name_problem(task[0]):  # names become file names: the task sets' rule
            raise ValueError(f"{path}: field 'tasks' item {i}: the name {problem}")
    for key, kind in (("freeze_encoder", bool), ("encoder_config", dict), ("metadata", dict)):
        if key in settings and not isinstance(settings[key], kind):
            raise ValueError(f"{path}: field {key!r} must be a {kind.__name__}, got {settings[key]!r}")


def read_weights(path: Path, expected: dict[str, torch.Tensor],
                 map_location: str | torch.device) -> dict[str, torch.Tensor]:
    """Read a safetensors file that must hold exactly the keys and shapes of `expected`."""
    try:
        state = load_file(str(path), device=str(torch.device(map_location)))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no weights file (MTOP.save writes {WEIGHTS_FILE})") from None
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: cannot read safetensors ({err}); the file is truncated or "
                         "corrupt") from None
    check_keys(path, SETTINGS_FILE, {k: t.shape for k, t in state.items()},
               {k: t.shape for k, t in expected.items()})
    return state
