"""What every `examples/train_*.py` shares: TRL-style arguments, dataset loading and the train-and-save run.

A training script is then only its model family's defaults:

    from ddrl_trl.scripts import run_script
    run_script(model_name_or_path="stabilityai/stable-diffusion-3.5-medium", resolution=512)

Arguments are parsed by `trl.TrlParser` from `ScriptArguments` (dataset), `DDRLConfig` (training), `ModelConfig`
(model and LoRA) and `RewardArguments`; a YAML `--config` file overrides the script's defaults and command-line
flags override both. `--reward_funcs` is required (there is no safe default reward); `--resume_from_checkpoint`
takes a checkpoint folder, or `true` / `latest` for the newest one in `--output_dir`; a new run refuses an
`--output_dir` holding another run's checkpoints (unless `--overwrite_output_dir`) before loading anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset, load_dataset, load_from_disk
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from .config import DDRLConfig
from .resume import check_output_dir_free, check_output_dir_writable
from .rewards import REWARD_SPEC_HELP
from .trainer import DDRLTrainer


@dataclass
class RewardArguments:
    """Which rewards to train on."""

    reward_funcs: list[str] | None = field(
        default=None,
        metadata={"help": f"Required. One or more rewards, each {REWARD_SPEC_HELP}. Weigh several with "
                          f"--reward_weights."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})


def resume_argument(value: str | bool | None) -> str | bool | None:
    """`--resume_from_checkpoint` as `Trainer.train` takes it: `true` / `latest` → True (the newest checkpoint in
    `--output_dir`), `false` / `none` / empty → None, anything else a checkpoint folder."""
    if value is None or isinstance(value, bool):
        return value or None
    if value.strip().lower() in ("true", "latest", "yes", "1"):
        return True
    if value.strip().lower() in ("false", "none", "no", "0", ""):
        return None
    return value


def check_arguments(training_args: DDRLConfig, reward_args: RewardArguments, resume: str | bool | None) -> None:
    """What can be checked before loading the model and data: a reward is named, and `output_dir` may be used."""
    if not reward_args.reward_funcs:
        raise ValueError(
            f"--reward_funcs is required: name the reward(s) to train on, each {REWARD_SPEC_HELP}. There is no "
            f"default: a reward chosen by accident is what RL optimises (the built-in 'brightness' trains toward white "
            f"images)."
        )
    if training_args.should_save:
        check_output_dir_writable(training_args.output_dir)
    check_output_dir_free(training_args, resume)


def load_data(script_args: ScriptArguments) -> tuple[Dataset, Dataset | None]:
    """The train split and, if present, the test split of `--dataset_name`: a Hub id or a `save_to_disk` folder."""
    name = script_args.dataset_name
    if name is None:
        raise ValueError("--dataset_name is required: a Hub dataset id or a folder saved with Dataset.save_to_disk.")
    saved = os.path.isdir(name) and (
        os.path.isfile(os.path.join(name, "dataset_info.json"))
        or os.path.isfile(os.path.join(name, "dataset_dict.json"))
    )
    data = load_from_disk(name) if saved else load_dataset(name, script_args.dataset_config)
    if hasattr(data, "keys"):  # a DatasetDict
        train = data[script_args.dataset_train_split]
        test = data[script_args.dataset_test_split] if script_args.dataset_test_split in data else None
        return train, test
    return data, None


def train(
    script_args: ScriptArguments, training_args: DDRLConfig, model_args: ModelConfig, reward_args: RewardArguments
) -> DDRLTrainer:
    """Build the `DDRLTrainer` from parsed arguments, train (resuming with `--resume_from_checkpoint`), and save the
    adapter (or denoiser) to `output_dir`."""
    resume = resume_argument(training_args.resume_from_checkpoint)
    check_arguments(training_args, reward_args, resume)
    train_data, test_data = load_data(script_args)
    if reward_args.max_train_samples is not None:
        train_data = train_data.select(range(min(reward_args.max_train_samples, len(train_data))))
    peft_config = get_peft_config(model_args)
    if peft_config is not None:
        peft_config.task_type = None  # a diffusers denoiser is not a transformers task model
    trainer = DDRLTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=reward_args.reward_funcs,
        args=training_args,
        train_dataset=train_data,
        eval_dataset=test_data if training_args.eval_strategy != "no" else None,
        peft_config=peft_config,
    )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    return trainer


def run_script(argv: list[str] | None = None, **defaults: Any) -> DDRLTrainer:
    """Parse the command line (and `--config` YAML) over the script's `defaults`, then `train`."""
    parser = TrlParser((ScriptArguments, DDRLConfig, ModelConfig, RewardArguments))
    parser.set_defaults(**defaults)
    return train(*parser.parse_args_and_config(args=argv))
