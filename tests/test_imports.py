"""The package imports what it needs when it needs it: the reward server and `ddrl-trl --help` start without loading
diffusers pipelines or TRL (seconds instead of ~10 s per start), and `ddrl_trl.<submodule>` still works."""

import subprocess
import sys


def run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def test_the_reward_server_loads_neither_diffusers_nor_trl_until_needed():
    loaded = run(
        "import sys, ddrl_trl.service.server, ddrl_trl.cli.command; ddrl_trl.cli.command.build_parser(); "
        "print(sorted(m for m in ('diffusers', 'trl', 'peft', 'ddrl_trl.trainer') if m in sys.modules))"
    )
    assert loaded == "[]"


def test_public_names_and_submodules_resolve_on_first_use():
    assert (
        run(
            "import ddrl_trl; print(ddrl_trl.rewards.brightness.__name__, ddrl_trl.DDRLTrainer.__name__, "
            "ddrl_trl.core.group_advantages.__name__)"
        )
        == "brightness DDRLTrainer group_advantages"
    )
    assert "DDRLTrainer" in run("import ddrl_trl; print(dir(ddrl_trl))")
    assert (
        "has no attribute 'nope'"
        in subprocess.run(
            [sys.executable, "-c", "import ddrl_trl; ddrl_trl.nope"], capture_output=True, text=True, timeout=300
        ).stderr
    )
