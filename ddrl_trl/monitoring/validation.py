"""Validation samples: fixed prompts and seeds, sampled with the policy's sampler (guided as the rollouts) at every
`evaluate()`, every `validation_steps` steps and at the end of training, so the grid shows the model's drift; scored
by the trained rewards and the evaluation rewards (`eval_rewards/<name>`), and measured for within-prompt diversity
(`eval_diversity`, and `eval_diversity_ratio` to the base model's samples on the same seeds). docs/metrics.md.

Row r of the validation batch is sample r % K of prompt r // K (K = `validation_images_per_prompt`); its noise comes
from its own generator seeded by (`seed`, "validation", r), so the samples do not depend on the number of processes
or the batch size, and the base model is sampled from the same noise.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from transformers import TrainerCallback, TrainerState

from ..checkpoints.weight_files import atomic_write
from ..core.diversity import within_prompt_diversity
from ..rewards import compute_rewards
from ..step.policy import Policy
from ..step.reference import ReferencePolicy
from ..step.rollout import SeededNoise, stable_seed

logger = logging.getLogger(__name__)


@dataclass
class ValidationPrompts:
    """The validation prompts, and per prompt the dataset columns rewards may read (empty for `validation_prompts`)."""

    prompts: list[str]
    columns: dict[str, list]

    @classmethod
    def from_config(cls, args, eval_dataset: Dataset | None, reference_column: str) -> ValidationPrompts | None:
        """`args.validation_prompts`, else the first `num_validation_prompts` rows of the (raw) `eval_dataset`;
        None when neither is set."""
        if args.validation_prompts is not None:
            return cls(list(args.validation_prompts), {})
        if eval_dataset is None or args.num_validation_prompts == 0:
            return None
        rows = eval_dataset.select(range(min(args.num_validation_prompts, len(eval_dataset))))
        kept = [c for c in rows.column_names if c not in (reference_column,)]
        values = rows.select_columns(kept).to_dict()
        prompts = values.pop(args.prompt_column)
        return cls(list(prompts), values)

    def rows(self, indices: list[int], per_prompt: int) -> tuple[list[str], dict[str, list]]:
        """The prompts and columns of validation rows `indices` (row r belongs to prompt r // per_prompt)."""
        owners = [r // per_prompt for r in indices]
        return [self.prompts[p] for p in owners], {k: [v[p] for p in owners] for k, v in self.columns.items()}


@dataclass
class ValidationResult:
    """One validation: every row's sample `(P·K, 3, H, W)` (videos `(P·K, F, 3, H, W)`) on the CPU, each reward's
    mean over the samples it scored, and the within-prompt diversity."""

    images: torch.Tensor
    rewards: dict[str, float]
    diversity: float
    #: The rewards that failed on some sample (raised, or broke the reward contract), on any process.
    failed: set[str] = field(default_factory=set)


class Validator:
    """Samples, scores and measures the validation rows (`ValidationPrompts`), for the model and once for the base.

    The rows are split across processes (strided; the last ones padded by repeating a row so every process gathers
    the same count) and sampled `per_device_eval_batch_size` at a time; every process ends with every row's sample.

    Args:
        policy: the trained policy (sampled as the rollouts are, guided or not).
        reference: the base model (for its samples).
        args: the `DDRLConfig`.
        accelerator: the process layout.
        reward_funcs, reward_names: the trained rewards, then the evaluation rewards.
        prompts: the validation prompts.
    """

    def __init__(
        self,
        policy: Policy,
        reference: ReferencePolicy,
        args,
        accelerator,
        reward_funcs: list,
        reward_names: list[str],
        prompts: ValidationPrompts,
    ):
        self.policy, self.reference, self.args, self.accelerator = policy, reference, args, accelerator
        self.reward_funcs, self.reward_names, self.prompts = reward_funcs, reward_names, prompts
        self.per_prompt = args.validation_images_per_prompt
        #: The base model's validation (None until measured).
        self.base: ValidationResult | None = None

    @property
    def num_rows(self) -> int:
        return len(self.prompts.prompts) * self.per_prompt

    def measure_base(self, trainer_state=None) -> None:
        """Sample the base model once: through the reference policy when available, else with the policy as it is
        now (which must still be the base: `DDRLTrainer.train` calls this before training)."""
        if self.base is None:
            self.base = self.run(self.reference if self.reference.available else self.policy, trainer_state)

    def metrics(self, prefix: str, trainer_state=None) -> tuple[dict[str, float], ValidationResult]:
        """`{prefix}_rewards/<name>`, `{prefix}_diversity` and `{prefix}_diversity_ratio` of the model now, with its
        samples."""
        if self.base is None:
            if trainer_state is not None and trainer_state.global_step > 0 and not self.reference.available:
                raise RuntimeError(
                    "The base model's validation samples were not taken before training; with full fine-tuning they "
                    "are taken when train() starts."
                )
            self.measure_base(trainer_state)
        result = self.run(self.policy, trainer_state)
        metrics = {f"{prefix}_rewards/{name}": value for name, value in result.rewards.items()}
        metrics.update({f"{prefix}_rewards/{name}/failed": 1.0 for name in sorted(result.failed)})
        metrics[f"{prefix}_diversity"] = result.diversity
        base = self.base.diversity
        metrics[f"{prefix}_diversity_ratio"] = result.diversity / base if base > 0 else float("nan")
        return metrics, result

    @torch.no_grad()
    def run(self, policy: Policy | ReferencePolicy, trainer_state=None) -> ValidationResult:
        """Sample every validation row with `policy` (the trained one or the base), with the denoiser in eval mode
        (no dropout: the same seeds give the same grid, and no global RNG is drawn), score and measure them."""
        module = self.policy.adapter.denoiser
        was_training = module.training
        module.eval()
        try:
            return self._run(policy, trainer_state)
        finally:
            module.train(was_training)

    def _run(self, policy: Policy | ReferencePolicy, trainer_state) -> ValidationResult:
        args, device = self.args, self.accelerator.device
        processes, rank = self.accelerator.num_processes, self.accelerator.process_index
        per_process = math.ceil(self.num_rows / processes)
        local = list(range(rank, self.num_rows, processes))
        local += [local[-1] if local else 0] * (per_process - len(local))  # equal counts for the gather
        noise = SeededNoise(stable_seed(args.seed, "validation"), device, self.per_prompt)
        images, latents, scores, failed = [], [], [], torch.zeros(len(self.reward_names), device=device)
        for start in range(0, len(local), args.per_device_eval_batch_size):
            rows = local[start : start + args.per_device_eval_batch_size]
            prompts, columns = self.prompts.rows(rows, self.per_prompt)
            rollout = policy.rollout(policy.conditioning(prompts, columns), noise, rows)
            context = {"trainer_state": trainer_state if trainer_state is not None else TrainerState()}
            scores.append(self._score(rollout.images, prompts, columns, context, failed))
            images.append(rollout.images.float())
            latents.append(rollout.states[:, -1].float())
        gathered_rows = self.accelerator.gather(torch.tensor(local, device=device))
        order = _first_occurrences(gathered_rows.tolist(), self.num_rows)
        everything = [torch.cat(parts).to(device) for parts in (images, latents, scores)]
        images, latents, scores = (self.accelerator.gather(part)[order].cpu() for part in everything)
        rewards = {}
        for name, column in zip(self.reward_names, scores.unbind(dim=1)):
            valid = column[~torch.isnan(column)]
            rewards[name] = valid.mean().item() if len(valid) else float("nan")
        failed_anywhere = self.accelerator.reduce(failed, reduction="sum").tolist()  # one verdict on every process
        failures = {name for name, count in zip(self.reward_names, failed_anywhere) if count > 0}
        diversity = within_prompt_diversity(latents, self.per_prompt).item()
        return ValidationResult(images, rewards, diversity, failures)

    def _score(
        self, images: torch.Tensor, prompts: list[str], columns: dict, context: dict, failed: torch.Tensor
    ) -> torch.Tensor:
        """`(B, F)` scores of every reward (async ones concurrently); a reward that fails (raises, or returns the wrong
        count or type) scores NaN here with a warning: a measurement is never worth the training run it would abort.
        After a failure the rewards are called one by one, to find which failed."""
        try:
            return compute_rewards(self.reward_funcs, images, prompts, columns, context)
        except Exception:  # noqa: BLE001 — found and reported reward by reward below
            pass
        columns_out = []
        for func, name in zip(self.reward_funcs, self.reward_names):
            try:
                columns_out.append(compute_rewards([func], images, prompts, columns, context)[:, 0])
            except Exception as err:  # noqa: BLE001 — any reward failure: recorded as unmeasured, training goes on
                step = context["trainer_state"].global_step
                logger.warning(
                    "Validation at step %d: reward %r failed on the validation samples (%s: %s); its "
                    "eval_rewards/%s is NaN for this validation and training goes on. Fix the reward, then run "
                    "trainer.evaluate() (or resume from a checkpoint) to measure it again.",
                    step,
                    name,
                    type(err).__name__,
                    err,
                    name,
                )
                columns_out.append(torch.full((len(prompts),), float("nan")))
                failed[self.reward_names.index(name)] = 1.0
        return torch.stack(columns_out, dim=1)


def _first_occurrences(rows: list[int], count: int) -> list[int]:
    """For each validation row 0..count-1, the index of its first occurrence in the gathered `rows`."""
    where: dict[int, int] = {}
    for index, row in enumerate(rows):
        where.setdefault(row, index)
    return [where[row] for row in range(count)]


#: Where validation grids are written, under `output_dir`.
VALIDATION_DIR = "validation"


def grid_path(output_dir: str, step: int) -> str:
    """Where the validation grid of `step` is written: `<output_dir>/validation/step-<step>.png`."""
    return os.path.join(output_dir, VALIDATION_DIR, f"step-{step:06d}.png")


def save_grid(grid, output_dir: str, step: int) -> str:
    """Write `grid` to `grid_path(output_dir, step)` atomically (staged, renamed; a failed write leaves nothing);
    returns the path."""
    path = grid_path(output_dir, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return atomic_write(path, lambda staging: grid.save(staging, format="PNG"))


class ValidationCallback(TrainerCallback):
    """Runs the trainer's validation every `validation_steps` optimiser steps (if set) and at the last step, unless
    an evaluation at that step will (`evaluate()` includes it); and when training ends early, if not done there.

    Args:
        validate: runs a validation and reports it (`DDRLTrainer.validate`).
        reporter: knows the step of the last validation (`reporting.Reporter`).
    """

    def __init__(self, validate: Callable[[], object], reporter):
        self.validate, self.reporter = validate, reporter

    def on_step_end(self, args, state, control, **kwargs):
        every, step = args.validation_steps, state.global_step
        due = (every and step % every == 0) or step >= state.max_steps
        if due and not control.should_evaluate and self.reporter.last_validation_step != step:
            self.validate()

    def on_train_end(self, args, state, control, **kwargs):
        if self.reporter.last_validation_step != state.global_step:
            self.validate()
