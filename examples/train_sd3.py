"""DDRL on Stable Diffusion 3 / 3.5 (or FLUX.1) with a paired prompt/image dataset, TRL style.

    accelerate launch examples/train_sd3.py \
        --dataset_name <hub dataset with "prompt" and "image" columns> \
        --reward_funcs mypackage.rewards:ocr --output_dir sd35m-ddrl --report_to tensorboard

The defaults below are the SD3.5-Medium setup of docs/examples.md (LoRA r 32 on the attention projections, 512 px,
bf16 with gradient checkpointing); every one can be overridden on the command line or in a `--config` YAML. The same
script trains FLUX.1 with `--model_name_or_path black-forest-labs/FLUX.1-dev` (its distilled guidance embedding gets
`--guidance_scale`, 3.5 by default).
"""

from ddrl_trl.scripts import run_script

if __name__ == "__main__":
    run_script(
        model_name_or_path="stabilityai/stable-diffusion-3.5-medium",
        resolution=512,
        num_inference_steps=20,
        num_generations=8,
        per_device_train_batch_size=8,
        use_peft=True,
        lora_r=32,
        lora_alpha=64,
        learning_rate=3e-4,
        bf16=True,
        gradient_checkpointing=True,
    )
