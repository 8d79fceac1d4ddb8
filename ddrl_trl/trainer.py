"""`DDRLTrainer`: orchestrates one DDRL iteration — rollout → reward → advantage → loss → step.

The math lives elsewhere (`core`, `samplers`), one step's parts in `step` (the policy and the reference policy,
rollouts, the rollout batch collector, the loss of a trained step, the data term, metrics), the model-family
specifics in `adapters`, the rewards in `rewards`, the reference data in `data`; what the trainer measures and
reports (held-out loss, validation, the hacking monitor, the adaptive data_beta, logs, model card) in `monitoring`,
saving and resuming in `checkpoints`. This file wires them into `transformers.Trainer`, which keeps providing the
optimiser, LR schedule, gradient clipping, accumulation, logging, callbacks, checkpoints and multi-device launch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import Trainer

from .adapters import PipelineAdapter, get_adapter
from .adapters.preparation import load_pipeline, prepare_for_training
from .checkpoints.resume import (
    announce_resume,
    check_same_run,
    load_rollout_buffer,
    prepare_output_dir,
    resolve_checkpoint,
    run_info,
    verify_checkpoint,
)
from .checkpoints.saving import SavingMixin
from .config import DDRLConfig
from .core.data_beta import AdaptiveDataBeta
from .data import (
    REF_LATENTS_COLUMN,
    DDRLCollator,
    RepeatSampler,
    check_evaluation_dataset,
    encode_reference_dataset,
    with_prompt_column,
)
from .inputs import TrainerInputs, check_inputs, check_rewards_on_samples
from .monitoring.adaptive_beta import STATE_KEY, DataBetaControl
from .monitoring.guards import NonFiniteStepGuard
from .monitoring.hacking_monitor import HackingMonitorCallback
from .monitoring.held_out import HeldOutEvaluator
from .monitoring.model_card import write_model_card
from .monitoring.reporting import Reporter
from .monitoring.validation import ValidationCallback, ValidationPrompts, Validator
from .step.collector import RolloutBatch, RolloutCollector
from .step.data_term import DataTermBatch
from .step.hooks import emit
from .step.loss import StepLoss
from .step.metrics import TrainingMetrics
from .step.policy import Policy, UnconditionalPrompts
from .step.reference import ReferencePolicy
from .step.rollout import synchronize

logger = logging.getLogger(__name__)


class DDRLTrainer(SavingMixin, Trainer):
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
        #: Whether the training data's paired references are used: by the data term only (data_beta > 0).
        self.trains_on_references = inputs.trains_on_references
        #: The dataset column with the paired reference samples (`reference_column`, else "image" or "video").
        self.reference_column = inputs.reference_column
        #: Which training data this run uses (`resume.data_signature`), recorded with every save.
        self.train_data_signature = inputs.train_data_signature

        self._build_policy(model, args, peft_config)
        train_dataset, eval_dataset = self._prepare_data(inputs, args)
        super().__init__(
            model=self.adapter.denoiser,
            args=args,
            data_collator=DDRLCollator(args.prompt_column),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self._build_components(args, inputs.validation_prompts)

    def _build_policy(self, model: Any, args: DDRLConfig, peft_config: LoraConfig | None) -> None:
        """The model: its family's adapter, prepared for training (`adapters/preparation.py`), the policy and the
        base model."""
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
        self.sampler = self.adapter.make_sampler(args, args.device)
        #: The trained (guided) policy: how it is conditioned, called and sampled (`step/policy.py`).
        self.policy = Policy(
            self.adapter,
            self.sampler,
            self.latent_shape,
            self.compute_loss_context_manager,
            args.cfg_scale,
            UnconditionalPrompts(self.adapter, args.negative_prompt, args.negative_prompt_column),
        )
        #: The base model, for the KL term, the adaptive data_beta's signal and the held-out ratio (LoRA disabled, or
        #: a frozen copy when kl_beta > 0 or target_loss_ratio is set).
        keep_copy = args.kl_beta > 0 or args.target_loss_ratio is not None
        self.reference = ReferencePolicy(self.policy, self.is_lora, keep_copy=keep_copy)
        self.trained_steps = args.resolved_train_step_indices

    def _prepare_data(self, inputs: TrainerInputs, args: DDRLConfig) -> tuple[Dataset, Dataset | None]:
        """One-off work on the data: encode the reference images, then check the rewards on real images."""
        train_dataset, eval_dataset = inputs.train_dataset, inputs.eval_dataset
        with args.main_process_first(desc="encoding reference images"):
            if self.trains_on_references:  # plain GRPO (data_beta=0) reads none
                train_dataset = self._encode(train_dataset, args, "training")
            if eval_dataset is not None:
                eval_dataset = self._encode(eval_dataset, args, "evaluation")
        check_rewards_on_samples(inputs, train_dataset, self.adapter, self.latent_shape, args)
        return train_dataset, eval_dataset

    def _build_components(self, args: DDRLConfig, validation_prompts: ValidationPrompts | None) -> None:
        """What the iteration and the monitoring need, once `Trainer` made the accelerator and the callbacks."""
        #: DDRL's training metrics since the last log (docs/metrics.md).
        self.metrics = TrainingMetrics()
        #: Makes each micro-step's rollout batch and keeps those later iterations reuse (`step/collector.py`).
        self.rollouts = RolloutCollector(
            self.policy,
            self.reward_funcs,
            self.reward_names,
            self.reward_weights,
            args,
            self.accelerator,
            self.metrics,
        )
        self.evaluator = HeldOutEvaluator(self.policy, self.reference, args, self.accelerator)
        self._micro_of_step = (-1, 0)  # (optimiser step, micro-steps done in it)
        #: Skips optimiser steps with non-finite losses or gradients (`monitoring/guards.py`); before the EMA callback.
        self.nonfinite_guard = NonFiniteStepGuard(
            self.accelerator,
            lambda: self.trainable_parameters,
            args.max_consecutive_nonfinite_steps,
            deepspeed=self.is_deepspeed_enabled,
        )
        self.add_callback(self.nonfinite_guard)
        self._setup_ema()
        #: The rollout and validation grids, the validation's metrics and DDRL's metrics in the training logs.
        self.reporter = Reporter(
            args, self.accelerator, self.callback_handler.callbacks, self.metrics, self.nonfinite_guard
        )
        #: The `create_model_card` arguments given so far (title, dataset, tags, license), kept for later cards.
        self.model_card_options: dict = {}
        #: Samples, scores and measures the validation prompts (None when there are none).
        self.validator = None
        if validation_prompts is not None:
            self.validator = Validator(
                self.policy,
                self.reference,
                args,
                self.accelerator,
                self.reward_funcs + self.eval_reward_funcs,
                self.reward_names + self.eval_reward_names,
                validation_prompts,
            )
            self.add_callback(ValidationCallback(self.validate, self.reporter))
        #: The adaptive data_beta (`target_loss_ratio`), or None when it is fixed.
        self.data_beta_control = None
        if args.target_loss_ratio is not None:
            start = AdaptiveDataBeta.starting_at(args.data_beta, args.target_loss_ratio, args.data_beta_adapt_rate)
            self.data_beta_control = DataBetaControl(start, self.accelerator, self.metrics, self.nonfinite_guard)
            self.add_callback(self.data_beta_control)
        #: loss_j of one trained step (`step/loss.py`).
        self.step_loss = StepLoss(
            self.policy,
            self.reference,
            args.epsilon,
            args.kl_beta,
            record_data_losses=self.data_beta_control.record if self.data_beta_control is not None else None,
        )
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
            announce_resume(checkpoint, saved_info.get("settings", {}), self.args, self.is_world_process_zero())
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

    # ------------------------------------------------------------------------------------------------ reporting
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Held-out diffusion loss and its ratio to the base model's (> 1.10: the paper's reward-hacking signal); under
        guidance (`cfg_scale` > 1) also the guided output's (`eval_guided_diffusion_loss_ratio`), which sees the
        drift guidance amplifies.

        Each held-out sample's noise and timesteps are seeded by (`args.seed`, its index), identical for the model and
        the base, so the ratio compares the two on the same draws; the samples are split across processes
        (`monitoring.held_out.HeldOutEvaluator`). `eval_dataset` may be raw (prompts and paired images) or already
        encoded.

        With validation prompts (`validation_prompts`, or the trainer's eval dataset's first rows) it also samples
        them (`validate`): `eval_rewards/<name>`, `eval_diversity`, `eval_diversity_ratio`, and the grid; a validation
        already taken at this step (by `validation_steps` or at the last step) is reused, not sampled again.
        """
        if eval_dataset is None:
            eval_dataset = self.eval_dataset
        else:  # checked before any encoding (the trainer's own eval_dataset was checked at construction)
            check_evaluation_dataset(eval_dataset, self.args, self.reference_column)
            if REF_LATENTS_COLUMN not in eval_dataset.column_names:
                eval_dataset = self._encode(eval_dataset, self.args, "evaluation")
        if eval_dataset is None and self.validator is None:
            raise ValueError(
                "evaluate() needs an eval_dataset (held-out prompts with paired reference images) or "
                "validation_prompts."
            )
        metrics = {}
        if eval_dataset is not None:
            started = self.state.global_step > 0
            metrics.update(self.evaluator.metrics(eval_dataset, metric_key_prefix, training_started=started))
        if self.validator is not None:  # validated at this step already (validation_steps, the last step): reused
            validated = self.reporter.validated(self.state.global_step, metric_key_prefix)
            metrics.update(validated or self.reporter.validation(self.validator, self.state, metric_key_prefix))
        return self._report_measurement(metrics)

    def validate(self, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Sample the validation prompts now (fixed seeds, the policy's sampler), score them with the trained and
        the evaluation rewards, measure their diversity; log the metrics and the grid (trackers, tag "validation";
        `output_dir/validation/step-N.png`) and tell the callbacks, as an evaluation does (the hacking monitor acts
        on it). Runs every `validation_steps` steps and at the end of training; `evaluate()` includes it."""
        if self.validator is None:
            raise ValueError(
                "There are no validation prompts: set DDRLConfig.validation_prompts, or pass an eval_dataset."
            )
        return self._report_measurement(self.reporter.validation(self.validator, self.state, metric_key_prefix))

    def _report_measurement(self, metrics: dict[str, float]) -> dict[str, float]:
        """Log an evaluation's or validation's metrics and tell the callbacks (the hacking monitor acts on them)."""
        self.log(metrics, measurement=True)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None, *, measurement: bool = False) -> None:
        """`Trainer.log`. A training log (the default) also carries DDRL's metrics since the last one
        (`step.metrics.TrainingMetrics`, averaged over processes); a `measurement` (an evaluation, a validation, the
        hacking monitor's verdict) carries only its own, and leaves the step's pending training log in place:
        transformers' callback handler clears `should_log` after any `on_log`, so a measurement from inside a step
        (`on_step_end`) would otherwise cancel that step's own log (loss, reward, grad_norm, learning rate)."""
        if not measurement:
            logs.update(self.reporter.training_metrics())
        pending_training_log = self.control.should_log
        super().log(logs, start_time)
        if measurement:
            self.control.should_log = pending_training_log

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        license: str | None = None,
        **kwargs,
    ) -> None:
        """Write the diffusers model card into `output_dir` (README.md, samples.png, training_curves.png, the
        validation gallery): base model, paper, how to load the weights (from the Hub repo being pushed to, else the
        output folder), rewards, configuration, the hacking monitor's verdict, samples and curves
        (`monitoring/model_card.py`). The trainer writes it at every checkpoint and at `save_model()`;
        `push_to_hub()` uploads it.

        Args:
            model_name: the card's title (`push_to_hub` passes the repo's name; default: the output folder's name).
            dataset_name: the reference data's Hub id or name, in the card's metadata and text.
            tags: tags added to the trainer's (`_tag_names`: ddrl, trl, diffusers-training) and the task's.
            license: the license in the card's metadata.

        The arguments given are remembered: the cards written at later saves keep them.
        """
        if kwargs:
            logger.warning("create_model_card: ignoring arguments it does not use: %s", ", ".join(sorted(kwargs)))
        given = dict(model_name=model_name, dataset_name=dataset_name, tags=tags, license=license)
        self.model_card_options.update({key: value for key, value in given.items() if value is not None})
        if self.is_world_process_zero():
            options = dict(self.model_card_options)
            options["tags"] = [options["tags"]] if isinstance(options.get("tags"), str) else options.get("tags")
            write_model_card(self, **options)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`; a save into `output_dir` itself also writes the model card there, as TRL does, and a
        save of weights from after the hacking monitor detected hacking says so."""
        target = output_dir if output_dir is not None else self.args.output_dir
        if not _internal_call and self.is_world_process_zero():  # checkpoints say nothing: they are history
            step = self.restored_step if self.restored_step is not None else self.state.global_step
            for monitor in self.callback_handler.callbacks:
                if isinstance(monitor, HackingMonitorCallback):
                    monitor.warn_if_hacked(target, step, self.state.global_step)
        super().save_model(output_dir, _internal_call)
        if not _internal_call and os.path.abspath(target) == os.path.abspath(self.args.output_dir):
            self._update_model_card()

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, then the model card in `output_dir` brought up to date (as TRL's trainers do)."""
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            self._update_model_card()

    def _update_model_card(self) -> None:
        """`create_model_card` after a save; a card that cannot be written (a full disk, a plotting error) is a
        warning: the weights are saved, and the card is never worth the run."""
        try:
            self.create_model_card()
        except Exception as err:  # noqa: BLE001 — whatever failed, the saved weights stand and training goes on
            logger.warning(
                "Could not write the model card in %s (%s: %s); the weights are saved and training goes on.",
                self.args.output_dir,
                type(err).__name__,
                err,
            )

    # ------------------------------------------------------------------------------------------------ data plumbing
    def _encode(self, dataset: Dataset, args: DDRLConfig, split: str) -> Dataset:
        emit("reference_encoding", split=split)
        return encode_reference_dataset(
            with_prompt_column(dataset, args.prompt_column, split),  # diffusers' "text" / "caption": as "prompt"
            self.adapter,
            self.reference_column,
            args.preprocess_batch_size,
            split,
            max_upscale=args.max_reference_upscale,
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
            self.reporter.rollout_grid(batch.rollout.images, inputs["prompts"], self.state.global_step + 1)
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
                    terms = self.step_loss(model, batch, position, step_index, data if with_data else None, data_beta)
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
