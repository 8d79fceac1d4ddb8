"""What `DDRLTrainer` is given, checked before any expensive work (no model loaded, nothing encoded): the rewards and
their weights, the training and evaluation data, the validation prompts, the output folder and the hacking monitors'
inputs. Each refusal names the problem and the fix."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from datasets import Dataset
from transformers import TrainerState

from .checkpoints.resume import check_output_dir_writable, data_signature, warn_if_output_dir_taken
from .config import DDRLConfig
from .data import (
    DDRLCollator,
    check_columns,
    check_evaluation_dataset,
    check_negative_prompts,
    check_prompts,
    reference_column_of,
    with_prompt_column,
)
from .monitoring.hacking_monitor import HackingMonitorCallback
from .monitoring.validation import ValidationPrompts
from .rewards import compute_rewards, resolve_reward, reward_name
from .rewards.calling import check_column_names

logger = logging.getLogger(__name__)


@dataclass
class TrainerInputs:
    """`DDRLTrainer`'s inputs once checked: the resolved rewards, the datasets as the trainer uses them, and what was
    found in them."""

    reward_funcs: list
    reward_names: list[str]
    reward_weights: torch.Tensor
    eval_reward_funcs: list
    eval_reward_names: list[str]
    train_dataset: Dataset
    eval_dataset: Dataset | None
    #: Whether the training data's paired references are used: by the data term only (data_beta > 0).
    trains_on_references: bool
    #: The dataset column with the paired reference samples (`reference_column`, else "image" or "video").
    reference_column: str
    validation_prompts: ValidationPrompts | None
    #: Which training data the run uses (`resume.data_signature`), recorded with every save.
    train_data_signature: str


def check_inputs(
    args: DDRLConfig,
    reward_funcs: Callable | str | Sequence[Callable | str],
    eval_reward_funcs: Callable | str | Sequence[Callable | str] | None,
    train_dataset: Dataset | None,
    eval_dataset: Dataset | None,
    callbacks: list | None,
) -> TrainerInputs:
    """Check and resolve `DDRLTrainer`'s arguments (see its docstring), raising before any expensive work."""
    funcs, names, weights, eval_funcs, eval_names = _resolve_rewards(args, reward_funcs, eval_reward_funcs)
    train_dataset, eval_dataset, trains_on_references, reference_column = _check_data(
        args, train_dataset, eval_dataset
    )
    validation_prompts = _validation_prompts(args, eval_dataset, reference_column, bool(eval_funcs))
    if args.should_save:
        check_output_dir_writable(args.output_dir)
    warn_if_output_dir_taken(args)
    for callback in callbacks or []:
        if isinstance(callback, HackingMonitorCallback):
            callback.check_inputs(eval_dataset, validation_prompts is not None, eval_names)
    return TrainerInputs(
        funcs,
        names,
        weights,
        eval_funcs,
        eval_names,
        train_dataset,
        eval_dataset,
        trains_on_references,
        reference_column,
        validation_prompts,
        data_signature(train_dataset, args.prompt_column),
    )


def _resolve_rewards(args: DDRLConfig, reward_funcs, eval_reward_funcs) -> tuple:
    """The trained rewards, their names and weights (float32), and the evaluation rewards and their names; all names
    distinct (they name the logged `eval_rewards/<name>`)."""
    given = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if not given:
        raise ValueError("reward_funcs is empty: pass at least one reward function.")
    funcs = [resolve_reward(f) for f in given]
    names = [reward_name(f) for f in funcs]
    weights = args.reward_weights if args.reward_weights is not None else [1.0] * len(funcs)
    if len(weights) != len(funcs):
        raise ValueError(
            f"reward_weights has {len(weights)} entries for {len(funcs)} reward functions; give one "
            f"weight per function."
        )
    extra = eval_reward_funcs if isinstance(eval_reward_funcs, (list, tuple)) else [eval_reward_funcs]
    eval_funcs = [resolve_reward(f) for f in extra if f is not None]
    eval_names = [reward_name(f) for f in eval_funcs]
    if len(set(names + eval_names)) != len(names + eval_names):
        raise ValueError(
            f"Reward names must be distinct across reward_funcs and eval_reward_funcs (they name the logged "
            f"eval_rewards/<name>), got {names + eval_names}: rename a function (its __name__)."
        )
    return funcs, names, torch.tensor(weights, dtype=torch.float32), eval_funcs, eval_names


