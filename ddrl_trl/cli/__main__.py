"""`python -m ddrl_trl.cli ...` is the `ddrl-trl` command (e.g. under `accelerate launch -m ddrl_trl.cli train`)."""

from .command import main

main()
