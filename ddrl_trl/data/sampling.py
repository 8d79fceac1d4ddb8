"""Drawing and collating the training rows: each prompt repeated `num_generations` times (a group), seeded."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .columns import REF_LATENTS_COLUMN

logger = logging.getLogger(__name__)


class RepeatSampler(torch.utils.data.Sampler[int]):
    """Yields each dataset index `repeats` times in a row, in a seeded random order (a fresh one per epoch).

    With a batch size that is a multiple of `repeats`, every batch holds whole groups: prompt k at rows k·N … k·N+N−1.
    With `iterations` > 1 (`DDRLConfig.num_iterations`), the rows of each optimiser step (`groups_per_step` groups)
    are yielded `iterations` times in a row, so that every iteration over a rollout batch sees the same prompts; an
    epoch's last prompts that cannot fill a whole step are then left out (as TRL's sampler does), since a partial step
    would shift every later step against its iterations.
    """

    def __init__(self, num_rows: int, repeats: int, seed: int = 0, iterations: int = 1, groups_per_step: int = 1):
        self.num_rows, self.repeats, self.seed = num_rows, repeats, seed
        self.iterations, self.groups_per_step = iterations, groups_per_step
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer at each epoch, for a new, still reproducible order."""
        self.epoch = epoch

    def _steps(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_rows, generator=generator).tolist()
        steps = [order[start : start + self.groups_per_step] for start in range(0, len(order), self.groups_per_step)]
        return [step for step in steps if len(step) == self.groups_per_step] if self.iterations > 1 else steps

    def __iter__(self) -> Iterator[int]:
        for step in self._steps():
            rows = [index for index in step for _ in range(self.repeats)]
            for _ in range(self.iterations):
                yield from rows

    def __len__(self) -> int:
        prompts = (
            self.num_rows if self.iterations == 1 else self.num_rows // self.groups_per_step * self.groups_per_step
        )
        return prompts * self.repeats * self.iterations


class DDRLCollator:
    """Batches rows into `{"prompts": [...], "ref_latents": (B, ...) or None, "columns": {name: [...]}}`.

    `ref_latents` is None for rows without encoded references (prompt-only data, trained with `data_beta=0`);
    `columns` holds every other dataset column, passed on to the reward functions.
    """

    def __init__(self, prompt_column: str):
        self.prompt_column = prompt_column

    def __call__(self, rows: Sequence[dict]) -> dict:
        latents = None
        if REF_LATENTS_COLUMN in rows[0]:
            latents = torch.stack(
                [torch.as_tensor(np.asarray(r[REF_LATENTS_COLUMN]), dtype=torch.float32) for r in rows]
            )
        extra = [k for k in rows[0] if k not in (self.prompt_column, REF_LATENTS_COLUMN)]
        return {
            "prompts": [r[self.prompt_column] for r in rows],
            "ref_latents": latents,
            "columns": {k: [r[k] for r in rows] for k in extra},
        }