def _check_data(args: DDRLConfig, train_dataset: Dataset | None, eval_dataset: Dataset | None) -> tuple:
    """The training and evaluation data as the trainer uses them, whether the references are trained on, and their
    column. diffusers' "text" / "caption" prompt columns are read when the default "prompt" is missing (renamed to
    it); with `data_beta=0` (plain GRPO) a reference column is dropped, never encoded nor read."""
    if train_dataset is None:
        raise ValueError(
            "DDRLTrainer needs a train_dataset with prompts (and, for the data term, paired reference images)."
        )
    train_dataset = with_prompt_column(train_dataset, args.prompt_column, "training")
    if eval_dataset is not None:
        eval_dataset = with_prompt_column(eval_dataset, args.prompt_column, "evaluation")
    trains_on_references = args.data_beta > 0 or args.target_loss_ratio is not None
    reference_column = reference_column_of(train_dataset, args.reference_column, fallback=eval_dataset)
    check_columns(train_dataset, args.prompt_column, reference_column, "training", trains_on_references)
    if not trains_on_references and reference_column in train_dataset.column_names:
        train_dataset = train_dataset.remove_columns(reference_column)
    check_prompts(train_dataset, args.prompt_column, "training")
    if args.negative_prompt_column is not None:
        check_negative_prompts(
            train_dataset, args.negative_prompt_column, args.prompt_column, reference_column, "training"
        )
    if args.num_iterations > 1 and len(train_dataset) < args.groups_per_optimizer_step:
        raise ValueError(
            f"num_iterations={args.num_iterations} reuses whole optimiser steps of "
            f"{args.groups_per_optimizer_step} prompts, but the training dataset has {len(train_dataset)}: lower "
            f"per_device_train_batch_size or gradient_accumulation_steps, or use more prompts."
        )
    check_column_names(
        [c for c in train_dataset.column_names if c not in (args.prompt_column, reference_column)], "training"
    )
    if eval_dataset is not None:
        check_evaluation_dataset(eval_dataset, args, reference_column)
    return train_dataset, eval_dataset, trains_on_references, reference_column


def _validation_prompts(
    args: DDRLConfig, eval_dataset: Dataset | None, reference_column: str, has_eval_rewards: bool
) -> ValidationPrompts | None:
    """The validation prompts (`ValidationPrompts.from_config`), refusing settings that need some when there are
    none."""
    validation_prompts = ValidationPrompts.from_config(args, eval_dataset, reference_column)
    nothing_to_validate = (
        "set DDRLConfig.validation_prompts, or num_validation_prompts > 0 with an eval_dataset (its first rows "
        "are the validation prompts)"
    )
    if args.validation_steps is not None and validation_prompts is None:
        raise ValueError(f"validation_steps is set but there is nothing to validate on: {nothing_to_validate}.")
    if has_eval_rewards and validation_prompts is None:
        raise ValueError(f"eval_reward_funcs score the validation samples, but there are none: {nothing_to_validate}.")
    if args.num_validation_prompts > 0 and args.validation_prompts is None and eval_dataset is None:
        raise ValueError(
            f"num_validation_prompts={args.num_validation_prompts} takes the validation prompts from the eval "
            "dataset, but there is none: pass eval_dataset, or set validation_prompts."
        )
    return validation_prompts


def check_rewards_on_samples(
    inputs: TrainerInputs, dataset: Dataset, adapter, latent_shape: tuple[int, ...], args: DDRLConfig
) -> None:
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
        latents = torch.randn((len(rows), *latent_shape), generator=torch.Generator().manual_seed(args.seed))
        kind = "decoded random latents (the training data hold no reference samples)"
    images = adapter.decode_latents(latents.to(adapter.denoiser.device))
    context = {"trainer_state": TrainerState()}
    validation = inputs.validation_prompts
    if validation is not None:
        prompts, columns = validation.rows([i % len(validation.prompts) for i in range(len(images))], 1)
        try:
            compute_rewards(inputs.reward_funcs + inputs.eval_reward_funcs, images, prompts, columns, context)
        except (TypeError, ValueError) as err:
            fix = (
                "validation_prompts carry no dataset columns: validate on eval-dataset rows instead "
                "(num_validation_prompts > 0, validation_prompts unset), or use rewards that need none"
                if not validation.columns
                else "check that the eval dataset's rows give the reward what it needs"
            )
            raise type(err)(f"A reward failed on the validation prompts ({err}); {fix}.") from err
    scores = compute_rewards(inputs.reward_funcs, images, batch["prompts"], batch["columns"], context)
    for name, column in zip(inputs.reward_names, scores.unbind(dim=1)):
        if torch.isnan(column).all():
            logger.warning(
                "Reward %r gave no score (None/NaN) to any of %d %s: check that it suits "
                "this data; unscored samples get no advantage.",
                name,
                len(column),
                kind,
            )
