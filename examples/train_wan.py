"""DDRL on Wan text-to-video with a paired prompt/video dataset, TRL style.

    accelerate launch examples/train_wan.py \
        --dataset_name <hub dataset with "prompt" and "video" columns> \
        --reward_funcs mypackage.rewards:video_align --output_dir wan-ddrl --report_to tensorboard

The `video` column holds, per row, a list of frames (a `datasets` Sequence of Image), an (F, H, W, 3) array or a video
file path (MP4 needs `pip install "ddrl-trl[video]"`). Every video must have exactly `--num_frames` frames (4k + 1),
with a short side of at least `--resolution`; anything else is refused, naming the row, before training starts.
Defaults below: Wan 2.1 T2V 1.3B, 33-frame 480x480 clips, LoRA r 32, bf16 with gradient checkpointing; see
docs/examples.md for memory.
"""

from ddrl_trl.scripts import run_script

if __name__ == "__main__":
    run_script(
        model_name_or_path="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        image_column="video",
        resolution=480,
        num_frames=33,
        num_inference_steps=20,
        num_generations=8,
        per_device_train_batch_size=8,
        use_peft=True,
        lora_r=32,
        lora_alpha=32,
        learning_rate=1e-4,
        bf16=True,
        gradient_checkpointing=True,
    )
