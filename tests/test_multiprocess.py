"""DDRL under `accelerate launch` with 2 CPU processes (gloo) gives the result of one process on the same seeds."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddrl_trl.layout import GroupLayout

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


def launch(out: Path, processes: int, per_device: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    distributed = ["--multi_gpu", "--num_processes", "2"] if processes == 2 else ["--num_processes", "1"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *distributed, "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(TESTS / "ddp_train.py"), str(out), str(per_device)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((out / "result.json").read_text())


def test_two_processes_match_one_process(tmp_path):
    """Global batch 12 = 3 groups of 4: one process with 12 rows vs two with 6 (group 1 spans both)."""
    single = launch(tmp_path / "one", 1, 12)
    double = launch(tmp_path / "two", 2, 6)
    assert (single["processes"], double["processes"]) == (1, 2)
    # rewards are gathered over both processes before advantages: the logged batch reward is the global one
    assert double["rewards"] == single["rewards"]
    # the data term on the group that spans both processes is weighted so the average over processes is the plain mean
    torch.testing.assert_close(torch.tensor(double["data_losses"]), torch.tensor(single["data_losses"]), rtol=1e-5,
                               atol=1e-7)
    # evaluation splits the held-out samples across processes and gathers the sums: the same loss and ratio
    assert double["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-5)
    assert double["eval_ratio"] == pytest.approx(single["eval_ratio"], rel=1e-5) and single["eval_ratio"] != 1.0
    # no duplicate seeds across ranks: rank 0 and rank 1 drew the noise of global rows 0-5 and 6-11
    one = torch.tensor(single["initial_noise"])  # (steps, 12, D)
    two = torch.tensor(double["initial_noise"])  # (2 processes · steps, 6, D), rank-major
    steps = one.shape[0]
    torch.testing.assert_close(torch.cat([two[:steps], two[steps:]], dim=1), one)
    assert torch.unique(one.flatten(0, 1), dim=0).shape[0] == steps * 12
    a, b = load_file(tmp_path / "one" / "pytorch_lora_weights.safetensors"), load_file(
        tmp_path / "two" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)
    trained = load_file(tmp_path / "one" / "pytorch_lora_weights.safetensors")
    assert any(v.abs().max() > 0 for k, v in trained.items() if "lora_B" in k)  # training moved the adapter
