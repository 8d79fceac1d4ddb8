"""`DDRLTrainer`: orchestrates one DDRL iteration — rollout → reward → advantage → loss → step.

The math lives elsewhere (`core`, `samplers`), one step's parts in `step` (rollouts, the rollout batch collector,
the policy's forward, the data term, the reference policy, metrics), the model-family specifics in `adapters`, the
rewards in `rewards`, the reference data in `data`; what the trainer measures and reports (held-out loss,
validation, the hacking monitor, the adaptive data_beta, logs, model card) in `monitoring`, saving and resuming in
`checkpoints`. This file wires them into `transformers.Trainer`, which keeps providing the optimiser, LR schedule,
gradient clipping, accumulation, logging, callbacks, checkpoints and multi-device launch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import Trainer, TrainerState

from .adapters import PipelineAdapter, get_adapter
from .adapters.preparation import load_pipeline, prepare_for_training
from .checkpoints.resume import (
    check_same_run,
    load_rollout_buffer,
    prepare_output_dir,
    resolve_checkpoint,
    run_info,
    saved_progress,
    verify_checkpoint,
)
from .checkpoints.saving import SavingMixin
from .config import DDRLConfig
from .core import (
    clipped_policy_loss,
    diffusion_loss,
    reverse_kl_loss,
)
from .core.data_beta import AdaptiveDataBeta
from .data import (
    DDRLCollator,
    RepeatSampler,
    encode_reference_dataset,
    with_prompt_column,
)
from .inputs import check_inputs
from .monitoring.adaptive_beta import STATE_KEY, DataBetaControl
from .monitoring.guards import NonFiniteStepGuard
from .monitoring.hacking_monitor import HackingMonitorCallback
from .monitoring.held_out import HeldOutEvaluator
from .monitoring.reporting import ReportingMixin
from .monitoring.validation import ValidationCallback, ValidationPrompts, Validator
from .rewards import compute_rewards
from .step.collector import RolloutBatch, RolloutCollector
from .step.data_term import DataTermBatch
from .step.metrics import TrainingMetrics
from .step.policy import ExtraRows, predict_policy
from .step.reference import ReferencePolicy
from .step.rollout import synchronize

logger = logging.getLogger(__name__)


@dataclass
class StepTerms:
    """The loss of one trained denoising step and its parts (for the metrics)."""

    loss: torch.Tensor
    policy: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor
    data: torch.Tensor | None = None
    kl: torch.Tensor | None = None


class DDRLTrainer(ReportingMixin, SavingMixin, Trainer):
    """Trainer for Data-regularized Diffusion Reinforcement Learning (DDRL, arXiv 2512.04332).

    Each optimiser step rolls out `num_generations` samples per prompt with the current policy (stochastic sampler,
    float32 log-probs), scores them with `reward_funcs`, turns rewards into group-relative advantages, and for each
    trained denoising step j back-propagates

        loss_j = L_pg (PPO-clipped) + data_beta · L_data (diffusion loss on the paired reference) + kl_beta · L_kl.

    The data sample shares the denoiser forward of the rollout states (one forward and one backward per trained step).

    Args:
        model: a diffusers pipeline, or a local path / Hub id loaded with `DiffusionPipeline.from_pretrained` (with
            `args.model_init_kwargs`).
        reward_funcs: a reward callable, in TRL's form `f(prompts=..., completions=..., trainer_state=..., **columns)`
            (completions: the images), sync or `async def`, or `f(images, prompts, **columns)`, returning one float
            (or None) per sample (e.g. a `RemoteReward`); a string — a built-in name, an import path
            (`"module:function"` or `"module.function"`), or a Hub id / local path of a reward model (`load_reward`);
            or a list of these, combined with `args.reward_weights` and `args.multi_objective_aggregation`
            (docs/rewards.md).
        args: a `DDRLConfig`.
        train_dataset: a `datasets.Dataset` with a prompt column (`prompt_column`; by default "prompt", else
            diffusers' "text" or "caption") and, for the data term (`data_beta` > 0), a paired reference column;
            with `data_beta=0` (plain GRPO) prompts alone will do.
        eval_dataset: held-out data of the same form, for `eval_diffusion_loss` and its ratio to the base model; its
            first `num_validation_prompts` rows give the validation prompts unless `args.validation_prompts` is set.
        peft_config: a `peft.LoraConfig` to train a LoRA adapter; `None` trains the full denoiser.
        eval_reward_funcs: rewards not trained on (same forms as `reward_funcs`) that score the validation samples
            next to the trained ones, logged as `eval_rewards/<name>` (the paper checks that these do not drop).
        callbacks, optimizers: as for `transformers.Trainer`.
    """

    #: Tags of every model card this trainer writes (as TRL's trainers), before the task's and the user's.
    _tag_names = ["ddrl", "trl", "diffusers-training"]

    def __init__(
        self,
        model: Any,
        reward_funcs: Callable | str | Sequence[Callable | str],
        args: DDRLConfig | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | None = None,
        peft_config: LoraConfig | None = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        eval_reward_funcs: Callable | str | Sequence[Callable | str] | None = None,
    ):
        args = args if args is not None else DDRLConfig(output_dir="ddrl-output")
        if not isinstance(args, DDRLConfig):
            raise TypeError(f"args must be a DDRLConfig, got {type(args).__name__}.")

        # ---- cheap checks first: nothing expensive happens before the inputs are known to be usable (`inputs.py`)
        inputs = check_inputs(args, reward_funcs, eval_reward_funcs, train_dataset, eval_dataset, callbacks)
        self.reward_funcs, self.reward_names = inputs.reward_funcs, inputs.reward_names
        self.reward_weights = inputs.reward_weights
        self.eval_reward_funcs, self.eval_reward_names = inputs.eval_reward_funcs, inputs.eval_reward_names
        train_dataset, eval_dataset = inputs.train_dataset, inputs.eval_dataset
        #: Whether the training data's paired references are used: by the data term only (data_beta > 0).
        self.trains_on_references = inputs.trains_on_references
        #: The dataset column with the paired reference samples (`reference_column`, else "image" or "video").
        self.reference_column = inputs.reference_column
        validation_prompts = inputs.validation_prompts
        #: Which training data this run uses (`resume.data_signature`), recorded with every save.
        self.train_data_signature = inputs.train_data_signature

        # ---- the model: its family's adapter, prepared for training (adapters/preparation.py), and the base
        in_memory = not isinstance(model, (str, os.PathLike))
        pipeline = model if in_memory else load_pipeline(model, args)
        #: Hub id or path of the base pipeline, for the model card (None for a pipeline built in memory).
        base_id = getattr(pipeline, "name_or_path", None) if in_memory else model
        self.base_model_id = str(base_id) if base_id else None  # a Path as well
        self.adapter: PipelineAdapter = get_adapter(pipeline)
        self.adapter.configure(args)
        self.resolution = self.adapter.resolution
        self.pipeline = pipeline
        self.latent_shape = self.adapter.latent_shape(self.resolution)
        self.is_lora = prepare_for_training(self.adapter, args, peft_config)
        #: The base model, for the KL term, the adaptive data_beta's signal and the held-out ratio (LoRA disabled, or
        #: a frozen copy when kl_beta > 0 or target_loss_ratio is set).
        keep_copy = args.kl_beta > 0 or args.target_loss_ratio is not None
        self.reference = ReferencePolicy(self.adapter, self.is_lora, keep_copy=keep_copy)
        self.sampler = self.adapter.make_sampler(args, args.device)
        self.trained_steps = args.resolved_train_step_indices

        # ---- one-off work on the data: encode reference images, then check the rewards on real images
        with args.main_process_first(desc="encoding reference images"):
            if self.trains_on_references:  # plain GRPO (data_beta=0) reads none
                train_dataset = self._encode(train_dataset, args, "training")
            if eval_dataset is not None:
                eval_dataset = self._encode(eval_dataset, args, "evaluation")
        self._check_rewards_on(train_dataset, args, validation_prompts)

        super().__init__(
            model=self.adapter.denoiser,
            args=args,
            data_collator=DDRLCollator(args.prompt_column),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        #: DDRL's training metrics since the last log (docs/metrics.md).
        self.metrics = TrainingMetrics()
        #: Makes each micro-step's rollout batch and keeps those later iterations reuse (`step/collector.py`).
        self.rollouts = RolloutCollector(
            self.adapter,
            self.sampler,
            self.latent_shape,
            self.reward_funcs,
            self.reward_names,
            self.reward_weights,
            args,
            self.accelerator,
            self.metrics,
            self.compute_loss_context_manager,
        )
        self.evaluator = HeldOutEvaluator(
            self.adapter,
            self.sampler,
            self.reference,
            args,
            self.accelerator,
            self.compute_loss_context_manager,
            unconditional=self.rollouts.negatives,
        )
        self._micro_of_step = (-1, 0)  # (optimiser step, micro-steps done in it)
        #: The last logged rollout grid `(image, prompts, step)`, shown in the model card.
        self.last_samples = None
        #: The `create_model_card` arguments given so far (title, dataset, tags, license), kept for later cards.
        self.model_card_options: dict = {}
        #: Skips optimiser steps with non-finite losses or gradients (`monitoring/guards.py`); before the EMA callback.
        self.nonfinite_guard = NonFiniteStepGuard(self, args.max_consecutive_nonfinite_steps)
        self.add_callback(self.nonfinite_guard)
        self._setup_ema()
        #: Samples, scores and measures the validation prompts (None when there are none).
        self.validator = None
        if validation_prompts is not None:
            self.validator = Validator(
                self.adapter,
                self.sampler,
                self.latent_shape,
                self.reference,
                args,
                self.accelerator,
                self.compute_loss_context_manager,
                self.reward_funcs + self.eval_reward_funcs,
                self.reward_names + self.eval_reward_names,
                validation_prompts,
                unconditional=self.rollouts.negatives,
            )
            self.add_callback(ValidationCallback(self))
        #: The last validation `(grid, prompts, step, images)` (main process), and its step on every process.
        self.last_validation, self.last_validation_step = None, None
        self._last_validation_metrics = None
        #: The adaptive data_beta (`target_loss_ratio`), or None when it is fixed.
        self.data_beta_control = None
        if args.target_loss_ratio is not None:
            start = AdaptiveDataBeta.starting_at(args.data_beta, args.target_loss_ratio, args.data_beta_adapt_rate)
            self.data_beta_control = DataBetaControl(self, start)
            self.add_callback(self.data_beta_control)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, HackingMonitorCallback):  # it saves the last good weights through the trainer
                callback.bind(self)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`, after deciding, before any work, that the run may use `output_dir` and that the checkpoint
        to resume (`True`: the newest in `output_dir`) is complete, readable, of this run and not finished
        (`checkpoints/resume.py`); and after measuring the base model's held-out loss when nothing could later (full
        fine-tuning keeps no copy of the base; the weights are still the base's here, also when resuming:
        `Trainer.train` loads the checkpoint later)."""
        prepare_output_dir(self.args, resume_from_checkpoint, self.is_world_process_zero())
        self.accelerator.wait_for_everyone()
        checkpoint = resolve_checkpoint(self.args.output_dir, resume_from_checkpoint, self.is_world_process_zero())
        if checkpoint is not None:
            verify_checkpoint(
                checkpoint,
                self.is_lora,
                self.adapter.denoiser_name,
                self.is_deepspeed_enabled,
                self.args.process_index,
                self.args.world_size,
                self.args.num_iterations,
            )
            saved_info = check_same_run(checkpoint, run_info(self))
            self._announce_resume(checkpoint, saved_info.get("settings", {}))
            if self.data_beta_control is not None:
                self.data_beta_control.load_state_dict(saved_info.get(STATE_KEY), checkpoint)
        if not self.reference.available:  # full fine-tuning: the base is gone once training starts
            if self.eval_dataset is not None:
                self.evaluator.measure_base(self.eval_dataset)
            if self.validator is not None:
                self.validator.measure_base()
        self.rollouts.buffer = {}
        if checkpoint is not None:  # between the iterations over a batch, the checkpoint holds it
            self.rollouts.buffer = load_rollout_buffer(checkpoint, self.args.process_index, self.accelerator.device)
        self.metrics.restart_clock()
        return super().train(
            resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
        )

    def _announce_resume(self, checkpoint: str, saved_settings: dict) -> None:
        """Say which checkpoint resumes at which step, and warn when the run's length changed (the most common
        resume: "train N more steps"), whose learning-rate schedule `_load_optimizer_and_scheduler` rebuilds."""
        step, saved_max_steps = saved_progress(checkpoint)
        args = self.args
        if 0 < args.max_steps <= step:  # Trainer would train a step past max_steps, or return having done nothing
            raise ValueError(
                f"{checkpoint} was saved at step {step}, and max_steps is {args.max_steps}: there is nothing left to "
                f"train. To train longer, raise max_steps (e.g. to {2 * step}); the learning-rate schedule is then "
                f"rebuilt for the new length."
            )
        if not self.is_world_process_zero():
            return
        if args.max_steps > 0:
            logger.info("Resuming from %s (step %d of max_steps=%d).", checkpoint, step, args.max_steps)
        else:
            logger.info(
                "Resuming from %s (step %d; the run's length is num_train_epochs=%g).",
                checkpoint,
                step,
                args.num_train_epochs,
            )
        saved_epochs = saved_settings.get("num_train_epochs")
        if args.max_steps <= 0 and saved_epochs is not None and saved_epochs != args.num_train_epochs:
            logger.warning(
                "Resuming %s with num_train_epochs=%g; it was saved by a run of num_train_epochs=%g. The learning-"
                "rate schedule is rebuilt for the new length and continues at step %d (the result differs from a run "
                "of that length straight through). The new length is recorded in ddrl_run.json.",
                checkpoint,
                args.num_train_epochs,
                saved_epochs,
                step,
            )
        if args.max_steps > 0 and args.max_steps != saved_max_steps:
            logger.warning(
                "Resuming %s with max_steps=%d; it was saved by a run of max_steps=%d. The learning-rate schedule is "
                "rebuilt for %d steps and continues at step %d (steps 1-%d followed the %d-step schedule, so the "
                "result differs from a %d-step run straight through). The new length is recorded in ddrl_run.json.",
                checkpoint,
                args.max_steps,
                saved_max_steps,
                args.max_steps,
                step,
                step,
                saved_max_steps,
                args.max_steps,
            )

    # ------------------------------------------------------------------------------------------------ data plumbing
    def _encode(self, dataset: Dataset, args: DDRLConfig, split: str) -> Dataset:
        return encode_reference_dataset(
            with_prompt_column(dataset, args.prompt_column, split),  # diffusers' "text" / "caption": as "prompt"
            self.adapter.encode_images,
            self.resolution,
            self.reference_column,
            args.preprocess_batch_size,
            split,
            num_frames=self.adapter.num_frames,
            max_upscale=args.max_reference_upscale,
        )

    def _check_rewards_on(self, dataset: Dataset, args: DDRLConfig, validation: ValidationPrompts | None) -> None:
        """Call every reward on two decoded images, with the first rows' prompts and columns: a wrong length or type
        fails before any rollout. The images are the rows' reference samples, or for prompt-only data (plain GRPO,
        `data_beta=0`) decoded seeded random latents: images of the rollouts' shape, dtype and range, from the same
        `decode_latents`, for the cost of one VAE decode (a rollout would cost every denoising step). With validation
        prompts, also call the trained and evaluation rewards as validation will (those prompts and columns), so a
        reward needing a column they lack fails now."""
        rows = [dataset[i] for i in range(min(2, len(dataset)))]
        batch = DDRLCollator(args.prompt_column)(rows)
        latents, kind = batch["ref_latents"], "reference samples"
        if latents is None:
            latents = torch.randn((len(rows), *self.latent_shape), generator=torch.Generator().manual_seed(args.seed))
            kind = "decoded random latents (the training data hold no reference samples)"
        images = self.adapter.decode_latents(latents.to(self.adapter.denoiser.device))
        context = {"trainer_state": TrainerState()}
        if validation is not None:
            prompts, columns = validation.rows([i % len(validation.prompts) for i in range(len(images))], 1)
            try:
                compute_rewards(self.reward_funcs + self.eval_reward_funcs, images, prompts, columns, context)
            except (TypeError, ValueError) as err:
                fix = (
                    "validation_prompts carry no dataset columns: validate on eval-dataset rows instead "
                    "(num_validation_prompts > 0, validation_prompts unset), or use rewards that need none"
                    if not validation.columns
                    else "check that the eval dataset's rows give the reward what it needs"
                )
                raise type(err)(f"A reward failed on the validation prompts ({err}); {fix}.") from err
        scores = compute_rewards(self.reward_funcs, images, batch["prompts"], batch["columns"], context)
        for name, column in zip(self.reward_names, scores.unbind(dim=1)):
            if torch.isnan(column).all():
                logger.warning(
                    "Reward %r gave no score (None/NaN) to any of %d %s: check that it suits "
                    "this data; unscored samples get no advantage.",
                    name,
                    len(column),
                    kind,
                )

    def _get_train_sampler(self, train_dataset=None):
        args = self.args
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return RepeatSampler(
            len(dataset),
            args.num_generations,
            seed=args.seed,
            iterations=args.num_iterations,
            groups_per_step=args.groups_per_optimizer_step,
        )

    def _remove_unused_columns(self, dataset, description=None):
        return dataset  # reward functions may use any column; the collator picks what the trainer needs

    # ------------------------------------------------------------------------------------------------ one iteration
    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """One DDRL iteration on this process's rows: rollout → reward → advantage (`RolloutCollector`; with
        `num_iterations` > 1 the later iterations over a batch reuse it) → per-step loss and backward."""
        model.train()
        if self.state.global_step != self._micro_of_step[0]:  # a new optimiser step: its micro-steps count from 0
            self._micro_of_step = (self.state.global_step, 0)
        micro = self._micro_of_step[1]
        batch = self.rollouts.batch(model, inputs, self.state.global_step, micro, self.state)
        if batch.rollout.images is not None and micro == 0:
            self._maybe_log_images(batch.rollout.images, inputs["prompts"])
        began = time.perf_counter()
        loss = self._policy_and_data_backward(model, batch)
        synchronize(loss.device)
        self.metrics.add("time/train", time.perf_counter() - began)
        self._micro_of_step = (self.state.global_step, micro + 1)
        return loss / self._accumulation_steps

    @property
    def data_beta(self) -> float:
        """The data term's weight for the current optimiser step: `args.data_beta`, or the adaptive controller's."""
        return self.data_beta_control.value if self.data_beta_control is not None else self.args.data_beta

    @property
    def _accumulation_steps(self) -> int:
        # Set by Trainer.train() (it may differ on the last, shorter accumulation window); args outside train().
        return getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps

    def _policy_and_data_backward(self, model, batch: RolloutBatch) -> torch.Tensor:
        """For each trained step j: one forward of [rollout states ; noised references], loss_j, one backward (so the
        activations of one step at a time are alive). Returns the mean loss over trained steps, detached."""
        args = self.args
        data = None
        data_beta = self.data_beta
        self.metrics.add("data_beta", data_beta)
        if data_beta > 0:
            data = DataTermBatch.build(
                args,
                batch.ref_latents,
                batch.prompt_cond,
                batch.layout,
                batch.noise,
                like=batch.rollout.states,
                prompt_null=batch.prompt_null,
            )
        num_trained, total = len(self.trained_steps), torch.zeros((), device=batch.rollout.states.device)
        batch_syncs = self.accelerator.sync_gradients  # read once: each backward below sets it
        for position, step_index in enumerate(self.trained_steps):
            last = position == num_trained - 1
            with_data = data is not None and (not args.data_on_first_step_only or position == 0)
            with self._gradient_sync(model, last, batch_syncs) as backward:
                with self.compute_loss_context_manager():
                    terms = self._step_terms(model, batch, position, step_index, data if with_data else None)
                self.nonfinite_guard.record_loss(terms.loss)
                backward(terms.loss / (num_trained * self._accumulation_steps))
            total = total + terms.loss.detach() / num_trained
            self.metrics.add_step(terms.data, terms.kl, terms.policy, terms.ratio, terms.clipped)
        zero = torch.zeros((), device=total.device)  # every process logs every key, for the gather in `log`
        if args.kl_beta == 0:
            self.metrics.add("loss/kl", zero)
        if data_beta == 0:
            self.metrics.add("loss/data", zero)
        return total

    def _step_terms(
        self, model, batch: RolloutBatch, position: int, step_index: int, data: DataTermBatch | None
    ) -> StepTerms:
        """loss_j = L_pg + data_beta · L_data + kl_beta · L_kl at trained step `step_index` (the `position`-th), from
        one denoiser forward over the rollout states (both guidance branches under `cfg_scale`) and, with `data`, the
        noised references (`guidance.predict_policy`)."""
        args, sampler, states = self.args, self.sampler, batch.rollout.states
        timestep = sampler.timesteps[step_index].expand(states.shape[0])
        uncond = batch.row_uncond  # None without guidance
        extra = None
        if data is not None:
            data_t = data.timesteps(sampler, position, step_index)
            noised = sampler.add_noise(data.ref_latents, data.noise, data_t)
            extra = ExtraRows(noised, data_t, data.cond(position))
            target = sampler.training_target(data.ref_latents, data.noise, data_t)
        output, data_output = predict_policy(
            self.adapter, states[:, step_index], timestep, batch.row_cond, uncond, args.cfg_scale, extra, model
        )
        log_prob, mean = sampler.log_prob(output, step_index, states[:, step_index], states[:, step_index + 1])
        policy, ratio, clipped = clipped_policy_loss(
            log_prob, batch.rollout.log_probs[:, step_index], batch.advantages, args.epsilon
        )
        terms = StepTerms(loss=policy, policy=policy, ratio=ratio, clipped=clipped)
        if data is not None:
            terms.data = diffusion_loss(data_output, target, data.weights)
            terms.loss = terms.loss + self.data_beta * terms.data
            if self.data_beta_control is not None:  # the controller's paired signal: the base on the same rows
                base_output = self.reference.predict(extra.latents, extra.timesteps, extra.cond)
                base = diffusion_loss(base_output, target, data.weights)
                self.data_beta_control.record(terms.data * len(data.groups), base * len(data.groups))
        if args.kl_beta > 0:
            reference = self.reference.predict(states[:, step_index], timestep, batch.row_cond, uncond, args.cfg_scale)
            ref_mean = sampler.step_mean(reference, step_index, states[:, step_index])
            terms.kl = reverse_kl_loss(mean, ref_mean, sampler.stds[step_index])
            terms.loss = terms.loss + args.kl_beta * terms.kl
        return terms

    @contextlib.contextmanager
    def _gradient_sync(self, model, last: bool, batch_syncs: bool) -> Iterator[Callable[[torch.Tensor], None]]:
        """Around one trained step's forward and backward; yields its `backward(loss)`. The gradients of the trained
        steps of a rollout batch are reduced (DDP) and applied (DeepSpeed) once, after the `last` step, and only if
        the batch ends an accumulation window (`batch_syncs`).

        DDP: every step but the last runs under `no_sync` (forward included: DDP prepares its reduction there).
        DeepSpeed: `accelerator.backward` also runs the engine's optimiser step whenever gradients sync, so only the
        last trained step may be that boundary, or the policy would move between the steps of one rollout batch
        (ratio ≠ 1); the loss is already divided by the accumulation steps, so the engine must not divide it again
        (`scale_wrt_gas=False`, as `Trainer` does); and since the update happens inside that backward, the
        non-finite check runs just before it.
        """
        sync = batch_syncs and last
        kwargs = {"scale_wrt_gas": False} if self.is_deepspeed_enabled else {}

        def backward(loss: torch.Tensor) -> None:
            if self.is_deepspeed_enabled and sync:
                self.nonfinite_guard.check_before_deepspeed_step(self.state.global_step + 1)
            self.accelerator.gradient_state._set_sync_gradients(sync)
            self.accelerator.backward(loss, **kwargs)

        with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
            yield backward

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        """bf16/fp16 autocast around the trainer's own denoiser calls (`compute_loss_context_manager` enters it).

        transformers leaves autocast to accelerate, which patches it into the model's forward in `prepare()`, and not
        at all under DeepSpeed (the engine casts the model). The base model's held-out loss is measured before
        `prepare()`, and full fine-tuning keeps float32 weights next to bf16 text encoders, so the trainer sets it
        itself. The samplers' log-prob math is elementwise float32 and stays float32.
        """
        if not (self.args.bf16 or self.args.fp16):
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.args.bf16 else torch.float16
        return torch.autocast(self.accelerator.device.type, dtype=dtype, cache_enabled=cache_enabled)
