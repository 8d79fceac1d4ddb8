"""On-policy group rollouts with the recorded states and float32 log-probs the policy term needs, and their scoring
(optionally overlapped: chunk k is scored in the background while chunk k+1 is rolled out).

All randomness of a micro-step is a pure function of (seed, the optimiser step that rolled the batch out, micro-step
within that step, global row): `SeededNoise`
gives each row its own seeded streams, so a rollout does not depend on how rows are split across processes or chunks,
and no two rows (on any process) share noise unless `same_noise_within_group` asks for it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the policy samples with the noise and returns the rollouts defined here
    from .policy import Conditions, Policy


def stable_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a fixed function of `parts` (Python's `hash` is salted per process)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class SeededNoise:
    """Seeded noise drawn per row or group on `device` (no host round trip): each (kind, index) has its own stream.

    For a micro-step's rollouts `seed` comes from (`DDRLConfig.seed`, the optimiser step that rolled the batch out —
    the first of its `num_iterations` —, the micro-step's index within it), and rows are global row indices;
    evaluation uses it with held-out sample indices.

    Args:
        seed: the base seed.
        num_generations: N, to find a row's group.
        same_noise_within_group: all rows of a group start from their group's initial noise.
    """

    def __init__(self, seed: int, device: torch.device, num_generations: int, same_noise_within_group: bool = False):
        self.seed, self.device = seed, device
        self.num_generations, self.same_noise_within_group = num_generations, same_noise_within_group

    def generator(self, kind: str, index: int) -> torch.Generator:
        """A generator for stream `kind` of row or group `index`."""
        return torch.Generator(device=self.device).manual_seed(stable_seed(self.seed, kind, index))

    def draw(self, generators: Sequence[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
        """One standard-normal sample of `shape` from each generator, stacked: `(len(generators), *shape)`."""
        return torch.stack([torch.randn(shape, generator=g, device=self.device) for g in generators])

    def draw_for(self, kind: str, indices: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
        """The first sample of `shape` of stream `kind` for each of `indices`, stacked."""
        return self.draw([self.generator(kind, i) for i in indices], shape)

    def initial(self, rows: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
        """x_T of global `rows` `(len(rows), *shape)`: per row, or per group with `same_noise_within_group`."""
        if self.same_noise_within_group:
            return self.draw_for("group-initial", [r // self.num_generations for r in rows], shape)
        return self.draw_for("initial", rows, shape)

    def group_noise(self, groups: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
        """Fresh noise per group (the data term's `data_noise="random"`)."""
        return self.draw_for("data", groups, shape)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on an accelerator (for phase timings); nothing to wait for on the CPU."""
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and hasattr(backend, "synchronize"):
        backend.synchronize(device)


@dataclass
class Rollout:
    """A batch of `B` trajectories x_T → x_0 (sampling order: index 0 is pure noise).

    Attributes:
        states: `(B, T+1, *latent)` float32 states; `states[:, j]` is the input of step j, `states[:, j+1]` its output.
        log_probs: `(B, T)` float32 log p_old(x_{j+1} | x_j), mean over latent dimensions.
        images: `(B, 3, H, W)` (or videos `(B, F, 3, H, W)`) float32 decoded samples in [0, 1]; None for a batch
            reused from an earlier iteration (`SavedRollout`).
    """

    states: torch.Tensor
    log_probs: torch.Tensor
    images: torch.Tensor | None

    @property
    def initial_noise(self) -> torch.Tensor:
        return self.states[:, 0]

    @classmethod
    def concat(cls, parts: list[Rollout]) -> Rollout:
        """One rollout of the rows of `parts`, in order."""
        if len(parts) == 1:
            return parts[0]
        return cls(*(torch.cat([getattr(p, name) for p in parts]) for name in ("states", "log_probs", "images")))


@dataclass
class SavedRollout:
    """What the later iterations over a rollout batch reuse (`DDRLConfig.num_iterations`), and what a checkpoint
    taken between them holds: one process's rollout states, their log-probs under the rollout policy (the "old" ones
    of the ratio) and their advantages, with the prompts and global rows they belong to."""

    states: torch.Tensor
    log_probs: torch.Tensor
    advantages: torch.Tensor
    prompts: list[str]
    rows: list[int]

    def to_dict(self) -> dict:
        return {
            "states": self.states.cpu(),
            "log_probs": self.log_probs.cpu(),
            "advantages": self.advantages.cpu(),
            "prompts": list(self.prompts),
            "rows": list(self.rows),
        }

    @classmethod
    def from_dict(cls, values: dict, device: torch.device) -> SavedRollout:
        tensors = {k: values[k].to(device) for k in ("states", "log_probs", "advantages")}
        return cls(**tensors, prompts=list(values["prompts"]), rows=[int(r) for r in values["rows"]])


@dataclass
class PhaseTimes:
    """Seconds a micro-step spent rolling out, and waiting for rewards (all of scoring, or only what overlapping
    with the rollout did not hide)."""

    rollout: float = 0.0
    reward_wait: float = 0.0


def rollout_and_score(
    policy: Policy,
    conditions: Conditions,
    noise: SeededNoise,
    rows: Sequence[int],
    score: Callable[[torch.Tensor, slice], torch.Tensor],
    chunk_rows: int | None = None,
    executor: Executor | None = None,
) -> tuple[Rollout, torch.Tensor, PhaseTimes]:
    """Roll out global `rows` with `policy` (per-row `conditions`, `Policy.rollout`) and score the samples: returns
    `(rollout, scores, times)`.

    Rows are rolled out `chunk_rows` at a time (None: all at once). `score(samples, local_rows)` gets each chunk's
    samples and their slice of the local batch and returns `(rows, F)` scores. With an `executor`, each chunk is
    scored there while the next one is rolled out, so a slow reward overlaps generation; results do not depend on it.
    The device is synchronised once per chunk, for the timings.
    """
    chunk = chunk_rows or len(rows)
    parts, scores, times = [], [], PhaseTimes()
    for start in range(0, len(rows), chunk):
        local = slice(start, min(start + chunk, len(rows)))
        began = time.perf_counter()
        part = policy.rollout(conditions.select(local), noise, rows[local])
        synchronize(part.states.device)
        rolled = time.perf_counter()
        scores.append(
            executor.submit(score, part.images, local) if executor is not None else score(part.images, local)
        )
        times.rollout += rolled - began
        times.reward_wait += time.perf_counter() - rolled
        parts.append(part)
    if executor is not None:
        waiting = time.perf_counter()
        scores = [future.result() for future in scores]
        times.reward_wait += time.perf_counter() - waiting
    return Rollout.concat(parts), torch.cat(scores), times
