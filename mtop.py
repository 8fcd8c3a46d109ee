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
    input [P~_S ; P_S ; X], gradient stopping  -> MTOP.prompt_pool
    Eq. (1) task feature a_i                   -> MTOP.forward
    Eq. (2) Softmax(V_i sigma(W_i a_i + b))    -> TaskHead (logits; the softmax is in MTOP.loss)
    prompt tuning's vocabulary initialisation  -> sampled_token_embeddings

Positions. Prompts take no position embedding: they enter as electra.Electra's `prefix`, after the
embedding LayerNorm. The text keeps positions 0..T-1 as in pre-training, and the number of tasks is
not capped by max_position_embeddings. Without position embeddings self-attention is
permutation-equivariant over the prompts: shuffle the pool and the prompt outputs are shuffled the
same way, nothing else changes. So a prompt has no identity but its learned vector; what ties task i
to its feature is only that Eq. (1) reads back the very slots where P_i was put.

Shapes: B batch, T text tokens, N tasks, L prompt tokens per task, S shared prompt tokens,
C labels of a task, E embedding size (prompts live there: they are added before
`embeddings_project`), D hidden size.

References: this paper (MTOP, "All Birds with One Stone"); Lester et al., "The Power of Scale for
Parameter-Efficient Prompt Tuning", EMNLP 2021; Liu et al., "Multi-Task Deep Neural Networks for
Natural Language Understanding" (MT-DNN), ACL 2019; Clark et al., "ELECTRA", ICLR 2020.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from electra import Electra, ElectraConfig, atomic_write

MODES = ("none", "separate", "concat", "stopgrad", "mtop")
WEIGHTS_FILE = "model.safetensors"
SETTINGS_FILE = "mtop.json"


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


def sampled_token_embeddings(encoder: Electra, count: int) -> torch.Tensor:
    """`count` embeddings of vocabulary tokens drawn with torch's RNG (seed it to repeat): (count, E).

    Prompt tuning starts soft prompts from sampled vocabulary embeddings (Lester et al., 2021), so
    they begin at the scale of what the encoder sees at its input. Each token is embedded alone, as
    the first token of a sentence, and taken after the embedding LayerNorm: the point where the
    prompts are prepended. (With BERT's vocabulary ~3% of draws are [unusedN] rows; the LayerNorm
    still gives them the right scale.)
    """
    ids = torch.randint(encoder.config.vocab_size, (count, 1), device=encoder.word_embeddings.weight.device)
    was_training = encoder.training
    encoder.eval()  # no dropout in the initial values
    with torch.no_grad():
        vectors = encoder.embed(ids)[:, 0]  # (count, 1, E) -> (count, E)
    encoder.train(was_training)
    return vectors


