"""Non-finite numbers never reach the weights: an optimiser step whose loss or gradients hold NaN or ±inf is skipped.

A NaN that reaches an optimiser step turns every trained weight into NaN, and everything after it (the logged loss
included, which `logging_nan_inf_filter` hides) goes on as if nothing happened. `NonFiniteStepGuard` checks, once
per optimiser step, that every loss since the last step and every gradient is finite; if not, it drops the
gradients (the optimiser then leaves the weights and its own state as they were), warns, counts the step, and stops
training with `NonFiniteTrainingError` after `max_consecutive_nonfinite_steps` skipped steps in a row. A `train()`
call whose every optimiser step was skipped (fewer of them than that limit) trained nothing: it ends with the same
error instead of returning as if it had succeeded.

- fp16 with a gradient scaler: overflowing gradients are the scaler's business (it skips those steps and lowers its
  scale, routinely at the start of a run), so only non-finite losses count here.
- DeepSpeed applies the update inside the last backward of a rollout batch: there a non-finite loss stops training
  just before that backward. Non-finite gradients are skipped by DeepSpeed itself in ZeRO-1/2 (its overflow check,
  with gradient clipping or bf16); ZeRO-3 in bf16/fp32 applies them, so after every step the weights are checked, and
  the first non-finite one stops training before any save.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from transformers import TrainerCallback

from ..errors import NonFiniteTrainingError  # noqa: F401 — raised here, imported from here too

logger = logging.getLogger(__name__)


def all_finite(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A device bool: every value of `tensors` finite (fused norms: a NaN or inf anywhere makes its norm
    non-finite)."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.isfinite(torch.stack(torch._foreach_norm([t.float() for t in tensors]))).all().to(device)


class NonFiniteStepGuard(TrainerCallback):
    """Skip optimiser steps with non-finite losses or gradients; stop after `max_in_a_row` of them in a row.

    The trainer calls `record_loss` with every loss it back-propagates (a device-side AND, no host sync); the check
    itself runs in `on_pre_optimizer_step`, once per optimiser step, and its verdict is agreed across processes so
    that all of them skip the same steps.

    Args:
        accelerator: agrees the verdict across processes; its fp16 scaler, if any, skips overflowing gradients.
        parameters: returns the trained parameters (whose gradients are checked, and dropped on a skipped step).
        max_in_a_row: skipped steps in a row after which training stops.
        deepspeed: the DeepSpeed engine steps inside backward (`check_before_deepspeed_step`).
    """

    def __init__(
        self,
        accelerator,
        parameters: Callable[[], list[torch.nn.Parameter]],
        max_in_a_row: int,
        deepspeed: bool = False,
    ):
        self.accelerator, self.parameters, self.max_in_a_row, self.deepspeed = (
            accelerator,
            parameters,
            max_in_a_row,
            deepspeed,
        )
        #: Optimiser steps skipped since `train()` started, and in a row up to the last step.
        self.skipped_steps, self.in_a_row = 0, 0
        #: Optimiser steps checked since `train()` started (skipped or not), and the first one's number.
        self.checked_steps, self.first_step = 0, None
        #: Whether the last optimiser step was skipped (the EMA does not advance on it).
        self.skipped_last_step = False
        self._losses_finite: torch.Tensor | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.skipped_steps, self.in_a_row, self.skipped_last_step, self._losses_finite = 0, 0, False, None
        self.checked_steps, self.first_step = 0, None

    def record_loss(self, loss: torch.Tensor) -> None:
        """Remember whether `loss` is finite, on the device (no host sync in the training loop)."""
        finite = torch.isfinite(loss.detach()).all()
        self._losses_finite = finite if self._losses_finite is None else self._losses_finite & finite

    def _agreed(self, local: torch.Tensor) -> bool:
        """`local` (a device bool) on every process."""
        return bool(self.accelerator.gather(local.float()[None]).min() > 0)

    def _losses_ok(self) -> torch.Tensor:
        device = self.accelerator.device
        finite = self._losses_finite if self._losses_finite is not None else torch.ones((), dtype=torch.bool)
        self._losses_finite = None
        return finite.to(device)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.deepspeed:  # the engine has already stepped (see `check_before_deepspeed_step`)
            return
        finite = self._losses_ok()
        if self.accelerator.scaler is None:  # with an fp16 scaler, overflowing gradients are its to skip
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            finite = finite & all_finite(grads, finite.device)
        self.checked_steps += 1
        if self.first_step is None:
            self.first_step = state.global_step + 1
        if self._agreed(finite):
            self.in_a_row, self.skipped_last_step = 0, False
            return
        for param in self.parameters():
            param.grad = None  # torch optimisers skip parameters without a gradient: weights and state unchanged
        self.skipped_steps, self.in_a_row, self.skipped_last_step = self.skipped_steps + 1, self.in_a_row + 1, True
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteTrainingError(
                f"{self.in_a_row} optimiser steps in a row (up to step {state.global_step + 1}) had non-finite (NaN "
                "or infinite) losses or gradients; all were skipped, and training stops so that a diverged run "
                "writes no more checkpoints. The weights are those of the last finite step. Lower learning_rate, "
                "check the rewards and reference data for extreme values, or train in float32 instead of fp16."
            )
        logger.warning(
            "Step %d: non-finite (NaN or infinite) loss or gradients; the optimiser step is skipped (weights "
            "unchanged; %d skipped in a row, training stops at %d).",
            state.global_step + 1,
            self.in_a_row,
            self.max_in_a_row,
        )

    def on_train_end(self, args, state, control, **kwargs):
        if self.checked_steps and self.skipped_steps == self.checked_steps:
            steps = (
                f"step {self.first_step}"
                if self.checked_steps == 1
                else f"steps {self.first_step} to {self.first_step + self.checked_steps - 1}"
            )
            raise NonFiniteTrainingError(
                f"Nothing was trained: all {self.checked_steps} optimiser step(s) of this train() call ({steps}) had "
                "non-finite (NaN or infinite) losses or gradients and were skipped, so the weights are still those "
                "training started from (fewer steps than max_consecutive_nonfinite_steps="
                f"{self.max_in_a_row}, which stops a run sooner). Lower learning_rate, check the rewards and "
                "reference data for extreme values, or train in float32 instead of fp16."
            )

    def check_before_deepspeed_step(self, step: int) -> None:
        """Under DeepSpeed, called just before the backward that makes the engine step: raise if any loss of the
        rollout batch was non-finite, before the update is applied."""
        if not self._agreed(self._losses_ok()):
            raise NonFiniteTrainingError(
                f"Step {step}: a non-finite (NaN or infinite) loss under DeepSpeed, whose engine applies the update "
                f"inside backward, so the step cannot be skipped; training stops before applying it. Lower "
                f"learning_rate, or check the rewards and reference data for extreme values."
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.deepspeed and not self._agreed(weights_finite(self.parameters(), self.accelerator.device)):
            raise NonFiniteTrainingError(
                f"Step {state.global_step}: the weights became non-finite (NaN or infinite) under DeepSpeed, which "
                "applied non-finite gradients (ZeRO-3 in bf16/fp32 does not skip them). Training stops before they "
                "are saved; resume from the last checkpoint with a lower learning_rate."
            )


def weights_finite(parameters: list[torch.nn.Parameter], device: torch.device) -> torch.Tensor:
    """A device bool: this process's trained weights (its shards, under DeepSpeed ZeRO-3) are all finite."""
    return all_finite([getattr(p, "ds_tensor", p).detach() for p in parameters], device)
