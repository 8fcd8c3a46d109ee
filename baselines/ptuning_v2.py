"""P-Tuning v2 (Liu et al., ACL 2022), a baseline of the paper's Table 1: deep prompts, that is, trained
keys and values for L prefix positions at every layer of the encoder, per task, and a head on [CLS]. Each
task reads the text under its own prefixes, so labelling N tasks takes N encoder passes, as prompt tuning
does; MTOP's point is one pass. A reader of MTOP need not read this file.

    python baselines/ptuning_v2.py <train.py's flags> --mode separate --task-prompt-len 4 --no-test

trains it with train.py unchanged (this model in MTOP's place): --task-prompt-len is L, --prompt-lr the
prefixes' rate. The encoder's hook is Layer.forward's `prefix` (electra.py). The prefixes start as
standard normal vectors, as P-Tuning v2's prefix embedding does, without its optional reparameterization.
Its best/ folder holds the weights but is not a model Labeller or --predict can load: run with --no-test.

Shapes: N tasks, layers of the encoder, L prefix positions, D hidden size.
Reference: Liu et al., "P-Tuning: Prompt Tuning Can Be Comparable to Fine-tuning Across Scales and Tasks",
ACL 2022 (arXiv:2110.07602).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from electra import Electra  # noqa: E402
from mtop import MTOP, PromptConfig  # noqa: E402


class PTuningV2(MTOP):
    """MTOP's interface (heads, loss, one task per step, gradient only to the active task's prefixes)
    over deep prompts: deep_prompts (N, layers, 2, L, D), each task's keys and values per layer."""

    def __init__(self, encoder: Electra, tasks: list[tuple[str, int]], prompts: PromptConfig | None = None,
                 freeze_encoder: bool = False):
        L = (prompts or PromptConfig("separate")).task_prompt_len
        if L < 1:
            raise ValueError("P-Tuning v2 needs --task-prompt-len >= 1 (with --mode separate)")
        super().__init__(encoder, tasks, PromptConfig("none"), freeze_encoder)  # heads on [CLS]
        config = encoder.config
        self.deep_prompts = nn.Parameter(torch.randn(len(self.tasks), config.num_hidden_layers, 2, L,
                                                     config.hidden_size))  # (N, layers, 2, L, D)

    def prompt_parameters(self) -> list[nn.Parameter]:
        return [self.deep_prompts]

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None, active_task: str | None = None) -> torch.Tensor:
        """[CLS] under each task's prefixes: (B, N, D), or (B, 1, D) for active_task; one pass per task."""
        names = self.task_names if active_task is None else [self.task_names[self._check_task(active_task)]]
        B, T = input_ids.shape
        keep = (torch.ones(B, T, dtype=torch.bool, device=input_ids.device) if attention_mask is None
                else attention_mask.bool())
        text = self.encoder.embed(input_ids, token_type_ids)  # (B, T, E), the same for every task
        return torch.cat([self.encoder.encode(text, keep, rows=slice(0, 1),
                                              prefixes=self.deep_prompts[self.task_index[name]])
                          for name in names], dim=1)  # (B, len(names), D)


def main(argv: list[str]) -> dict:
    """train.py's main with PTuningV2 built where it builds MTOP."""
    if "--predict" in argv or "--no-test" not in argv:
        raise SystemExit("error: the P-Tuning v2 baseline trains and evaluates only: give --no-test (its "
                         "best/ folder is not a model --predict can load)")
    built = train.MTOP
    train.MTOP = PTuningV2  # what train.set_up builds
    try:
        return train.main(argv)
    finally:
        train.MTOP = built


if __name__ == "__main__":
    main(sys.argv[1:])
