"""Multi-process DDRL under `accelerate launch` on CPU — DDP (gloo) and DeepSpeed ZeRO-2/3 — gives the result of one
process on the same seeds."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddrl_trl.step.groups import GroupLayout
from ddrl_trl.testing import tiny_sd_pipeline

TESTS = Path(__file__).resolve().parent


def test_group_layout_by_hand():
    # 12 rows, groups of 4, 2 processes of 6 rows: group 1 spans the processes (rows 4, 5 | 6, 7)
    first, second = GroupLayout(6, 4, 0, 2), GroupLayout(6, 4, 1, 2)
    assert (first.groups, first.counts, first.first_local_rows) == ([0, 1], [4, 2], [0, 4])
    assert (second.groups, second.counts, second.first_local_rows) == ([1, 2], [2, 4], [0, 2])
    assert list(second.global_rows) == [6, 7, 8, 9, 10, 11] and second.local_slice == slice(6, 12)
    # data-term weights: mean over processes of Σ_g (w_g / G_p) · loss_g must be the plain mean over the 3 groups
    per_group = {0: 0.0, 1: 0.0, 2: 0.0}
    for layout in (first, second):
        for g, w in zip(layout.groups, layout.data_weights):
            per_group[g] += w / len(layout.groups) / 2
    assert per_group == {0: 1 / 3, 1: 1 / 3, 2: 1 / 3}
    assert GroupLayout(8, 4).data_weights == [1.0, 1.0]  # whole groups: the plain mean


ONE_PROCESS = ["--num_processes", "1"]
DDP = ["--multi_gpu", "--num_processes", "2"]


def deepspeed(stage: int) -> list[str]:
    """`accelerate launch` flags for DeepSpeed ZeRO-`stage` on 2 processes (DeepSpeed's CPU accelerator here)."""
    gathered_save = ["--zero3_save_16bit_model", "true"] if stage == 3 else []
    return [
        "--use_deepspeed",
        "--zero_stage",
        str(stage),
        "--gradient_clipping",
        "1.0",
        *gathered_save,
        "--num_processes",
        "2",
    ]


def launch(
    out: Path,
    launcher: list[str],
    per_device: int,
    *options: str,
    mixed_precision: str = "no",
    expect_failure: bool = False,
) -> dict | subprocess.CompletedProcess:
    """Run `tests/ddp_train.py` under `accelerate launch <launcher>`; return its `result.json` (or, with
    `expect_failure`, the failed process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launcher,
        "--num_machines",
        "1",
        "--mixed_precision",
        mixed_precision,
        "--dynamo_backend",
        "no",
        str(TESTS / "ddp_train.py"),
        str(out),
        str(per_device),
        *options,
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if expect_failure:
        assert result.returncode != 0, "the run was expected to fail"
        return result
    assert result.returncode == 0, result.stderr[-4000:]
    return {**json.loads((out / "result.json").read_text()), "stderr": result.stderr}


def test_two_processes_match_one_process(tmp_path):
    """Global batch 12 = 3 groups of 4: one process with 12 rows vs two with 6 (group 1 spans both); data_beta
    adapted (`target_loss_ratio`) from the signal of both processes; 9 validation rows split 5 + 4."""
    single = launch(tmp_path / "one", ONE_PROCESS, 12, "--target-loss-ratio", "1.05", "--validation")
    double = launch(tmp_path / "two", DDP, 6, "--target-loss-ratio", "1.05", "--validation")
    assert (single["processes"], double["processes"]) == (1, 2)
    # a quiet run: DDP does not search for unused parameters (and warn about it on every process), nothing pins memory
    assert "find_unused_parameters=True was specified" not in double["stderr"]
    assert "pin_memory" not in double["stderr"] + single["stderr"]
    # rewards are gathered over both processes before advantages: the logged batch reward is the global one. Two
    # processes sample 6 rows per forward where one samples 12: float32 results of different batch shapes are not
    # bitwise portable across CPUs (they differed in the 7th digit on one), so compare to float32 round-off
    assert double["rewards"] == pytest.approx(single["rewards"], rel=1e-5) and len(single["rewards"]) == 2
    # the data term on the group that spans both processes is weighted so the average over processes is the plain mean
    torch.testing.assert_close(
        torch.tensor(double["data_losses"]), torch.tensor(single["data_losses"]), rtol=1e-5, atol=1e-7
    )
    # the adaptive data_beta's signal is summed over processes: the same β, moved at step 2, on every process
    assert single["data_betas"][0] == 0.5 and single["data_betas"][1] != 0.5
    assert double["data_betas"] == pytest.approx(single["data_betas"], rel=1e-6)
    assert double["data_beta_state"]["signal"] == pytest.approx(single["data_beta_state"]["signal"], rel=1e-5)
    # validation rows are split across processes (padded) and gathered in order: the same scores and diversity
    assert set(single["validation"]) == {"eval_rewards/brightness", "eval_diversity", "eval_diversity_ratio"}
    assert double["validation"] == pytest.approx(single["validation"], rel=1e-5)
    # evaluation splits the held-out samples across processes and gathers the sums: the same loss and ratio
    assert double["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-5)
    assert double["eval_ratio"] == pytest.approx(single["eval_ratio"], rel=1e-5) and single["eval_ratio"] != 1.0
    # no duplicate seeds across ranks: rank 0 and rank 1 drew the noise of global rows 0-5 and 6-11
    one = torch.tensor(single["initial_noise"])  # (steps, 12, D)
    two = torch.tensor(double["initial_noise"])  # (2 processes · steps, 6, D), rank-major
    steps = one.shape[0]
    torch.testing.assert_close(torch.cat([two[:steps], two[steps:]], dim=1), one)
    assert torch.unique(one.flatten(0, 1), dim=0).shape[0] == steps * 12
    a, b = (
        load_file(tmp_path / "one" / "pytorch_lora_weights.safetensors"),
        load_file(tmp_path / "two" / "pytorch_lora_weights.safetensors"),
    )
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)
    trained = load_file(tmp_path / "one" / "pytorch_lora_weights.safetensors")
    assert any(v.abs().max() > 0 for k, v in trained.items() if "lora_B" in k)  # training moved the adapter


# Under SGD the update is linear in the gradient, so a gradient of the wrong scale (the loss divided by the
# accumulation steps twice) shows, as it would not under Adam; accumulation 2 exercises the sync boundaries.
SHARDED_OPTIONS = ("--accumulation", "2", "--optim", "sgd", "--learning-rate", "0.1")
MODES = {  # mode: (script options, saved weights)
    "full": (("--full", *SHARDED_OPTIONS), "unet/diffusion_pytorch_model.safetensors"),
    "lora": (SHARDED_OPTIONS, "pytorch_lora_weights.safetensors"),
}


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """The plain one-process run of a mode, launched once per module: `(output folder, result)`."""
    runs = {}

    def run(mode: str):
        if mode not in runs:
            out = tmp_path_factory.mktemp(f"one-process-{mode}")
            runs[mode] = out, launch(out, ONE_PROCESS, 12, *MODES[mode][0])
        return runs[mode]

    return run


def largest_update(mode: str, trained: dict[str, torch.Tensor]) -> float:
    """How far training moved the weights: from the tiny UNet (full), or from LoRA's zero-initialised B matrices."""
    if mode == "lora":
        return max(v.abs().max().item() for k, v in trained.items() if "lora_B" in k)
    return max((trained[k] - base).abs().max().item() for k, base in tiny_sd_pipeline().unet.state_dict().items())


@pytest.mark.parametrize("stage, mode", [(2, "full"), (3, "full"), (3, "lora")])
def test_deepspeed_zero_matches_one_process(tmp_path, one_process_run, stage, mode):
    """DeepSpeed ZeRO-2/3 on 2 processes gives one plain process's weights, with one optimiser step per rollout batch
    (the ratio stays 1 at every trained step, though accelerate's DeepSpeed backward steps the engine at every synced
    backward); ZeRO-3's sharded weights, full or LoRA, are gathered into a diffusers-format save."""
    options, weights = MODES[mode]
    single_dir, single = one_process_run(mode)
    zero = launch(tmp_path, deepspeed(stage), 6, *options)
    assert (zero["distributed_type"], zero["processes"]) == ("DistributedType.DEEPSPEED", 2)
    assert zero["ratios"] == pytest.approx([1.0, 1.0], abs=1e-5) and zero["clip_fractions"] == [0.0, 0.0]
    expected, trained = load_file(single_dir / weights), load_file(tmp_path / weights)
    assert trained.keys() == expected.keys()
    assert largest_update(mode, expected) > 1e-4  # training moved the weights: agreeing below is not trivial
    for key in expected:
        torch.testing.assert_close(trained[key], expected[key], rtol=1e-4, atol=1e-7, msg=key)
    assert zero["rewards"] == pytest.approx(single["rewards"], rel=1e-5)
    assert zero["data_losses"] == pytest.approx(single["data_losses"], rel=1e-4)
    assert zero["eval_ratio"] == pytest.approx(single["eval_ratio"], rel=1e-5)


def test_deepspeed_checkpoint_resumes_to_the_uninterrupted_weights(tmp_path):
    """ZeRO-2, full fine-tuning with AdamW: 4 steps straight == resuming the checkpoint of step 2 to step 4. The
    engine's sharded optimizer state is saved inside the staged checkpoint folder and restored from it."""
    options = ("--full", "--max-steps", "4", "--save-steps", "2")
    launch(tmp_path / "straight", deepspeed(2), 6, *options)
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / "global_step2").is_dir()  # DeepSpeed's own optimizer shards
    launch(tmp_path / "resumed", deepspeed(2), 6, *options, "--resume", str(checkpoint))
    weights = MODES["full"][1]
    straight, resumed = load_file(tmp_path / "straight" / weights), load_file(tmp_path / "resumed" / weights)
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)


