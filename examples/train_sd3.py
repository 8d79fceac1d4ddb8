"""DDRL on Stable Diffusion 3 / 3.5 (or FLUX.1) with a paired prompt/image dataset, TRL style.

    accelerate launch examples/train_sd3.py \
        --dataset_name <hub dataset with "prompt" and "image" columns> \
        --reward_funcs mypackage.rewards:ocr --output_dir sd35m-ddrl --report_to tensorboard

The defaults are the SD3.5-Medium setup of docs/examples.md (`FAMILY_DEFAULTS["sd3"]` in ddrl_trl/cli/families.py:
LoRA r 32 / alpha 64 on the attention projections, 512 px, bf16 with gradient checkpointing); every one can be
overridden on the command line or in a `--config` YAML. For FLUX.1, run `ddrl-trl train --family flux ...`
(FLUX.1-dev's defaults, its distilled guidance embedding at `--guidance_scale 3.5`), or this script with
`--model_name_or_path black-forest-labs/FLUX.1-dev`. The flow is `main` in ddrl_trl/cli/train.py, as in
examples/train_sd.py.
"""

from ddrl_trl.cli.train import exit_on_usage_error, main, make_parser

if __name__ == "__main__":
    parser = make_parser(family="sd3")
    with exit_on_usage_error("train_sd3.py"):  # bad arguments: one line and exit code 2, before anything loads
        script_args, training_args, model_args, reward_args, monitor_args = parser.parse_args_and_config()
        main(script_args, training_args, model_args, reward_args, monitor_args)
