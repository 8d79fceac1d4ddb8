"""A tiny DDRL LoRA training for the multi-process test: `accelerate launch tests/ddp_train.py OUT PER_DEVICE_BATCH`.

Writes the trained LoRA (`OUT/pytorch_lora_weights.safetensors`) and, from the main process, the logged rewards and
the rollout's initial noise of every process (`OUT/result.json`), so runs with 1 and 2 processes can be compared.
"""

import json
import sys

import numpy as np
import torch
from datasets import Dataset
from peft import LoraConfig
from PIL import Image

import ddrl_trl.trainer as trainer_module
from ddrl_trl import DDRLConfig, DDRLTrainer
from ddrl_trl.tiny_pipelines import tiny_sd_pipeline

torch.set_num_threads(1)
out, per_device = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
dataset = Dataset.from_dict({
    "prompt": ["a red cat", "a blue dog", "a green bird", "a white house", "a black car", "a small tree"],
    "image": [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(6)],
})  # fmt: skip

initial_noise = []
original = trainer_module.rollout_and_score


def recording(*args, **kwargs):
    rollout, scores = original(*args, **kwargs)
    initial_noise.append(rollout.initial_noise)
    return rollout, scores


trainer_module.rollout_and_score = recording
args = DDRLConfig(
    output_dir=out, num_generations=4, per_device_train_batch_size=per_device, num_inference_steps=4,
    train_step_stride=1, max_steps=2, learning_rate=1e-3, warmup_steps=0, logging_steps=1, report_to="none",
    log_sample_images_steps=0, save_strategy="no", seed=0, dataloader_pin_memory=False, data_beta=0.5,
    use_cpu=True,  # on a machine without GPUs, transformers sets up gloo multi-process only when told it is on CPU
)  # fmt: skip
trainer = DDRLTrainer(
    model=tiny_sd_pipeline(), reward_funcs="brightness", args=args, train_dataset=dataset, eval_dataset=dataset,
    peft_config=LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian"),
)  # fmt: skip
trainer.train()
trainer.save_model()
evaluation = trainer.evaluate()  # the held-out samples are split across processes
noise = trainer.accelerator.gather(torch.stack(initial_noise).flatten(2).contiguous())  # (processes·steps, b, D)
if trainer.accelerator.is_main_process:
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    losses = [h["loss/data"] for h in trainer.state.log_history if "loss/data" in h]
    with open(f"{out}/result.json", "w") as f:
        json.dump({"rewards": rewards, "data_losses": losses, "processes": trainer.accelerator.num_processes,
                   "eval_loss": evaluation["eval_diffusion_loss"], "eval_ratio": evaluation["eval_diffusion_loss_ratio"],
                   "initial_noise": noise.tolist()}, f)  # fmt: skip