def test_deepspeed_bf16_trains_on_policy_and_evaluates(tmp_path):
    """The shipped DeepSpeed configs' precision: ZeRO-2 with bf16 (the engine casts the denoiser to bf16), full
    fine-tuning with a held-out set. The base model's loss is measured before the engine exists, under the trainer's
    own autocast; the ratio stays 1 and the bf16 weights save in diffusers format."""
    result = launch(tmp_path, deepspeed(2), 6, "--full", "--bf16", mixed_precision="bf16")
    assert result["distributed_type"] == "DistributedType.DEEPSPEED"
    assert result["ratios"] == pytest.approx([1.0, 1.0], abs=1e-2)
    assert 0.5 < result["eval_ratio"] < 2.0
    saved = load_file(tmp_path / MODES["full"][1])
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}


def test_a_non_finite_loss_on_one_process_is_skipped_by_every_process(tmp_path):
    """DDP: a NaN loss on rank 1 alone in step 1, with finite gradients (so DDP's all-reduce does not spread it).
    The processes agree to skip that step, so the run ends with the weights of one process whose step 1 was NaN and
    skipped; without the agreement rank 0 would apply step 1 and the weights would differ."""
    single = launch(tmp_path / "one", ONE_PROCESS, 12, "--nan-loss-at-step", "1")
    double = launch(tmp_path / "two", DDP, 6, "--nan-loss-at-step", "1", "--nan-rank", "1")
    assert single["nonfinite_steps"] == double["nonfinite_steps"] == [1.0, 1.0, 1.0]  # steps 1, 2, and the summary
    a, b = (load_file(tmp_path / name / "pytorch_lora_weights.safetensors") for name in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.isfinite(v).all() for v in b.values())
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)


