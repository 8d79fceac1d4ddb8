"""The training metrics DDRL adds to the `Trainer`'s logs (docs/metrics.md): recorded during the steps, averaged
since the last log, then over processes."""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import torch

from ..core import AggregatedRewards, group_reward_std

logger = logging.getLogger(__name__)


class TrainingMetrics:
    """Values recorded since the last log, per metric name; `drain` averages and clears them.

    Values may be device tensors (losses, ratios): they are only moved to the host when logged, once for all metrics,
    so recording adds no host-device round trip to a step.
    """

    def __init__(self):
        self._values: dict[str, list] = defaultdict(list)
        self._from_rewards: dict[str, list[float]] = defaultdict(list)
        self._warned_log_extra = False
        self._images, self._clock = 0, time.perf_counter()

    def restart_clock(self) -> None:
        """Start timing the images/s window now (at `train()`)."""
        self._images, self._clock = 0, time.perf_counter()

    def log_metric(self, name: str, value: float) -> None:
        """The `log_metric` keyword rewards receive (as in TRL): `name` is logged as its mean since the last log on
        the main process (rewards may log different names on different processes, so these are not gathered)."""
        self._from_rewards[name].append(float(value))

    def log_extra(self, column: str, values: list) -> None:
        """The `log_extra` keyword rewards receive (as in TRL, where it adds a column to the completions table):
        ddrl-trl keeps no completions table, so the values are not recorded; said once."""
        if not self._warned_log_extra:
            logger.info(
                "A reward called log_extra(%r, ...): ddrl-trl keeps no completions table, so extra columns are "
                "not recorded (log_metric is).",
                column,
            )
            self._warned_log_extra = True

    def add_rollout_times(self, times, rows: int) -> None:
        """`time/rollout` and `time/reward` (what the trainer waited for rewards) of a micro-step that rolled out
        `rows` samples on this process, counted for `images_per_second`."""
        self.add("time/rollout", times.rollout)
        self.add("time/reward", times.reward_wait)
        self._images += rows

    def add(self, name: str, value: torch.Tensor | float) -> None:
        self._values[name].append(value)

    def add_rewards(
        self, per_func: torch.Tensor, combined: AggregatedRewards, names: list[str], num_generations: int
    ) -> None:
        """`reward` (mean of the valid weighted sums of the rewards), `reward_std` (the std the advantages were
        divided by), as TRL logs them, and per function its mean and its count of invalid (None, NaN, ±inf) scores."""
        valid = torch.isfinite(combined.weighted_sum)
        if valid.any():
            self.add("reward", combined.weighted_sum[valid].mean().item())
        stds = group_reward_std(combined.rewards, num_generations, combined.scale_rewards, combined.reward_clip)
        self.add("reward_std", stds.mean().item())
        for name, column in zip(names, per_func.unbind(dim=1)):
            ok = torch.isfinite(column)
            if ok.any():
                self.add(f"rewards/{name}/mean", column[ok].mean().item())
            self.add(f"rewards/{name}/invalid", float((~ok).sum()))

    def add_step(
        self,
        data: torch.Tensor | None,
        kl: torch.Tensor | None,
        policy: torch.Tensor,
        ratio: torch.Tensor,
        clipped: torch.Tensor,
    ) -> None:
        """The loss terms of one trained step (`data`/`kl` None when that term is off at this step)."""
        if data is not None:
            self.add("loss/data", data.detach())
        if kl is not None:
            self.add("loss/kl", kl.detach())
        self.add("loss/policy", policy.detach())
        self.add("ratio/mean", ratio.mean())
        self.add("clip_fraction", clipped.float().mean())

    def drain(self, accelerator) -> dict[str, float]:
        """Each metric's mean since the last call, averaged over processes, and `images_per_second` (samples rolled
        out by all processes over the wall-clock time since the last call); then forget them.

        Every process records the same keys in the same order, so one gather averages them all: per-process losses
        are means over equal row counts, so their average is the global batch's.
        """
        now = time.perf_counter()
        if self._images:
            self.add("images_per_second", self._images / max(now - self._clock, 1e-9) * accelerator.num_processes)
        self._images, self._clock = 0, now
        keys = [key for key, values in self._values.items() if values]
        result = {}
        if keys:
            device = accelerator.device
            means = torch.stack(
                [
                    torch.stack(
                        [torch.as_tensor(v, dtype=torch.float32, device=device) for v in self._values[key]]
                    ).mean()
                    for key in keys
                ]
            )
            result = dict(zip(keys, accelerator.gather(means[None]).mean(dim=0).tolist()))
        self._values.clear()
        if accelerator.is_main_process:
            result.update({name: sum(values) / len(values) for name, values in self._from_rewards.items() if values})
        self._from_rewards.clear()
        return result
