"""DDRL on Stable Diffusion 1.x / 2.x / XL with a paired prompt/image dataset, TRL style.

    accelerate launch examples/train_sd.py \
        --model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --dataset_name <hub dataset with "prompt" and "image" columns> \
        --reward_funcs trl-lib/ddpo-aesthetic-predictor --use_peft --lora_r 16 --lora_alpha 32 \
        --output_dir sd15-ddrl --learning_rate 1e-4 --bf16 --report_to tensorboard

or with a YAML file holding the same keys: `accelerate launch examples/train_sd.py --config ddrl.yaml`.
`--dataset_name` may also be a folder written by `Dataset.save_to_disk`, `--model_name_or_path` a local folder.
`--reward_funcs` is required: built-in names, import paths (`package.module:function` or `package.module.function`),
or reward models by Hub id or folder. Add `--resume_from_checkpoint true` to continue an interrupted run in
`--output_dir`, `--push_to_hub` to publish the adapter with a model card. `ddrl-trl train` (installed with the package)
runs the same thing. See docs/examples.md.

`main` (ddrl_trl/cli/train.py) reads as TRL's `scripts/grpo.py`: check the arguments → load the data →
`DDRLTrainer(model, reward_funcs, args, train_dataset, eval_dataset, peft_config)` →
`train(resume_from_checkpoint=...)` → `save_model` → `push_to_hub`.
"""

from ddrl_trl.cli.train import exit_on_usage_error, main, make_parser

if __name__ == "__main__":
    parser = make_parser(family="sd")
    with exit_on_usage_error("train_sd.py"):  # bad arguments: one line and exit code 2, before anything loads
        script_args, training_args, model_args, reward_args, monitor_args = parser.parse_args_and_config()
        main(script_args, training_args, model_args, reward_args, monitor_args)
