"""`DDRLTrainer`: orchestrates one DDRL iteration — rollout → reward → advantage → loss → step.

The math lives elsewhere (`core/`, `samplers/`), the model-family specifics in `adapters/`, the rewards in `rewards/`;
this file wires them into `transformers.Trainer`, which keeps providing the optimiser, LR schedule, gradient clipping,
accumulation, logging, callbacks, checkpoints and multi-device launch.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import Trainer
from trl.trainer.utils import disable_dropout_in_model

from .adapters import PipelineAdapter, concat_conditioning, get_adapter, repeat_conditioning
from .callbacks import HackingMonitorCallback
from .config import DDRLConfig
from .core import (
    clipped_policy_loss, combine_rewards, diffusion_loss, group_advantages, group_reward_std, reverse_kl_loss,
)  # fmt: skip
from .data import DDRLCollator, RepeatSampler, check_columns, check_prompts, encode_reference_dataset
from .evaluation import HeldOutEvaluationMixin
from .guards import NonFiniteStepGuard
from .rewards import compute_rewards, resolve_reward, reward_name
from .saving import SavingMixin
from .layout import GroupLayout
from .model_card import write_model_card
from .resume import (
    check_output_dir_writable, check_same_run, data_signature, prepare_output_dir, resolve_checkpoint, run_info,
    verify_checkpoint,
)  # fmt: skip
from .rollout import Rollout, SeededNoise, rollout_and_score, stable_seed
from .tracking import image_grid, log_image_grid, make_config_tracker_friendly

logger = logging.getLogger(__name__)


def _load_pipeline(model: Any, dtype: torch.dtype):
    if not isinstance(model, (str, os.PathLike)):
        return model
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)


class DDRLTrainer(SavingMixin, HeldOutEvaluationMixin, Trainer):
    """Trainer for Data-regularized Diffusion Reinforcement Learning (DDRL, arXiv 2512.04332).

    Each optimiser step rolls out `num_generations` samples per prompt with the current policy (stochastic sampler,
    float32 log-probs), scores them with `reward_funcs`, turns rewards into group-relative advantages, and for each
    trained denoising step j back-propagates

        loss_j = L_pg (PPO-clipped) + data_beta · L_data (diffusion loss on the paired reference) + kl_beta · L_kl.

    The data sample shares the denoiser forward of the rollout states (one forward and one backward per trained step).

    Args:
        model: a diffusers pipeline, or a local path / Hub id loaded with `DiffusionPipeline.from_pretrained`.
        reward_funcs: a reward callable `f(images, prompts, **columns) -> list[float | None]` (e.g. a
            `RemoteReward`), a string — a built-in name, `"module:function"`, or a Hub id / local path of a reward
            model (`load_reward`) — or a list of these, combined with `args.reward_weights` (docs/rewards.md).
        args: a `DDRLConfig`.
        train_dataset: a `datasets.Dataset` with a prompt column and a paired reference image column.
        eval_dataset: held-out data of the same form, for `eval_diffusion_loss` and its ratio to the base model.
        peft_config: a `peft.LoraConfig` to train a LoRA adapter; `None` trains the full denoiser.
        callbacks, optimizers: as for `transformers.Trainer`.
    """

    _tag_names = ["ddrl", "diffusers", "trl"]

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
    ):
        args = args if args is not None else DDRLConfig(output_dir="ddrl-output")
        if not isinstance(args, DDRLConfig):
            raise TypeError(f"args must be a DDRLConfig, got {type(args).__name__}.")
        frozen_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32

        # ---- cheap checks first: nothing expensive happens before the inputs are known to be usable
        funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not funcs:
            raise ValueError("reward_funcs is empty: pass at least one reward function.")
        self.reward_funcs = [resolve_reward(f) for f in funcs]
        self.reward_names = [reward_name(f) for f in self.reward_funcs]
        weights = args.reward_weights if args.reward_weights is not None else [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(weights)} entries for {len(self.reward_funcs)} reward functions; give one "
                f"weight per function."
            )
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        if train_dataset is None:
            raise ValueError("DDRLTrainer needs a train_dataset with prompts and their paired reference images.")
        check_columns(train_dataset, args.prompt_column, args.image_column, "training")
        check_prompts(train_dataset, args.prompt_column, "training")
        if eval_dataset is not None:
            check_columns(eval_dataset, args.prompt_column, args.image_column, "evaluation")
            check_prompts(eval_dataset, args.prompt_column, "evaluation")
        if args.should_save:
            check_output_dir_writable(args.output_dir)
        #: Which training data this run uses (`resume.data_signature`), recorded with every save.
        self.train_data_signature = data_signature(train_dataset, args.prompt_column)
        if any(isinstance(callback, HackingMonitorCallback) for callback in callbacks or []):
            HackingMonitorCallback.check_eval_data(eval_dataset)

        pipeline = _load_pipeline(model, frozen_dtype)
        #: Hub id or path of the base pipeline, for the model card (None for a pipeline built in memory).
        in_memory = not isinstance(model, (str, os.PathLike))
        self.base_model_id = getattr(pipeline, "name_or_path", None) if in_memory else str(model)
        self.adapter: PipelineAdapter = get_adapter(pipeline)
        self.adapter.configure(args)
        self.resolution = self.adapter.resolution
        self.pipeline = pipeline
        self.latent_shape = self.adapter.latent_shape(self.resolution)

        # ---- frozen parts: no grads, the training dtype, on the device
        device = args.device
        def place(module: torch.nn.Module) -> None:
            module.to(device)
            if module.dtype != frozen_dtype:  # cast only when needed: diffusers warns on every cast
                module.to(dtype=frozen_dtype)

        for module in self.adapter.frozen_modules():
            module.requires_grad_(False).eval()
            place(module)
        denoiser = self.adapter.denoiser
        self.is_lora = peft_config is not None
        if self.is_lora:
            peft_config = copy.deepcopy(peft_config)
            if peft_config.target_modules is None:
                peft_config.target_modules = list(self.adapter.default_lora_target_modules)
            denoiser.requires_grad_(False)
            place(denoiser)
            with torch.random.fork_rng(devices=[]):  # the adapter's random init depends on args.seed alone
                torch.manual_seed(args.seed)
                denoiser.add_adapter(peft_config)
            for param in denoiser.parameters():  # trainable LoRA weights stay float32 (master weights)
                if param.requires_grad:
                    param.data = param.data.float()
        else:
            # Full fine-tuning keeps float32 master weights (bf16/fp16 run through autocast), whatever dtype it loaded in.
            denoiser.requires_grad_(True).to(device)
            if denoiser.dtype != torch.float32:
                denoiser.to(dtype=torch.float32)
        if args.gradient_checkpointing or getattr(args, "activation_checkpointing", False):
            # diffusers models name it differently from the `*_checkpointing_enable` that Trainer would call:
            # switch it on here and keep Trainer out of it.
            denoiser.enable_gradient_checkpointing()
            args.gradient_checkpointing = False
            if hasattr(args, "activation_checkpointing"):
                args.activation_checkpointing = False
        # Rollouts and the loss must see the same network for ratio = 1: no dropout anywhere (TRL's disable_dropout).
        disable_dropout_in_model(denoiser)
        make_config_tracker_friendly(denoiser)
        self.ref_denoiser = None
        if args.kl_beta > 0 and not self.is_lora:
            self.ref_denoiser = copy.deepcopy(denoiser).requires_grad_(False).eval()

        self.sampler = self.adapter.make_sampler(args, device)
        self.trained_steps = args.trained_step_indices

        # ---- one-off work on the data: encode reference images, then check the rewards on real images
        with args.main_process_first(desc="encoding reference images"):
            train_dataset = self._encode(train_dataset, args, "training")
            if eval_dataset is not None:
                eval_dataset = self._encode(eval_dataset, args, "evaluation")
        self._check_rewards_on(train_dataset, args)

        super().__init__(
            model=denoiser,
            args=args,
            data_collator=DDRLCollator(args.prompt_column),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self._metrics: dict[str, list] = defaultdict(list)
        self._base_eval_loss: dict[str, float] = {}
        self._micro_step = 0
        #: The last logged rollout grid `(image, prompts, step)`, shown in the model card.
        self.last_samples = None
        self._executor: ThreadPoolExecutor | None = None
        #: Skips optimiser steps with non-finite losses or gradients (`guards.py`); before the EMA's callback.
        self.nonfinite_guard = NonFiniteStepGuard(self, args.max_consecutive_nonfinite_steps)
        self.add_callback(self.nonfinite_guard)
        self._setup_ema()
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, HackingMonitorCallback):  # it saves the last good weights through the trainer
                callback.bind(self)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`, after deciding, before any work, that the run may use `output_dir` and that the checkpoint
        to resume (`True`: the newest in `output_dir`) is complete, readable and of this run (`resume.py`)."""
        prepare_output_dir(self.args, resume_from_checkpoint, self.is_world_process_zero())
        self.accelerator.wait_for_everyone()
        checkpoint = resolve_checkpoint(self.args.output_dir, resume_from_checkpoint)
        if checkpoint is not None:
            verify_checkpoint(checkpoint, self.is_lora, self.adapter.denoiser_name, self.is_deepspeed_enabled,
                              self.args.process_index, self.args.world_size)  # fmt: skip
            check_same_run(checkpoint, run_info(self))
        return super().train(resume_from_checkpoint=checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval,
                             **kwargs)  # fmt: skip

    # ------------------------------------------------------------------------------------------------ data plumbing
    def _encode(self, dataset: Dataset, args: DDRLConfig, split: str) -> Dataset:
        return encode_reference_dataset(
            dataset, self.adapter.encode_images, self.resolution, args.image_column, args.preprocess_batch_size, split,
            num_frames=self.adapter.num_frames, max_upscale=args.max_reference_upscale,
        )  # fmt: skip

    def _check_rewards_on(self, dataset: Dataset, args: DDRLConfig) -> None:
        """Call every reward on two decoded reference images: a wrong length or type fails before any rollout."""
        rows = [dataset[i] for i in range(min(2, len(dataset)))]
        batch = DDRLCollator(args.prompt_column)(rows)
        images = self.adapter.decode_latents(batch["ref_latents"].to(self.adapter.denoiser.device))
        scores = compute_rewards(self.reward_funcs, images, batch["prompts"], batch["columns"])
        for name, column in zip(self.reward_names, scores.unbind(dim=1)):
            if torch.isnan(column).all():
                logger.warning("Reward %r gave no score (None/NaN) to any of %d reference samples: check that it suits "
                               "this data; unscored samples get no advantage.", name, len(column))  # fmt: skip

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return RepeatSampler(len(dataset), self.args.num_generations, seed=self.args.seed)

    def _remove_unused_columns(self, dataset, description=None):
        return dataset  # reward functions may use any column; the collator picks what the trainer needs

    # ------------------------------------------------------------------------------------------------ one iteration
    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """One DDRL iteration on this process's rows: rollout → reward → advantage → per-step loss/backward."""
        args = self.args
        model.train()
        prompts: list[str] = inputs["prompts"]
        layout = GroupLayout(len(prompts), args.num_generations, self.accelerator.process_index,
                             self.accelerator.num_processes)  # fmt: skip
        unique_prompts = [prompts[i] for i in layout.first_local_rows]
        if prompts != [p for p, count in zip(unique_prompts, layout.counts) for _ in range(count)]:
            raise RuntimeError("A batch does not hold groups of num_generations rows; use DDRLTrainer's sampler.")
        noise = SeededNoise(self._rollout_seed(), self.accelerator.device, args.num_generations,
                             args.same_noise_within_group)  # fmt: skip
        columns = inputs["columns"]

        def score(images: torch.Tensor, rows: slice) -> torch.Tensor:
            chunk_columns = {name: values[rows] for name, values in columns.items()}
            return compute_rewards(self.reward_funcs, images, prompts[rows], chunk_columns)

        chunk_rows = args.rollout_chunk_size * args.num_generations if args.rollout_chunk_size else None
        with self.compute_loss_context_manager():
            prompt_cond = self.adapter.encode_prompts(unique_prompts)
            row_cond = repeat_conditioning(prompt_cond, layout.counts)
            rollout, per_func = rollout_and_score(
                self.adapter, self.sampler, row_cond, self.latent_shape, noise, layout.global_rows, score,
                chunk_rows=chunk_rows, executor=self._reward_executor(), denoiser=model,
            )  # fmt: skip
        advantages = self._advantages(per_func, layout)
        self._maybe_log_images(rollout.images, prompts)
        ref_latents = inputs["ref_latents"][layout.first_local_rows]
        loss = self._policy_and_data_backward(model, rollout, advantages, row_cond, prompt_cond, ref_latents, layout,
                                              noise)  # fmt: skip
        self._micro_step += 1
        return loss / self._accumulation_steps

    @property
    def _accumulation_steps(self) -> int:
        # Set by Trainer.train() (it may differ on the last, shorter accumulation window); args outside train().
        return getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps

    def _rollout_seed(self) -> int:
        """The micro-step's seed; rows and groups derive theirs from it with their global index (`SeededNoise`)."""
        micro = self._micro_step % self.args.gradient_accumulation_steps
        return stable_seed(self.args.seed, self.state.global_step, micro)

    def _reward_executor(self) -> ThreadPoolExecutor | None:
        """The one background thread that scores chunks with `async_rewards` (one, so reward functions never run
        concurrently with themselves); None otherwise."""
        if not self.args.async_rewards:
            return None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ddrl-reward")
        return self._executor

    def _advantages(self, per_func: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
        """This process's rewards `(b, F)` → its float32 advantages on the device, computed on the rewards of the
        whole global batch (gathered from every process: groups may span processes)."""
        args = self.args
        per_func = self.accelerator.gather(per_func.to(self.accelerator.device)).cpu()
        rewards = combine_rewards(per_func, self.reward_weights)
        advantages = group_advantages(
            rewards, args.num_generations, scale_rewards=args.scale_rewards, reward_clip=args.reward_clip,
            exp_transform=args.exp_advantage, advantage_clip=args.advantage_clip,
        )  # fmt: skip
        self._log_reward_statistics(per_func, rewards)
        return advantages[layout.local_slice].to(self.accelerator.device)

    def _log_reward_statistics(self, per_func: torch.Tensor, rewards: torch.Tensor) -> None:
        """`reward` (mean of the valid combined rewards), `reward_std` (the std the advantages were divided by, as
        TRL logs it), and per function its mean and its count of invalid (None, NaN, ±inf) scores."""
        args = self.args
        valid = torch.isfinite(rewards)
        if valid.any():
            self._metrics["reward"].append(rewards[valid].mean().item())
        stds = group_reward_std(rewards, args.num_generations, args.scale_rewards, args.reward_clip)
        self._metrics["reward_std"].append(stds.mean().item())
        for name, column in zip(self.reward_names, per_func.unbind(dim=1)):
            ok = torch.isfinite(column)
            if ok.any():
                self._metrics[f"rewards/{name}/mean"].append(column[ok].mean().item())
            self._metrics[f"rewards/{name}/invalid"].append(float((~ok).sum()))

    def _policy_and_data_backward(
        self, model, rollout: Rollout, advantages, cond, prompt_cond, ref_latents, layout: GroupLayout,
        noise: SeededNoise,
    ) -> torch.Tensor:
        """For each trained step j: one forward of [rollout states ; noised references], loss_j, one backward.

        `ref_latents` holds one paired x̃0 per local group (`prompt_cond` its conditioning). Its data loss is weighted
        by the group's share of this process's rows, so that with groups spanning processes the average over
        processes is still the plain mean over groups.
        """
        args, sampler = self.args, self.sampler
        batch, groups = rollout.states.shape[0], len(layout.groups)
        ref_latents = ref_latents.to(rollout.states)
        if args.data_noise == "rollout":  # the initial noise of the group's first rollout, wherever that row lives
            first_rows = [g * args.num_generations for g in layout.groups]
            data_noise = noise.initial(first_rows, tuple(ref_latents.shape[1:]))
        else:
            data_noise = noise.group_noise(layout.groups, tuple(ref_latents.shape[1:]))
        data_weights = torch.tensor(layout.data_weights, device=rollout.states.device)
        data_cond = concat_conditioning(cond, prompt_cond)
        total = torch.zeros((), device=rollout.states.device)
        num_trained = len(self.trained_steps)
        # Under DeepSpeed, `accelerator.backward` also runs the engine's optimiser step whenever gradients sync: only
        # the last trained step may be that boundary, or the policy would move between the steps of one rollout batch
        # (ratio ≠ 1). The loss is already divided by the accumulation steps here, so DeepSpeed must not divide again.
        sync_after_batch = self.accelerator.sync_gradients
        backward_kwargs = {"scale_wrt_gas": False} if self.is_deepspeed_enabled else {}
        for position, step_index in enumerate(self.trained_steps):
            with_data = args.data_beta > 0 and (not args.data_on_first_step_only or position == 0)
            timestep = sampler.timesteps[step_index].expand(batch)
            latents_in, timesteps_in, cond_in = rollout.states[:, step_index], timestep, cond
            if with_data:
                if args.data_timesteps == "random":
                    data_t = torch.cat([sampler.sample_timesteps(1, noise.generator(f"data-t{position}", g))
                                        for g in layout.groups])  # fmt: skip
                else:
                    data_t = sampler.timesteps[step_index].expand(groups)
                noisy_ref = sampler.add_noise(ref_latents, data_noise, data_t)
                latents_in = torch.cat([latents_in, noisy_ref])
                timesteps_in = torch.cat([timestep, data_t])
                cond_in = data_cond
            last = position == num_trained - 1
            sync = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
            with sync:
                with self.compute_loss_context_manager():
                    output = self.adapter.predict(latents_in, timesteps_in, cond_in, denoiser=model)
                    log_prob, mean = sampler.log_prob(
                        output[:batch], step_index, rollout.states[:, step_index], rollout.states[:, step_index + 1]
                    )
                    policy_loss, ratio, clipped = clipped_policy_loss(
                        log_prob, rollout.log_probs[:, step_index], advantages, args.epsilon
                    )
                    loss = policy_loss
                    if with_data:
                        target = sampler.training_target(ref_latents, data_noise, data_t)
                        data_loss = diffusion_loss(output[batch:], target, data_weights)
                        loss = loss + args.data_beta * data_loss
                        self._metrics["loss/data"].append(data_loss.detach())
                    if args.kl_beta > 0:
                        ref_mean = self._reference_mean(rollout.states[:, step_index], timestep, cond, step_index)
                        kl = reverse_kl_loss(mean, ref_mean, sampler.stds[step_index])
                        loss = loss + args.kl_beta * kl
                        self._metrics["loss/kl"].append(kl.detach())
                self.nonfinite_guard.record_loss(loss)
                if self.is_deepspeed_enabled and sync_after_batch and last:  # the engine steps in this backward
                    self.nonfinite_guard.check_before_deepspeed_step(self.state.global_step + 1)
                self.accelerator.gradient_state._set_sync_gradients(sync_after_batch and last)
                self.accelerator.backward(loss / (num_trained * self._accumulation_steps), **backward_kwargs)
            total = total + loss.detach() / num_trained
            self._metrics["loss/policy"].append(policy_loss.detach())
            self._metrics["ratio/mean"].append(ratio.mean())
            self._metrics["clip_fraction"].append(clipped.float().mean())
        if args.kl_beta == 0:
            self._metrics["loss/kl"].append(torch.zeros((), device=total.device))
        if args.data_beta == 0:
            self._metrics["loss/data"].append(torch.zeros((), device=total.device))
        return total

    def _reference_mean(self, latents, timestep, cond, step_index) -> torch.Tensor:
        output = self._base_prediction(latents, timestep, cond)
        return self.sampler.step_mean(output, step_index, latents)

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

    # ------------------------------------------------------------------------------------------------ publishing
    def create_model_card(self, model_name=None, dataset_name=None, tags=None, license=None, **kwargs) -> None:
        """Write the diffusers model card `push_to_hub()` uploads (README.md, samples.png, training_curves.png):
        base model, paper, how to load the weights, rewards, configuration, samples and curves (`model_card.py`)."""
        if self.is_world_process_zero():
            tags = [tags] if isinstance(tags, str) else tags
            write_model_card(self, tags=tags, license=license)

    # ------------------------------------------------------------------------------------------------ logging
    def _maybe_log_images(self, images: torch.Tensor, prompts: list[str]) -> None:
        every = self.args.log_sample_images_steps
        if not every or self.state.global_step % every or self._micro_step % self.args.gradient_accumulation_steps:
            return
        if self.accelerator.is_main_process:
            n = self.args.num_sample_images
            grid = image_grid(images[:n])
            self.last_samples = (grid, prompts[:n], self.state.global_step)  # for the model card
            log_image_grid(self.callback_handler.callbacks, grid, prompts[:n], self.state.global_step)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the DDRL metrics (averaged since the last log, then over processes) to the Trainer's training logs.

        Every process logs the same keys in the same order, so one gather averages them all: per-process losses are
        means over equal row counts, so their average is the global batch's.
        """
        if not any(key.startswith("eval_") for key in logs):
            keys = [key for key, values in self._metrics.items() if values]
            if keys:
                device = self.accelerator.device
                means = torch.stack([
                    torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in self._metrics[key]]).mean()
                    for key in keys
                ])  # fmt: skip
                means = self.accelerator.gather(means[None]).mean(dim=0)
                logs.update(zip(keys, means.tolist()))
            self._metrics.clear()
            logs["nonfinite_steps"] = float(self.nonfinite_guard.skipped_steps)
        super().log(logs, start_time)
