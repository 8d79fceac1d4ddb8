"""A tiny DDRL training for the multi-process tests:
`accelerate launch [DDP or DeepSpeed flags] tests/ddp_train.py OUT PER_DEVICE_BATCH [--full] [--accumulation K]
[--optim NAME] [--learning-rate LR] [--max-steps N] [--save-steps K] [--resume CHECKPOINT] [--bf16]
[--nan-loss-at-step N [--nan-rank R]] [--num-iterations MU] [--epsilon EPS] [--cfg-scale W] [--prompt-dropout P]
[--target-loss-ratio R] [--validation]`.

Writes the trained weights (`OUT/pytorch_lora_weights.safetensors`, or `OUT/unet/` for full fine-tuning) and, from
the main process, the logged metrics (rewards, data losses, ratios) and the rollout's initial noise of every process
(`OUT/result.json`), so runs with 1 and 2 processes, or with and without DeepSpeed, can be compared.
"""

import argparse
import json

import numpy as np
import torch
from datasets import Dataset
from peft import LoraConfig
from PIL import Image

from ddrl_trl import DDRLConfig, DDRLTrainer
from ddrl_trl.step.hooks import register
from ddrl_trl.testing import tiny_sd_pipeline

torch.set_num_threads(1)
parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("per_device", type=int)
parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
parser.add_argument("--accumulation", type=int, default=1)
parser.add_argument("--optim", default="adamw_torch", help="sgd: updates linear in the gradient, to compare its scale")
parser.add_argument("--learning-rate", type=float, default=1e-3)
parser.add_argument("--max-steps", type=int, default=2)
parser.add_argument("--save-steps", type=int, default=0, help="a checkpoint every K steps (0: none)")
parser.add_argument("--resume", default=None, help="checkpoint folder to resume from")
parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (launch with --mixed_precision bf16)")
parser.add_argument("--nan-loss-at-step", type=int, default=0, help="make the policy loss NaN in that step (1-based)")
parser.add_argument("--nan-rank", type=int, default=-1, help="only on that process (-1: on all)")
parser.add_argument("--num-iterations", type=int, default=1, help="optimiser steps per rollout batch")
parser.add_argument("--epsilon", type=float, default=1e-4, help="PPO clip range")
parser.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance of rollouts")
parser.add_argument("--prompt-dropout", type=float, default=None, help="the data term's data_prompt_dropout")
parser.add_argument("--target-loss-ratio", type=float, default=None, help="adaptive data_beta's target")
parser.add_argument("--validation", action="store_true", help="3 validation prompts × 3 samples (9 rows)")
cli = parser.parse_args()
rng = np.random.default_rng(0)
dataset = Dataset.from_dict(
    {
        "prompt": ["a red cat", "a blue dog", "a green bird", "a white house", "a black car", "a small tree"],
        "image": [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(6)],
    }
)

initial_noise = []
register("rollout_end", lambda rollout, scores: initial_noise.append(rollout.initial_noise))


def nan_at_step(step_index, terms):
    """The policy loss made NaN at `--nan-loss-at-step` (the loss alone: its gradients stay finite, so no NaN reaches
    DDP's all-reduce)."""
    rank_hit = cli.nan_rank in (-1, trainer.accelerator.process_index)
    if trainer.state.global_step + 1 == cli.nan_loss_at_step and rank_hit:
        terms.loss = terms.loss + float("nan")
        terms.policy = terms.policy + float("nan")


register("step_terms", nan_at_step)
args = DDRLConfig(
    output_dir=cli.out,
    num_generations=4,
    per_device_train_batch_size=cli.per_device,
    num_inference_steps=4,
    train_step_stride=1,
    max_steps=cli.max_steps,
    learning_rate=cli.learning_rate,
    warmup_steps=0,
    logging_steps=1,
    report_to="none",
    log_sample_images_steps=0,
    seed=0,
    data_beta=1.5 if cli.cfg_scale > 1 else 0.5,  # the guided default at w = 2: no weak-anchor warning
    save_strategy="steps" if cli.save_steps else "no",
    save_steps=cli.save_steps or 1,
    gradient_accumulation_steps=cli.accumulation,
    optim=cli.optim,
    bf16=cli.bf16,
    num_iterations=cli.num_iterations,
    epsilon=cli.epsilon,
    cfg_scale=cli.cfg_scale,
    data_prompt_dropout=cli.prompt_dropout,
    target_loss_ratio=cli.target_loss_ratio,
    validation_prompts=["a red cat", "a blue dog", "a green bird"] if cli.validation else None,
    validation_images_per_prompt=3,
    use_cpu=True,  # on a machine without GPUs, transformers sets up gloo multi-process only when told it is on CPU
)
trainer = DDRLTrainer(
    model=tiny_sd_pipeline(),
    reward_funcs="brightness",
    args=args,
    train_dataset=dataset,
    eval_dataset=dataset,
    peft_config=LoraConfig(r=4, lora_alpha=16, init_lora_weights="gaussian") if not cli.full else None,
)
trainer.train(resume_from_checkpoint=cli.resume)
trainer.save_model()
evaluation = trainer.evaluate()  # the held-out samples are split across processes
noise = trainer.accelerator.gather(torch.stack(initial_noise).flatten(2).contiguous())  # (processes·steps, b, D)
if trainer.accelerator.is_main_process:
    logged = {
        key: [h[key] for h in trainer.state.log_history if key in h]
        for key in ("reward", "loss/data", "ratio/mean", "clip_fraction", "nonfinite_steps", "data_beta")
    }
    with open(f"{cli.out}/result.json", "w") as f:
        json.dump(
            {
                "rewards": logged["reward"],
                "data_losses": logged["loss/data"],
                "ratios": logged["ratio/mean"],
                "clip_fractions": logged["clip_fraction"],
                "nonfinite_steps": logged["nonfinite_steps"],
                "data_betas": logged["data_beta"],
                "data_beta_state": trainer.data_beta_control.state_dict() if trainer.data_beta_control else None,
                "processes": trainer.accelerator.num_processes,
                "distributed_type": str(trainer.accelerator.distributed_type),
                "eval_loss": evaluation["eval_diffusion_loss"],
                "eval_ratio": evaluation["eval_diffusion_loss_ratio"],
                "eval_guided_ratio": evaluation.get("eval_guided_diffusion_loss_ratio"),
                "validation": {k: v for k, v in evaluation.items() if "rewards/" in k or "diversity" in k},
                "initial_noise": noise.tolist(),
            },
            f,
        )
# Tear the process group down before exit: a gloo thread still joinable at interpreter exit can abort one rank
# ("terminate called without an active exception") after all the work is done.
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
