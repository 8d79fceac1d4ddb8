"""Side-by-side timings of the DDRL core on tiny pipelines of each model family (CPU or GPU).

Prints two ratios per family, each measured in this one run with the two variants interleaved (so machine noise hits
both):

1. a DDRL iteration (rollout + rewards + per-step forward/backward with the data term batched into the rollout's
   denoiser forward) vs the same iteration with data_beta=0 — target ≤ 1.15×;
2. a rollout that records states and float32 log-probs (and decodes the samples for the rewards) vs a plain
   `pipeline(...)` call with the same steps, batch and classifier-free guidance (the pipeline's own shipped
   scheduler), decoded too — target ≤ 1.05×.

`--cfg-scale w` (> 1) measures both with classifier-free guided rollouts (both branches in one forward; FLUX: true
CFG; Z-Image and Cosmos: their guidance_scale w − 1) against the pipeline called with the same guidance
(`PipelineAdapter.pipeline_call_kwargs`).

    python benchmarks/bench_core.py [--family NAME ... | all] [--repeats 7] [--steps 20] [--batch 16]
        [--cfg-scale 1.0]

Families: sd, sd3, flux, wan, qwenimage, flux2, flux2-klein, zimage, sana, cosmos (`--family all`: every one; with
`--cfg-scale` > 1 those without an unconditional branch are left out).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import Dataset
from diffusers import DDIMScheduler
from peft import LoraConfig
from PIL import Image

from ddrl_trl import DDRLConfig, DDRLTrainer
from ddrl_trl.adapters import get_adapter
from ddrl_trl.rewards import brightness
from ddrl_trl.step.rollout import SeededNoise
from ddrl_trl.testing import (
    tiny_cosmos_pipeline,
    tiny_flux2_klein_pipeline,
    tiny_flux2_pipeline,
    tiny_flux_pipeline,
    tiny_qwenimage_pipeline,
    tiny_sana_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
    tiny_wan_pipeline,
    tiny_zimage_pipeline,
)
from ddrl_trl.testing.cosmos_pipelines import TINY_MAX_SEQUENCE_LENGTH as COSMOS_LENGTH

PROMPTS = ["a red cat", "a blue dog", "a green bird", "a small house"] * 2


@dataclass
class Family:
    """How to build, train and plainly call one family's tiny pipeline."""

    build: callable
    resolution: int
    config: dict = field(default_factory=dict)  # DDRLConfig overrides
    call: dict = field(default_factory=dict)  # plain pipeline-call kwargs beyond `pipeline_call_kwargs`
    num_frames: int | None = None


FAMILIES = {
    "sd": Family(lambda: tiny_sd_pipeline(sample_size=16), 64, call={"eta": 1.0}),
    # `pipeline_call_kwargs` carries the sequence lengths, guidance (and its conversions) and family options
    "sd3": Family(tiny_sd3_pipeline, 64, {"max_sequence_length": 16}),
    "flux": Family(tiny_flux_pipeline, 128, {"max_sequence_length": 16}),
    "wan": Family(tiny_wan_pipeline, 64, {"max_sequence_length": 16, "num_frames": 9}, num_frames=9),
    "qwenimage": Family(tiny_qwenimage_pipeline, 64, {"max_sequence_length": 16}),
    "flux2": Family(tiny_flux2_pipeline, 64, {"max_sequence_length": 16}),
    "flux2-klein": Family(tiny_flux2_klein_pipeline, 64, {"max_sequence_length": 16}),
    "zimage": Family(tiny_zimage_pipeline, 64, {"max_sequence_length": 16}),
    "sana": Family(tiny_sana_pipeline, 64, {"max_sequence_length": 16}),
    "cosmos": Family(tiny_cosmos_pipeline, 32, {"max_sequence_length": COSMOS_LENGTH, "num_frames": 9}, num_frames=9),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def reference_data(family: Family) -> Dataset:
    rng = np.random.default_rng(0)
    side = family.resolution

    def image():
        return Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))

    if family.num_frames:
        videos = [[image() for _ in range(family.num_frames)] for _ in PROMPTS]
        return Dataset.from_dict({"prompt": PROMPTS, "video": videos})
    return Dataset.from_dict({"prompt": PROMPTS, "image": [image() for _ in PROMPTS]})


