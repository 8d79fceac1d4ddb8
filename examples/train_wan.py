"""DDRL on Wan text-to-video with a paired prompt/video dataset, TRL style.

    accelerate launch examples/train_wan.py \
        --dataset_name <hub dataset with "prompt" and "video" columns> \
        --reward_funcs mypackage.rewards:video_align --output_dir wan-ddrl --report_to tensorboard

The `video` column holds, per row, a list of frames (a `datasets` Sequence of Image), an (F, H, W, 3) array or a video
file path (MP4 needs `pip install "ddrl-trl[video]"`). Every video must have exactly `--num_frames` frames (4k + 1);
anything else is refused, naming the row, before training starts. Defaults (`FAMILY_DEFAULTS["wan"]` in
ddrl_trl/cli/families.py): Wan 2.1 T2V 1.3B, 33-frame 480x480 clips, LoRA r 32, bf16 with gradient checkpointing; see
docs/examples.md for memory. The flow is `main` in ddrl_trl/cli/train.py, as in examples/train_sd.py.
"""

from ddrl_trl.cli.train import exit_on_usage_error, main, make_parser

if __name__ == "__main__":
    parser = make_parser(family="wan")
    with exit_on_usage_error("train_wan.py"):  # bad arguments: one line and exit code 2, before anything loads
        script_args, training_args, model_args, reward_args, monitor_args = parser.parse_args_and_config()
        main(script_args, training_args, model_args, reward_args, monitor_args)
