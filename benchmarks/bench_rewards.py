"""Reward timings, side by side in one run.

1. Overlap: a DDRL iteration with a deliberately slow reward (sleeps `--reward-seconds` per call, like a large reward
   model or a remote one) scored after the whole rollout vs scored chunk by chunk in the background while the next
   chunk is rolled out (`overlap_rewards=True`). Both roll out one group per chunk, so they do identical work.
2. Reward service load: `--clients` concurrent `RemoteReward` clients × `--requests` requests each against a real
   `ddrl-trl serve-reward` on loopback; prints throughput and latency percentiles.

    python benchmarks/bench_rewards.py [--repeats 5] [--reward-seconds 0.25] [--clients 8] [--requests 50]
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import requests
import torch
from datasets import Dataset
from peft import LoraConfig
from PIL import Image

from ddrl_trl import DDRLConfig, DDRLTrainer
from ddrl_trl.service import RemoteReward
from ddrl_trl.testing import tiny_sd_pipeline


def overlap(args_ns) -> None:
    rng = np.random.default_rng(0)
    prompts = ["a red cat", "a blue dog", "a green bird", "a small house"]
    data = Dataset.from_dict(
        {
            "prompt": prompts,
            "image": [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in prompts],
        }
    )

    def slow_reward(images, prompts, **_):
        time.sleep(args_ns.reward_seconds)
        return images.float().flatten(1).mean(1).tolist()

    def trainer(overlap_rewards: bool, out: str) -> DDRLTrainer:
        config = DDRLConfig(
            output_dir=out,
            num_generations=8,
            per_device_train_batch_size=32,
            num_inference_steps=args_ns.steps,
            rollout_chunk_groups=1,
            overlap_rewards=overlap_rewards,
            report_to="none",
            log_sample_images_steps=0,
            save_strategy="no",
            use_cpu=not torch.cuda.is_available(),
            dataloader_pin_memory=False,
        )
        return DDRLTrainer(
            model=tiny_sd_pipeline(),
            reward_funcs=slow_reward,
            args=config,
            train_dataset=data,
            peft_config=LoraConfig(r=8, lora_alpha=8),
        )

    with tempfile.TemporaryDirectory() as tmp:
        plain, overlapped = trainer(False, tmp + "/a"), trainer(True, tmp + "/b")
        batch = plain._prepare_inputs(next(iter(plain.get_train_dataloader())))

        def iteration(t: DDRLTrainer) -> float:
            start = time.perf_counter()
            t.training_step(t.model, batch)
            t.model.zero_grad(set_to_none=True)
            return time.perf_counter() - start

        iteration(plain), iteration(overlapped)  # warm-up
        times = {"plain": [], "overlapped": []}
        for _ in range(args_ns.repeats):
            times["plain"].append(iteration(plain))
            times["overlapped"].append(iteration(overlapped))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"[overlap] 4 groups x 8 rollouts, {args_ns.steps} steps, reward sleeps {args_ns.reward_seconds} s per "
        f"group, repeats={args_ns.repeats} (medians)"
    )
    print(f"  rewards after the rollout (overlap_rewards=False)         {med['plain']:8.3f} s")
    print(f"  rewards overlapped with the rollout (overlap_rewards=True) {med['overlapped']:8.3f} s")
    print(f"  ratio overlapped / not = {med['overlapped'] / med['plain']:.3f}")


def load(args_ns) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        token_file = os.path.join(tmp, "token")
        with open(token_file, "w") as f:
            f.write(secrets.token_urlsafe(32))
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ddrl_trl.cli.command",
                "serve-reward",
                "--reward",
                "brightness",
                "--port",
                str(port),
                "--token-file",
                token_file,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(600):
                try:
                    if requests.get(url + "/health", timeout=1).ok:
                        break
                except requests.ConnectionError:
                    time.sleep(0.1)
            latencies: list[float] = []
            lock = threading.Lock()
            images = torch.rand(args_ns.batch, 3, args_ns.size, args_ns.size)

            def client():
                remote = RemoteReward(url, token_file=token_file)
                for _ in range(args_ns.requests):
                    start = time.perf_counter()
                    remote(images, ["a prompt"] * args_ns.batch)
                    with lock:
                        latencies.append(time.perf_counter() - start)

            threads = [threading.Thread(target=client) for _ in range(args_ns.clients)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
            health = requests.get(url + "/health", timeout=5).json()
        finally:
            server.kill()
    q = np.percentile(np.array(latencies) * 1000, [50, 90, 99])
    print(
        f"[service] {args_ns.clients} clients x {args_ns.requests} requests of {args_ns.batch} images "
        f"{args_ns.size}x{args_ns.size}, brightness reward on loopback"
    )
    print(
        f"  {len(latencies)} requests in {wall:.2f} s: {len(latencies) / wall:.1f} requests/s, "
        f"{len(latencies) * args_ns.batch / wall:.0f} images/s"
    )
    print(
        f"  latency p50 {q[0]:.1f} ms, p90 {q[1]:.1f} ms, p99 {q[2]:.1f} ms; "
        f"{health['batches']} reward calls for {health['requests']} requests (micro-batching)"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reward-seconds", type=float, default=0.25)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8, help="images per request")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--only", choices=["overlap", "service"], default=None)
    args_ns = parser.parse_args()
    if args_ns.only in (None, "overlap"):
        overlap(args_ns)
    if args_ns.only in (None, "service"):
        load(args_ns)


if __name__ == "__main__":
    main()
