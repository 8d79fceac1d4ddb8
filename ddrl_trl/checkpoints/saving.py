"""How `DDRLTrainer` saves and resumes: diffusers-format weights, an optional EMA, and checkpoints that are never
half-written.

- `save_model` / checkpoints write `pytorch_lora_weights.safetensors` (LoRA, with its config in the file's metadata,
  so plain `load_lora_weights` reloads it at its trained strength) or `<dir>/<denoiser>/` (full), as the model
  family's pipeline reloads them, plus `ddrl_run.json` (`resume.py`); each file is staged and renamed into place
  (`atomic_directory_update`). Non-finite weights are never written.
- With `ema_decay`, diffusers' `EMAModel` keeps an exponential moving average of the trained weights; checkpoints hold
  it (`ema_state.pt`) next to the raw weights, resume restores both, and the final `save_model` writes the EMA weights.
- A whole checkpoint (weights, optimizer, scheduler, RNG states, trainer state with the data position; between the
  `num_iterations` steps over one rollout batch, each process's batch too) is written
  into a staging folder and renamed to `checkpoint-N` only when complete, so a run killed mid-save leaves the previous
  checkpoint as the newest one `resume_from_checkpoint=True` finds.
- Resuming reads every file through a check that names the file and the checkpoint when it is damaged, and refuses
  non-finite weights or optimizer state.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable

import torch
from diffusers.training_utils import EMAModel
from peft import get_peft_model_state_dict
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .resume import RUN_INFO_NAME, needs_rollout_buffer, rollout_buffer_name, run_info, saved_progress
from .weight_files import (
    CheckpointError,
    NonFiniteWeightsError,
    atomic_directory_update,
    first_non_finite,
    load_checkpoint_file,
    load_full_denoiser,
    load_lora_into_denoiser,
)

logger = logging.getLogger(__name__)

EMA_STATE_NAME = "ema_state.pt"
#: Where a checkpoint is assembled before it is renamed to `checkpoint-N` (ignored by `get_last_checkpoint`).
STAGING_DIR = ".tmp-checkpoint"
TRAINER_STATE_NAME = "trainer_state.json"


class _EMAUpdate(TrainerCallback):
    """Advances the EMA (`ema()`: restoring the last good weights starts a new one) of `parameters()` after every
    optimiser step that `nonfinite_guard` and the `accelerator` (an fp16 overflow) did not skip."""

    def __init__(self, ema: Callable[[], EMAModel], parameters: Callable[[], list], nonfinite_guard, accelerator):
        self.ema, self.parameters, self.nonfinite_guard, self.accelerator = (
            ema,
            parameters,
            nonfinite_guard,
            accelerator,
        )

    def on_step_end(self, args, state, control, **kwargs):
        skipped = self.nonfinite_guard.skipped_last_step or self.accelerator.optimizer_step_was_skipped
        if not skipped:  # a skipped step (non-finite, or an fp16 overflow) changed nothing to average in
            self.ema().step(self.parameters())


class SavingMixin:
    """Saving, checkpointing and resuming for `DDRLTrainer` (needs `adapter`, `is_lora`, `args`, `state`)."""

    ema: EMAModel | None = None
    _checkpoint_root: str | None = None
    #: The step of the weights in the model when they are not the last step's (`restore_last_good`), else None.
    restored_step: int | None = None

    @property
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.adapter.denoiser.parameters() if p.requires_grad]

    def _setup_ema(self) -> None:
        """Start the EMA of the trained weights (`ema_decay`), updated by a callback after each optimiser step."""
        if self.args.ema_decay is None:
            return
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError(
                "ema_decay is not supported with FSDP or DeepSpeed: the EMA would average sharded parameters. Use DDP "
                "(plain `accelerate launch --multi_gpu`) or set ema_decay=None."
            )
        self.ema = EMAModel(self.trainable_parameters, decay=self.args.ema_decay)
        self.add_callback(
            _EMAUpdate(lambda: self.ema, lambda: self.trainable_parameters, self.nonfinite_guard, self.accelerator)
        )

    # ------------------------------------------------------------------------------------------------ weights
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Write diffusers-format weights: `pytorch_lora_weights.safetensors` (LoRA) or `<output_dir>/<denoiser>/`.

        Checkpoints get the raw weights and the EMA state; a final save with `ema_decay` gets the EMA weights.
        """
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        in_checkpoint = self._checkpoint_root is not None
        with atomic_directory_update(output_dir) as staging:
            if self.ema is not None and not in_checkpoint:
                self.ema.store(self.trainable_parameters)
                self.ema.copy_to(self.trainable_parameters)
            try:
                # Under FSDP / DeepSpeed, Trainer.save_model gathers the sharded weights into `state_dict` first.
                if self.is_lora:
                    lora = get_peft_model_state_dict(self.adapter.denoiser, state_dict=state_dict)
                    metadata = self.adapter.denoiser.peft_config["default"].to_dict()
                    self.adapter.save_lora_weights(staging, lora, adapter_metadata=metadata)
                else:
                    self.adapter.save_denoiser(staging, state_dict=state_dict)
            finally:
                if self.ema is not None and not in_checkpoint:
                    self.ema.restore(self.trainable_parameters)
            if self.ema is not None and in_checkpoint:
                torch.save(self.ema.state_dict(), os.path.join(staging, EMA_STATE_NAME))
            torch.save(self.args, os.path.join(staging, "training_args.bin"))
            with open(os.path.join(staging, RUN_INFO_NAME), "w", encoding="utf-8") as file:
                json.dump(run_info(self), file, indent=2)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model` (also the checkpoints' and the hacking monitor's), refused on every process, before
        anything is written, if any process holds a non-finite weight: a diverged model never replaces saved work."""
        trainable = dict(self.adapter.denoiser.named_parameters())
        bad = first_non_finite(
            (n, getattr(p, "ds_tensor", p).detach()) for n, p in trainable.items() if p.requires_grad
        )
        flag = torch.tensor([0.0 if bad is None else 1.0], device=self.accelerator.device)
        if self.accelerator.gather(flag).max() > 0:
            where = f"the weight {bad!r}" if bad is not None else "a weight on another process"
            raise NonFiniteWeightsError(
                f"Refusing to save to {output_dir or self.args.output_dir}: {where} holds NaN or ±inf. Saved weights "
                "and checkpoints are never overwritten with a diverged model; lower learning_rate and resume from "
                "the last checkpoint."
            )
        super().save_model(output_dir, _internal_call)

    def restore_last_good(self, folder: str, step: int) -> int:
        """Load the weights a `HackingMonitorCallback` kept in `folder` as the last good ones (of `step`) into the
        model, so that `save_model` and `push_to_hub` write those and not the hacked final ones; returns `step`. With
        an EMA, the kept weights are the EMA's (a final save writes those), and the average restarts from them."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                "The last good weights cannot be loaded into a DeepSpeed / FSDP-sharded model: use the files in "
                f"{folder} as the output."
            )
        self._load_from_checkpoint_weights(folder)
        if self.ema is not None:
            self.ema = EMAModel(self.trainable_parameters, decay=self.args.ema_decay)
        self.restored_step = step
        return step

    def _load_from_checkpoint_weights(self, folder: str) -> None:
        """The trained weights saved in `folder` (a checkpoint, or `save_model`'s output), into the denoiser."""
        if self.is_lora:
            load_lora_into_denoiser(self.adapter.denoiser, folder, self.adapter.denoiser_name)
        else:
            load_full_denoiser(self.adapter.denoiser, folder, self.adapter.denoiser_name)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self._load_from_checkpoint_weights(resume_from_checkpoint)
        if self.ema is not None:
            path = os.path.join(resume_from_checkpoint, EMA_STATE_NAME)
            if not os.path.isfile(path):
                raise CheckpointError(
                    f"{resume_from_checkpoint} has no {EMA_STATE_NAME}: it was written without ema_decay, so the EMA "
                    f"cannot be resumed. Resume with ema_decay=None, or start a new run."
                )
            self.ema.load_state_dict(load_checkpoint_file(path, resume_from_checkpoint))
            self.ema.to(device=self.trainable_parameters[0].device)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Trainer's loading, after checking the weights now loaded (from any backend) are finite; a damaged optimizer
        or scheduler file is reported by name, and a non-finite optimizer state is refused."""
        if checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        bad = first_non_finite((n, p.detach()) for n, p in self.adapter.denoiser.named_parameters())
        if bad is not None:
            raise CheckpointError(
                f"Checkpoint {checkpoint} holds non-finite weights ({bad!r}); resume from an earlier one."
            )
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except Exception as err:
            for name in ("optimizer.pt", "scheduler.pt"):
                path = os.path.join(checkpoint, name)
                if os.path.isfile(path):
                    load_checkpoint_file(path, checkpoint)  # raises CheckpointError naming the damaged file
            raise CheckpointError(
                f"Cannot load the optimizer or scheduler state of checkpoint {checkpoint}: {err}"
            ) from err
        tensors = (
            (f"state of parameter {i}", v)
            for i, state in enumerate(self.optimizer.state.values())
            for v in state.values()
            if isinstance(v, torch.Tensor)
        )
        bad = first_non_finite(tensors)
        if bad is not None:
            raise CheckpointError(
                f"The optimizer state in checkpoint {checkpoint} is non-finite ({bad}); resume from "
                f"an earlier checkpoint."
            )
        if saved_progress(checkpoint)[1] != self.state.max_steps:
            self._continue_schedule_at_new_length()

    def _continue_schedule_at_new_length(self) -> None:
        """After resuming a run with another length (`max_steps`), set the learning rate to the new schedule's value
        at the resumed step. The scheduler's state restores the step count and keeps the new length's schedule, but
        the optimizer's saved learning rate is the old schedule's (0 at the end of a linear decay), which the first
        resumed step would otherwise train at."""
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)  # accelerate may wrap it
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):  # every schedule of `get_scheduler` is one
            logger.warning(
                "The run's length changed but its %s cannot be rebuilt: the first resumed step trains at the saved "
                "learning rate.",
                type(scheduler).__name__,
            )
            return
        rates = [base * factor(scheduler.last_epoch) for factor, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
        for group, rate in zip(self.optimizer.param_groups, rates):
            group["lr"] = rate
        scheduler._last_lr = rates  # what get_last_lr() (and the logged learning_rate) report

    def _load_rng_state(self, checkpoint: str | None) -> None:
        try:
            super()._load_rng_state(checkpoint)
        except Exception as err:
            name = f"rng_state_{self.args.process_index}.pth" if self.args.world_size > 1 else "rng_state.pth"
            raise CheckpointError(
                f"{os.path.join(checkpoint, name)} in checkpoint {checkpoint} is unreadable ({err}): the file is "
                f"truncated or corrupt. Resume from an earlier checkpoint-N."
            ) from err

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _get_output_dir(self, trial) -> str:
        return self._checkpoint_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, assembled in `<output_dir>/.tmp-checkpoint/` by every process, then renamed to
        `checkpoint-N` by the main process once complete (a rename is atomic)."""
        run_dir = super()._get_output_dir(trial)
        staging_root = os.path.join(run_dir, STAGING_DIR)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)  # what a run killed mid-save left behind
            os.makedirs(staging_root)
        self.accelerator.wait_for_everyone()
        self._checkpoint_root = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_root = None
        if needs_rollout_buffer(self.state.global_step, self.args.num_iterations):  # every process, its own batch
            torch.save(
                {micro: saved.to_dict() for micro, saved in self.rollouts.buffer.items()},
                os.path.join(staging_root, name, rollout_buffer_name(self.args.process_index)),
            )
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
            if self.state.best_model_checkpoint == staged:
                self.state.best_model_checkpoint = final
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
            if os.path.isdir(final):  # the same step saved again: the new one replaces it
                shutil.move(final, os.path.join(staging_root, "replaced"))
            os.replace(staged, final)
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()