class MTOP(nn.Module):
    """An encoder, task prompts (per `mode`) and one head per task; forward returns every task's logits."""

    def __init__(self, encoder: Electra, tasks: list[tuple[str, int]], task_prompt_len: int = 4,
                 shared_prompt_len: int = 32, mode: str = "mtop", freeze_encoder: bool = False):
        """tasks: (name, num_labels) pairs, num_labels = 1 for regression. Prompt lengths a mode
        does not use are stored as 0 (L in "none", S in every mode but "mtop")."""
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
        tasks = [(str(name), int(num_labels)) for name, num_labels in tasks]
        names = [name for name, _ in tasks]
        if not tasks:
            raise ValueError("MTOP needs at least one (name, num_labels) task")
        if duplicates := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"duplicate task names: {', '.join(duplicates)}; give every task its own name")
        if bad := [f"{name} ({n})" for name, n in tasks if n < 1]:
            raise ValueError(f"num_labels must be >= 1 (1 means regression), got: {', '.join(bad)}")
        if mode != "none" and task_prompt_len < 1:
            raise ValueError(f"mode {mode!r} needs task_prompt_len >= 1, got {task_prompt_len}")
        if mode == "mtop" and shared_prompt_len < 0:
            raise ValueError(f"shared_prompt_len must be >= 0, got {shared_prompt_len}")

        self.encoder = encoder
        self.mode = mode
        self.tasks = tasks
        self.task_names = names
        self.num_labels = dict(tasks)
        self.task_index = {name: i for i, name in enumerate(names)}
        self.task_prompt_len = task_prompt_len if mode != "none" else 0
        self.shared_prompt_len = shared_prompt_len if mode == "mtop" else 0
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:  # pure prompt tuning: only prompts and heads train
            encoder.requires_grad_(False)

        N, L, S = len(tasks), self.task_prompt_len, self.shared_prompt_len
        E, D = encoder.config.embedding_size, encoder.config.hidden_size
        # One (L, E) parameter per task, P_i, rather than one (N, L, E) tensor: a task that is not
        # trained in a step then has no gradient at all (None, not zeros), so AdamW skips its prompts:
        # no step from momentum gathered on earlier steps, no weight decay. P_j changes only when
        # task j is trained, which is what gradient stopping means for an optimizer with state.
        initial = sampled_token_embeddings(encoder, N * L).view(N, L, E)
        self.task_prompts = nn.ParameterList(nn.Parameter(p.clone()) for p in initial) if L else None
        self.shared_prompts = nn.Parameter(sampled_token_embeddings(encoder, S)) if S else None  # (S, E)
        # A list, not a dict keyed by name: task names may hold characters ('.') modules refuse.
        self.heads = nn.ModuleList(TaskHead(D, n, encoder.config.hidden_dropout_prob) for _, n in tasks)
        self.heads.apply(Electra._init_weights)  # BERT's init: normal(0, 0.02), zero bias

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, tasks={len(self.tasks)}, task_prompt_len={self.task_prompt_len}, "
                f"shared_prompt_len={self.shared_prompt_len}")

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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                active_task: str | None = None) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask, token_type_ids: (B, T) -> {task name: logits (B, C)}.

        active_task: the task of this training step (one task per step, as in the paper), or None
        at inference. Regression tasks (C = 1) get (B, 1), like the others. Every row gets every
        task's logits, so an inference batch may mix documents meant for different tasks.
        "separate" returns only the active task when there is one, and otherwise runs N passes.
        """
        if active_task is not None:
            self._check_task(active_task)
        L = self.task_prompt_len
        if self.mode == "separate":  # Fig. 1(a): [P_i ; X] gives a different encoding per task
            logits = {}
            for name in [active_task] if active_task is not None else self.task_names:
                i = self.task_index[name]
                hidden = self.encoder(input_ids, attention_mask, token_type_ids,
                                      prefix=self.task_prompts[i])  # (B, L+T, D)
                logits[name] = self.heads[i](hidden[:, :L].mean(dim=1))  # Eq. (1) with N = 1, Eq. (2)
            return logits

        hidden = self.encoder(input_ids, attention_mask, token_type_ids,
                              prefix=self.prompt_pool(active_task))  # (B, N*L + S + T, D)
        N = len(self.tasks)
        if self.mode == "none":  # MT-DNN: every head reads the [CLS] output
            features = hidden[:, :1].expand(-1, N, -1)  # (B, N, D)
        else:
            features = hidden[:, :N * L].unflatten(1, (N, L)).mean(dim=2)  # Eq. (1): (B, N*L, D) -> (B, N, D)
        return {name: head(features[:, i]) for i, (name, head) in enumerate(zip(self.task_names, self.heads))}

    def loss(self, logits: dict[str, torch.Tensor] | torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
        """Cross-entropy (labels: class ids) or, for num_labels = 1, mean squared error (labels: floats).

        logits: forward's dict (its entry for `task` is used) or that task's (B, C) tensor.
        """
        self._check_task(task)
        if isinstance(logits, dict):
            if task not in logits:
                raise ValueError(f"the logits hold no entry for task {task!r} (they have: {', '.join(logits)}); "
                                 f"in mode 'separate' call forward with active_task={task!r}")
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
        settings = {"format": "mtop", "version": 1, "tasks": [list(task) for task in self.tasks],
                    "mode": self.mode, "task_prompt_len": self.task_prompt_len,
                    "shared_prompt_len": self.shared_prompt_len, "freeze_encoder": self.freeze_encoder,
                    "encoder_config": self.encoder.config.to_dict(), "metadata": metadata or {}}
        try:  # before touching the disk: a bad metadata value leaves the folder as it was
            text = json.dumps(settings, indent=2)
        except TypeError as err:
            raise ValueError(f"metadata must be JSON-serialisable: {err}") from None
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(folder / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        atomic_write(folder / SETTINGS_FILE, lambda p: p.write_text(text, encoding="utf-8"))

    @classmethod
    def load(cls, folder: str | Path, map_location: str | torch.device = "cpu") -> tuple["MTOP", dict]:
        """Read a folder written by `save`: (model in eval mode, the metadata given to save)."""
        folder = Path(folder)
        settings_path = folder / SETTINGS_FILE
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder (MTOP.save writes {SETTINGS_FILE} and {WEIGHTS_FILE})")
        try:
            settings = json.loads(settings_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{settings_path}: missing; this is not a folder written by MTOP.save "
                                    "(a bare encoder folder loads with electra.Electra.from_pretrained)") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{settings_path}: not valid JSON ({err})") from None
        if settings.get("format") != "mtop" or settings.get("version") != 1:
            raise ValueError(f"{settings_path}: not a version 1 MTOP settings file (written by MTOP.save)")
        try:
            config = ElectraConfig.from_dict(settings["encoder_config"], source=str(settings_path))
            # Built on the meta device: no memory and no random init for values read from disk next.
            with torch.device("meta"):
                model = cls(Electra(config), settings["tasks"], settings["task_prompt_len"],
                            settings["shared_prompt_len"], settings["mode"], settings["freeze_encoder"])
        except KeyError as err:
            raise ValueError(f"{settings_path}: missing field {err.args[0]!r}") from None
        state = read_weights(folder / WEIGHTS_FILE, model.state_dict(), map_location)
        model.load_state_dict(state, assign=True)
        return model.eval(), settings.get("metadata", {})


def read_weights(path: Path, expected: dict[str, torch.Tensor],
                 map_location: str | torch.device) -> dict[str, torch.Tensor]:
    """Read a safetensors file that must hold exactly the keys and shapes of `expected`."""
    try:
        state = load_file(str(path), device=str(torch.device(map_location)))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no weights file (MTOP.save writes {WEIGHTS_FILE})") from None
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: cannot read safetensors ({err}); the file is truncated or corrupt") from None
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    bad_shape = [f"{k} {tuple(state[k].shape)} != {tuple(t.shape)}"
                 for k, t in expected.items() if k in state and state[k].shape != t.shape]
    if missing or unexpected or bad_shape:
        problems = [f"missing keys: {', '.join(missing)}" if missing else "",
                    f"unexpected keys: {', '.join(unexpected)}" if unexpected else "",
                    f"wrong shapes: {'; '.join(bad_shape)}" if bad_shape else ""]
        raise ValueError(f"{path} does not match {SETTINGS_FILE}:\n  " + "\n  ".join(p for p in problems if p))
    return state