def test_deepspeed_stops_before_applying_a_non_finite_loss(tmp_path):
    """The DeepSpeed engine steps inside the last backward of a batch, so a NaN loss cannot be skipped there: the run
    stops before that backward, and no checkpoint of the step is written."""
    failed = launch(
        tmp_path,
        deepspeed(2),
        6,
        "--full",
        "--max-steps",
        "3",
        "--save-steps",
        "1",
        "--nan-loss-at-step",
        "2",
        expect_failure=True,
    )
    assert "Step 2: a non-finite (NaN or infinite) loss under DeepSpeed" in failed.stderr
    assert (tmp_path / "checkpoint-1").is_dir() and not (tmp_path / "checkpoint-2").exists()


def test_several_iterations_per_rollout_batch_match_one_process(tmp_path):
    """num_iterations=2 with gradient accumulation 2: each process reuses its own rollout batches (one per micro-step)
    at the second iteration, and the run gives one process's weights; the ratio leaves 1 at the second step only.
    With guided rollouts and the data term's prompt dropout, whose draw for the group spanning both processes must
    agree on both."""
    options = (
        "--cfg-scale",
        "2",
        "--prompt-dropout",
        "0.5",
        "--num-iterations",
        "2",
        "--accumulation",
        "2",
        "--epsilon",
        "0.05",
        "--optim",
        "sgd",
        "--learning-rate",
        "0.5",
        "--max-steps",
        "2",
    )  # SGD: see SHARDED_OPTIONS
    single = launch(tmp_path / "one", ONE_PROCESS, 12, *options)
    double = launch(tmp_path / "two", DDP, 6, *options)
    # one rollout batch, scored once; guided rollouts run 2× the rows per forward, so float32 round-off of batches of
    # 24 vs 12 rows shows in the last digits
    assert double["rewards"] == pytest.approx(single["rewards"], rel=1e-5) and len(single["rewards"]) == 1
    assert single["ratios"][0] == pytest.approx(1.0, abs=1e-5) and abs(single["ratios"][1] - 1) > 1e-5
    assert double["ratios"] == pytest.approx(single["ratios"], abs=1e-5)
    # the guided held-out loss, its samples split across processes, is the one process's
    assert single["eval_guided_ratio"] is not None and single["eval_guided_ratio"] != 1.0
    assert double["eval_guided_ratio"] == pytest.approx(single["eval_guided_ratio"], rel=1e-5)
    a, b = (load_file(tmp_path / name / "pytorch_lora_weights.safetensors") for name in ("one", "two"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)
