"""DDRL on Stable Diffusion with a paired prompt/image dataset, TRL style.

    accelerate launch examples/train_sd.py \
        --model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --dataset_name <hub dataset with "prompt" and "image" columns> \
        --reward_funcs brightness --use_peft --lora_r 16 --lora_alpha 16 \
        --output_dir sd15-ddrl --learning_rate 1e-4 --bf16 --report_to tensorboard

or with a YAML file holding the same keys: `accelerate launch examples/train_sd.py --config ddrl.yaml`.
`--dataset_name` may also be a folder written by `Dataset.save_to_disk`, `--model_name_or_path` a local pipeline folder,
and `--reward_funcs` built-in names or `package.module:function` import paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from datasets import load_dataset, load_from_disk
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from ddrl_trl import DDRLConfig, DDRLTrainer


@dataclass
class RewardArguments:
    """Which rewards to train on."""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["brightness"],
        metadata={"help": "Reward names: built-ins (e.g. 'brightness') or 'package.module:function' import paths."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})


def load_data(script_args: ScriptArguments):
    name = script_args.dataset_name
    if name is None:
        raise ValueError("--dataset_name is required: a Hub dataset id or a folder saved with Dataset.save_to_disk.")
    if os.path.isdir(name) and os.path.isfile(os.path.join(name, "dataset_info.json")):
        data = load_from_disk(name)
    elif os.path.isdir(name) and any(f.endswith("state.json") for f in os.listdir(name)):
        data = load_from_disk(name)
    else:
        data = load_dataset(name, script_args.dataset_config)
    if hasattr(data, "keys"):  # a DatasetDict
        train = data[script_args.dataset_train_split]
        test = data[script_args.dataset_test_split] if script_args.dataset_test_split in data else None
        return train, test
    return data, None


def main(script_args: ScriptArguments, training_args: DDRLConfig, model_args: ModelConfig, reward_args: RewardArguments):
    train, test = load_data(script_args)
    if reward_args.max_train_samples is not None:
        train = train.select(range(min(reward_args.max_train_samples, len(train))))
    peft_config = get_peft_config(model_args)
    if peft_config is not None:
        peft_config.task_type = None  # a diffusers denoiser is not a transformers task model
    trainer = DDRLTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=reward_args.reward_funcs,
        args=training_args,
        train_dataset=train,
        eval_dataset=test if training_args.eval_strategy != "no" else None,
        peft_config=peft_config,
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, DDRLConfig, ModelConfig, RewardArguments))
    main(*parser.parse_args_and_config())
