"""Side-by-side timings of the DDRL core on a tiny Stable Diffusion pipeline (CPU or GPU).

Prints two ratios, each measured in this one run with the two variants interleaved (so machine noise hits both):

1. a DDRL iteration (rollout + rewards + per-step forward/backward with the data term batched into the rollout's
   denoiser forward) vs the same iteration with data_beta=0 — target ≤ 1.15×;
2. a rollout that records states and float32 log-probs vs a plain `pipeline(...)` call with the same steps, batch and
   no guidance — target ≤ 1.05×.

    python benchmarks/bench_core.py [--repeats 7] [--steps 20] [--batch 16] [--sample-size 16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
from datasets import Dataset
from PIL import Image

from ddrl_trl import DDRLConfig, DDRLTrainer
from ddrl_trl.rewards import brightness
from ddrl_trl.rollout import generate_rollouts
from ddrl_trl.tiny_pipelines import tiny_sd_pipeline


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def make_trainer(data_beta: float, args_ns, output_dir: str) -> DDRLTrainer:
    rng = np.random.default_rng(0)
    res = args_ns.sample_size * 2
    images = [Image.fromarray(rng.integers(0, 255, (res, res, 3), dtype=np.uint8)) for _ in range(8)]
    prompts = ["a red cat", "a blue dog", "a green bird", "a small house"] * 2
    dataset = Dataset.from_dict({"prompt": prompts, "image": images})
    config = DDRLConfig(
        output_dir=output_dir, num_generations=8, per_device_train_batch_size=args_ns.batch,
        num_inference_steps=args_ns.steps, data_beta=data_beta, report_to="none", log_sample_images_steps=0,
        learning_rate=1e-4, warmup_steps=0, save_strategy="no", dataloader_pin_memory=False,
        use_cpu=not torch.cuda.is_available(),
    )
    from peft import LoraConfig

    return DDRLTrainer(
        model=tiny_sd_pipeline(sample_size=args_ns.sample_size), reward_funcs=brightness, args=config,
        train_dataset=dataset, peft_config=LoraConfig(r=8, lora_alpha=8),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 gives steadier timings)")
    parser.add_argument("--sample-size", type=int, default=16, help="latent side; images are 4x that")
    args_ns = parser.parse_args()
    if args_ns.threads:
        torch.set_num_threads(args_ns.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        data_beta = DDRLConfig.data_beta
        ddrl, grpo = make_trainer(data_beta, args_ns, tmp + "/a"), make_trainer(0.0, args_ns, tmp + "/b")
        device = ddrl.accelerator.device
        batch = ddrl._prepare_inputs(next(iter(ddrl.get_train_dataloader())))

        def iteration(trainer):
            trainer.training_step(trainer.model, batch)
            trainer.model.zero_grad(set_to_none=True)

        pipe = ddrl.pipeline
        prompts = batch["prompts"]
        unique = prompts[:: ddrl.args.num_generations]

        def rollout():
            with torch.no_grad():
                cond = ddrl.adapter.encode_prompts(unique)
                generate_rollouts(ddrl.adapter, ddrl.sampler, cond, ddrl.args.num_generations, ddrl.latent_shape,
                                  torch.Generator(device=device).manual_seed(0))

        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)

        def plain_call():
            with torch.no_grad():
                pipe(prompts, num_inference_steps=args_ns.steps, guidance_scale=1.0, eta=1.0, output_type="pt",
                     height=ddrl.resolution, width=ddrl.resolution, generator=torch.Generator(device=device).manual_seed(0))

        for fn in (lambda: iteration(ddrl), lambda: iteration(grpo), rollout, plain_call):  # warm-up
            fn()
        times = {"ddrl": [], "grpo": [], "rollout": [], "pipeline": []}
        for _ in range(args_ns.repeats):
            times["ddrl"].append(timed(lambda: iteration(ddrl), device))
            times["grpo"].append(timed(lambda: iteration(grpo), device))
            times["rollout"].append(timed(rollout, device))
            times["pipeline"].append(timed(plain_call, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device={device} batch={args_ns.batch} steps={args_ns.steps} image={ddrl.resolution}px "
          f"repeats={args_ns.repeats} (medians)")
    rows = [
        (f"DDRL iteration, data_beta={data_beta} (data batched into the forward)", med["ddrl"]),
        ("same iteration, data_beta=0 (plain GRPO)", med["grpo"]),
        ("rollout recording states + float32 log-probs", med["rollout"]),
        ("plain pipeline(...) call, same steps and batch, no guidance", med["pipeline"]),
    ]
    for label, seconds in rows:
        print(f"  {label:<64}{seconds:>8.3f} s")
    print(f"ratio 1: DDRL / GRPO iteration      = {med['ddrl'] / med['grpo']:.3f}  (target <= 1.15)")
    print(f"ratio 2: rollout / pipeline call    = {med['rollout'] / med['pipeline']:.3f}  (target <= 1.05)")

if __name__ == "__main__":
    main()
