"""The rollout batch of one micro-step: this process's rows rolled out with the current policy, scored, and turned into
advantages over the whole global batch; or, at a later of the `num_iterations` optimiser steps over a batch, the one
rolled out before (`SavedRollout`), with its old log-probs and advantages."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from transformers import TrainerState

from ..adapters import Conditioning
from ..core import aggregate_rewards, group_advantages
from ..rewards import compute_rewards
from .groups import GroupLayout
from .hooks import emit
from .metrics import TrainingMetrics
from .policy import Conditions, Policy, UnconditionalPrompts
from .rollout import Rollout, SavedRollout, SeededNoise, rollout_and_score, stable_seed


@dataclass
class RolloutBatch:
    """What the loss of one micro-step needs: this process's rollouts, their advantages, and the conditioning and
    paired references of their groups (none when the data term is off and the data hold prompts only)."""

    rollout: Rollout
    advantages: torch.Tensor  # (b,) float32, this process's rows
    row_conditions: Conditions  # the policy's conditions per rollout row (with the unconditional branch if guided)
    prompt_cond: Conditioning  # conditioning per local group (its prompt)
    ref_latents: torch.Tensor | None  # (G, ...) the groups' paired x̃0; None for prompt-only data (data_beta = 0)
    layout: GroupLayout
    noise: SeededNoise
    prompt_null: Conditioning | None = None  # null conditioning per local group, for the data term's prompt dropout


class RolloutCollector:
    """Makes each micro-step's `RolloutBatch`, and keeps the batches later iterations reuse (`buffer`, by micro-step,
    saved with checkpoints taken between the iterations).

    Args:
        policy: the trained policy (`step.policy.Policy`).
        reward_funcs, reward_names, reward_weights: the rewards, as `DDRLTrainer` resolved them.
        args: the `DDRLConfig`.
        accelerator: for the device, the process layout and gathering the rewards of every process.
        metrics: where reward statistics and phase timings are recorded.
    """

    def __init__(
        self,
        policy: Policy,
        reward_funcs: list,
        reward_names: list[str],
        reward_weights: torch.Tensor,
        args,
        accelerator,
        metrics: TrainingMetrics,
    ):
        self.policy = policy
        self.reward_funcs, self.reward_names, self.reward_weights = reward_funcs, reward_names, reward_weights
        self.args, self.accelerator, self.metrics = args, accelerator, metrics
        #: This process's rollout batches of the current optimiser step, by micro-step (`num_iterations` > 1).
        self.buffer: dict[int, SavedRollout] = {}
        self._executor: ThreadPoolExecutor | None = None
        #: The data term's null conditioning (its prompt dropout).
        self.null = UnconditionalPrompts(policy.adapter, null=True)

    def batch(self, model, inputs: dict, global_step: int, micro: int, trainer_state: TrainerState) -> RolloutBatch:
        """The batch of micro-step `micro` of optimiser step `global_step`, rolled out by the policy calling `model`
        (the accelerator-wrapped denoiser): a fresh rollout at the first of its `num_iterations`, the buffered one at
        the later ones."""
        args = self.args
        iteration = global_step % args.num_iterations
        prompts: list[str] = inputs["prompts"]
        layout = GroupLayout(
            len(prompts), args.num_generations, self.accelerator.process_index, self.accelerator.num_processes
        )
        unique_prompts = [prompts[i] for i in layout.first_local_rows]
        if prompts != [p for p, count in zip(unique_prompts, layout.counts) for _ in range(count)]:
            raise RuntimeError("A batch does not hold groups of num_generations rows; use DDRLTrainer's sampler.")
        # The seed of the step that rolled the batch out: rows and groups derive theirs with their global index.
        seed = stable_seed(args.seed, global_step - iteration, micro)
        noise = SeededNoise(seed, self.accelerator.device, args.num_generations, args.same_noise_within_group)
        group_columns = {
            name: [values[i] for i in layout.first_local_rows] for name, values in inputs["columns"].items()
        }
        prompt_conditions = self.policy.conditioning(unique_prompts, group_columns)
        prompt_null = None
        if args.resolved_data_prompt_dropout > 0:
            with self.policy.autocast():
                prompt_null = self.null.for_rows(group_columns, range(len(unique_prompts)))
        row_conditions = prompt_conditions.repeat(layout.counts)
        ref_latents = inputs.get("ref_latents")  # None for prompt-only data, trained with data_beta = 0
        if ref_latents is not None:
            ref_latents = ref_latents[layout.first_local_rows]
        if iteration:
            rollout, advantages = self._reused(micro, iteration, prompts, layout)
        else:
            policy = self.policy.using(model)
            rollout, advantages = self._fresh(policy, row_conditions, noise, layout, inputs, trainer_state)
            if args.num_iterations > 1:
                self.buffer[micro] = SavedRollout(
                    rollout.states, rollout.log_probs, advantages, list(prompts), list(layout.global_rows)
                )
        if iteration == args.num_iterations - 1:
            self.buffer.pop(micro, None)  # its last use: free the memory before the next rollout
        return RolloutBatch(
            rollout, advantages, row_conditions, prompt_conditions.cond, ref_latents, layout, noise, prompt_null
        )

    def _fresh(
        self,
        policy: Policy,
        row_conditions: Conditions,
        noise: SeededNoise,
        layout: GroupLayout,
        inputs: dict,
        trainer_state,
    ) -> tuple[Rollout, torch.Tensor]:
        """Roll out and score this process's rows; the advantages of the whole global batch, this process's part."""
        args = self.args
        prompts, columns = inputs["prompts"], inputs["columns"]
        context = {
            "trainer_state": trainer_state,
            "log_metric": self.metrics.log_metric,
            "log_extra": self.metrics.log_extra,
        }

        def score(images: torch.Tensor, rows: slice) -> torch.Tensor:
            chunk_columns = {name: values[rows] for name, values in columns.items()}
            return compute_rewards(self.reward_funcs, images, prompts[rows], chunk_columns, context)

        chunk_groups = args.resolved_rollout_chunk_groups
        emit("rollout_start", rows=layout.global_rows)
        rollout, per_func, times = rollout_and_score(
            policy,
            row_conditions,
            noise,
            layout.global_rows,
            score,
            chunk_rows=chunk_groups * args.num_generations if chunk_groups else None,
            executor=self._reward_executor(),
        )
        emit("rollout_end", rollout=rollout, scores=per_func)
        self.metrics.add_rollout_times(times, rows=len(prompts))
        per_func = self.accelerator.gather(per_func.to(self.accelerator.device)).cpu()  # groups may span processes
        advantages, combined = self._advantages(per_func)
        self.metrics.add_rewards(per_func, combined, self.reward_names, args.num_generations)
        return rollout, advantages[layout.local_slice].to(self.accelerator.device)

    def _advantages(self, per_func: torch.Tensor):
        """The global batch's float32 advantages `(B,)` from its rewards `(B, F)`, and the combined rewards."""
        args = self.args
        combined = aggregate_rewards(
            per_func,
            self.reward_weights,
            args.num_generations,
            args.multi_objective_aggregation,
            args.scale_rewards,
            args.reward_clip,
        )
        advantages = group_advantages(
            combined.rewards,
            args.num_generations,
            scale_rewards=combined.scale_rewards,
            reward_clip=combined.reward_clip,
            exp_transform=args.exp_advantage,
            advantage_clip=args.advantage_clip,
        )
        return advantages, combined

    def _reused(
        self, micro: int, iteration: int, prompts: list[str], layout: GroupLayout
    ) -> tuple[Rollout, torch.Tensor]:
        """The buffered batch of this micro-step, checked to be of these prompts and rows."""
        saved = self.buffer.get(micro)
        if saved is None or saved.prompts != prompts or saved.rows != list(layout.global_rows):
            raise RuntimeError(
                f"Iteration {iteration} of num_iterations={self.args.num_iterations} has no rollout batch to reuse "
                f"for these prompts. DDRLTrainer's sampler repeats each step's prompts, and a checkpoint between the "
                f"iterations holds the batch: resume from one written with the same number of processes and "
                f"gradient_accumulation_steps."
            )
        return Rollout(states=saved.states, log_probs=saved.log_probs, images=None), saved.advantages

    def _reward_executor(self) -> ThreadPoolExecutor | None:
        """The one background thread that scores chunks with `overlap_rewards` (one, so reward functions never run
        concurrently with themselves); None otherwise."""
        if not self.args.overlap_rewards:
            return None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ddrl-reward")
        return self._executor
