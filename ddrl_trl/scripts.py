"""What every `examples/train_*.py` shares: TRL-style arguments, dataset loading and the train-and-save run.

A training script is then only its model family's defaults:

    from ddrl_trl.scripts import run_script
    run_script(model_name_or_path="stabilityai/stable-diffusion-3.5-medium", resolution=512)

Arguments are parsed by `trl.TrlParser` from `ScriptArguments` (dataset), `DDRLConfig` (training), `ModelConfig`
(model and LoRA) and `RewardArguments`; a YAML `--config` file overrides the script's defaults and command-line
flags override both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset, load_dataset, load_from_disk
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from .config import DDRLConfig
from .trainer import DDRLTrainer


@dataclass
class RewardArguments:
    """Which rewards to train on."""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["brightness"],
        metadata={"help": "Reward names: built-ins (e.g. 'brightness') or 'package.module:function' import paths."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})


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
    """Build the `DDRLTrainer` from parsed arguments, train, and save the adapter (or denoiser) to `output_dir`."""
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
    trainer.train()
    trainer.save_model(training_args.output_dir)
    return trainer


def run_script(argv: list[str] | None = None, **defaults: Any) -> DDRLTrainer:
    """Parse the command line (and `--config` YAML) over the script's `defaults`, then `train`."""
    parser = TrlParser((ScriptArguments, DDRLConfig, ModelConfig, RewardArguments))
    parser.set_defaults(**defaults)
    return train(*parser.parse_args_and_config(args=argv))
