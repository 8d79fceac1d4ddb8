"""The command line: `ddrl-trl` (`command.py`), `ddrl-trl train` and the example scripts (`train.py`, with their
arguments in `arguments.py` and each model family's defaults in `families.py`)."""


def main(argv: list[str] | None = None) -> None:
    """The `ddrl-trl` command (`command.main`), imported when called: `--help` and the reward server start light."""
    from .command import main as run

    run(argv)
