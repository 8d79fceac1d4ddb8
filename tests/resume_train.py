"""A 6-step DDRL LoRA training with EMA, for the kill-and-resume test: `python tests/resume_train.py OUT MODE`.

MODE: `straight` (6 steps), `kill-after-save` (SIGKILL right after checkpoint-3 is written), `kill-mid-save`
(SIGKILL in the middle of writing checkpoint-6, after checkpoint-3), `resume` (resume_from_checkpoint=True to step 6).
"""

import os
import signal
import sys

import numpy as np
import torch
from datasets import Dataset
from peft import LoraConfig
from PIL import Image
from transformers import TrainerCallback

from ddrl_trl import DDRLConfig, DDRLTrainer
from ddrl_trl.testing import tiny_sd_pipeline

torch.set_num_threads(1)
out, mode = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
dataset = Dataset.from_dict(
    {
        "prompt": ["a red cat", "a blue dog", "a green bird"],
        "image": [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(3)],
    }
)


class KillAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 3:
            os.kill(os.getpid(), signal.SIGKILL)


args = DDRLConfig(
    output_dir=out,
    num_generations=2,
    per_device_train_batch_size=4,
    num_inference_steps=4,
    train_step_stride=1,
    max_steps=6,
    learning_rate=1e-3,
    lr_scheduler_type="cosine",
    warmup_steps=2,
    logging_steps=1,
    report_to="none",
    log_sample_images_steps=0,
    save_strategy="steps",
    save_steps=3,
    seed=0,
    dataloader_pin_memory=False,
    ema_decay=0.9,
    use_cpu=True,
)
trainer = DDRLTrainer(
    model=tiny_sd_pipeline(),
    reward_funcs="brightness",
    args=args,
    train_dataset=dataset,
    peft_config=LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian"),
    callbacks=[KillAfterSave()] if mode == "kill-after-save" else None,
)
if mode == "kill-mid-save":
    original = trainer._save_rng_state

    def dying_save_rng_state(output_dir):
        if trainer.state.global_step == 6:  # model, optimizer and scheduler of checkpoint-6 are on disk by now
            os.kill(os.getpid(), signal.SIGKILL)
        original(output_dir)

    trainer._save_rng_state = dying_save_rng_state
trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
trainer.save_model(os.path.join(out, "final"))  # the EMA weights
torch.save({k: v.clone() for k, v in trainer.model.state_dict().items() if "lora" in k}, os.path.join(out, "raw.pt"))