def make_trainer(family: Family, data_beta: float, args_ns, output_dir: str) -> DDRLTrainer:
    config = DDRLConfig(
        output_dir=output_dir,
        num_generations=8,
        per_device_train_batch_size=args_ns.batch,
        num_inference_steps=args_ns.steps,
        data_beta=data_beta,
        report_to="none",
        log_sample_images_steps=0,
        learning_rate=1e-4,
        warmup_steps=0,
        save_strategy="no",
        dataloader_pin_memory=False,
        use_cpu=not torch.cuda.is_available(),
        resolution=family.resolution,
        cfg_scale=args_ns.cfg_scale,
        **family.config,
    )
    return DDRLTrainer(
        model=family.build(),
        reward_funcs=brightness,
        args=config,
        train_dataset=reference_data(family),
        peft_config=LoraConfig(r=8, lora_alpha=8),
    )


def bench_family(name: str, args_ns) -> tuple[float, float]:
    family = FAMILIES[name]
    with tempfile.TemporaryDirectory() as tmp:
        ddrl = make_trainer(family, None, args_ns, tmp + "/a")  # DDRLConfig's default for this guidance
        data_beta = ddrl.args.data_beta
        grpo = make_trainer(family, 0.0, args_ns, tmp + "/b")
        device = ddrl.accelerator.device
        batch = ddrl._prepare_inputs(next(iter(ddrl.get_train_dataloader())))
        prompts = batch["prompts"]
        unique = prompts[:: ddrl.args.num_generations]

        def iteration(trainer):
            trainer.training_step(trainer.model, batch)
            trainer.model.zero_grad(set_to_none=True)

        def rollout():  # what a training step's rollout does: encode the prompts (and negatives), then sample
            conditions = ddrl.policy.conditioning(unique).repeat(ddrl.args.num_generations)
            ddrl.policy.rollout(conditions, SeededNoise(0, device, ddrl.args.num_generations), range(len(prompts)))

        pipe = ddrl.pipeline
        if name == "sd":  # the stochastic DDIM the rollout uses, so both do the same work
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)

        def plain_call():
            with torch.no_grad():
                pipe(
                    prompt=list(prompts),  # a copy: Z-Image rewrites its prompt list in place
                    output_type="pt",  # decoded, as the rollout decodes its samples for the rewards
                    generator=torch.Generator(device=device).manual_seed(0),
                    **ddrl.adapter.pipeline_call_kwargs(ddrl.args, len(prompts)),
                    **family.call,
                )

        for fn in (lambda: iteration(ddrl), lambda: iteration(grpo), rollout, plain_call):  # warm-up
            fn()
        times = {"ddrl": [], "grpo": [], "rollout": [], "pipeline": []}
        for _ in range(args_ns.repeats):
            times["ddrl"].append(timed(lambda: iteration(ddrl), device))
            times["grpo"].append(timed(lambda: iteration(grpo), device))
            times["rollout"].append(timed(rollout, device))
            times["pipeline"].append(timed(plain_call, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    frames = f" x {family.num_frames} frames" if family.num_frames else ""
    print(
        f"[{name}] {type(pipe).__name__} device={device} batch={args_ns.batch} steps={args_ns.steps} "
        f"{ddrl.resolution}px{frames} cfg_scale={args_ns.cfg_scale} repeats={args_ns.repeats} (medians)"
    )
    rows = [
        (f"DDRL iteration, data_beta={data_beta} (data batched into the forward)", med["ddrl"]),
        ("same iteration, data_beta=0 (plain GRPO)", med["grpo"]),
        ("rollout recording states + float32 log-probs", med["rollout"]),
        (f"plain pipeline(...) call, same steps, batch and guidance {args_ns.cfg_scale}", med["pipeline"]),
    ]
    for label, seconds in rows:
        print(f"  {label:<64}{seconds:>8.3f} s")
    ratios = med["ddrl"] / med["grpo"], med["rollout"] / med["pipeline"]
    print(f"  ratio 1: DDRL / GRPO iteration      = {ratios[0]:.3f}  (target <= 1.15)")
    print(f"  ratio 2: rollout / pipeline call    = {ratios[1]:.3f}  (target <= 1.05)", flush=True)
    return ratios


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=[*FAMILIES, "all"], default=["sd"], nargs="+")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 gives steadier timings)")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance of rollouts (1 = off)")
    args_ns = parser.parse_args()
    if args_ns.threads:
        torch.set_num_threads(args_ns.threads)
    torch.manual_seed(0)
    names = list(FAMILIES) if "all" in args_ns.family else args_ns.family
    if args_ns.cfg_scale > 1:  # families without an unconditional branch (FLUX.2 [dev]) have no guided rollout
        names = [name for name in names if get_adapter(FAMILIES[name].build()).supports_cfg]
    results = {name: bench_family(name, args_ns) for name in names}
    if len(results) > 1:
        print("family       DDRL/GRPO  rollout/pipeline")
        for name, (r1, r2) in results.items():
            print(f"{name:<12} {r1:>9.3f}  {r2:>16.3f}")


if __name__ == "__main__":
    main()
