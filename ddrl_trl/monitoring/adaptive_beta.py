"""Adaptive `data_beta` in the training loop (`DDRLConfig.target_loss_ratio`): measures the controller's signal at
every trained step, agrees on it across processes once per optimiser step, and updates β
(`core.data_beta.AdaptiveDataBeta` has the math).

The signal is paired and costs one no-grad forward of the data rows through the base model per trained step (1/N of
the policy's rows; with LoRA the adapter is switched off, no copy): the policy's diffusion loss on the noised
references of the step against the base model's on the same inputs. It is measured on the training references at the
rollouts' noise levels, so it is cheap enough for every step but is not the held-out ratio; `evaluate()` reports that
(docs/concepts.md).
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import TrainerCallback

from ..checkpoints.resume import DATA_BETA_STATE_KEY as STATE_KEY
from ..checkpoints.resume import RUN_INFO_NAME
from ..core.data_beta import AdaptiveDataBeta
from ..errors import CheckpointError

logger = logging.getLogger(__name__)


class DataBetaControl(TrainerCallback):
    """Feeds `AdaptiveDataBeta` the per-step loss ratio and applies its β from the next optimiser step on.

    The trainer calls `record` with the weighted sums of the policy's and the base model's data-term losses of each
    trained step (device tensors: no host sync inside the step); `on_step_end` sums them over micro-steps and
    processes — one gather per optimiser step — so every process computes the same ratio and the same β. A step the
    non-finite guard skipped does not update it.

    Args:
        controller: the controller, starting at `args.data_beta`.
        accelerator: sums the losses over processes.
        metrics: where the measured ratio is logged (`data_beta/loss_ratio`).
        nonfinite_guard: says whether the step was skipped.
    """

    def __init__(self, controller: AdaptiveDataBeta, accelerator, metrics, nonfinite_guard):
        self.controller, self.accelerator = controller, accelerator
        self.metrics, self.nonfinite_guard = metrics, nonfinite_guard
        self._sums: torch.Tensor | None = None

    @property
    def value(self) -> float:
        """β for the current optimiser step."""
        return self.controller.value

    def record(self, policy_loss_sum: torch.Tensor, base_loss_sum: torch.Tensor) -> None:
        """Add one trained step's Σ w·L_data of the policy and of the base model on the same rows."""
        sums = torch.stack([policy_loss_sum.detach().float(), base_loss_sum.detach().float()])
        self._sums = sums if self._sums is None else self._sums + sums

    def on_train_begin(self, args, state, control, **kwargs):
        self._sums = None

    def on_step_end(self, args, state, control, **kwargs):
        local = self._sums if self._sums is not None else torch.zeros(2)
        self._sums = None
        total = self.accelerator.reduce(local.to(self.accelerator.device), reduction="sum").cpu()
        ratio = (total[0] / total[1]).item() if total[1] > 0 else float("nan")
        if self.nonfinite_guard.skipped_last_step:  # nothing was applied: neither is the signal
            return
        self.metrics.add("data_beta/loss_ratio", ratio)
        self.controller.update(ratio)

    def state_dict(self) -> dict:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict | None, checkpoint: str) -> None:
        """Restore the controller from a checkpoint's `ddrl_run.json`; without a saved state (a checkpoint written
        without `target_loss_ratio`) it starts again from `data_beta`, with a warning. A damaged state (not a
        controller's, a string or a negative number where β belongs) raises `CheckpointError` naming the file and
        the checkpoint."""
        if state is None:
            logger.warning(
                "Checkpoint %s holds no adaptive data_beta state (it was written without target_loss_ratio): the "
                "controller starts again from data_beta=%g.",
                checkpoint,
                self.controller.value,
            )
            return
        try:
            self.controller.load_state_dict(state)
        except ValueError as err:
            path = os.path.join(checkpoint, RUN_INFO_NAME)
            raise CheckpointError(
                f"{path} in checkpoint {checkpoint} holds a damaged adaptive data_beta state ({STATE_KEY}: {err}). "
                f"Resume from an earlier checkpoint-N."
            ) from err
