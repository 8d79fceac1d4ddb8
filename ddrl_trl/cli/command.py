"""The `ddrl-trl` command.

    ddrl-trl train [--family FAMILY] <TRL-style arguments>   # DDRL training (as examples/train_*.py)
    ddrl-trl accelerate-config --name deepspeed_zero2        # print a shipped accelerate config
    ddrl-trl serve-reward --reward ... --token-file ...      # the HTTP reward service

FAMILY: a model family of `ddrl_trl.cli.families.FAMILY_DEFAULTS` (listed below), inferred from
--model_name_or_path when not given.
`ddrl-trl train --help` lists the training arguments. The embedded demo is `ddrl-trl-demo`. For several GPUs:
`accelerate launch --config_file <config> -m ddrl_trl.cli train ...`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import resources

from ..errors import UsageError

#: The accelerate configs shipped with the package (`ddrl_trl/accelerate_configs/<name>.yaml`).
ACCELERATE_CONFIGS = resources.files("ddrl_trl") / "accelerate_configs"


def accelerate_config_names() -> list[str]:
    return sorted(
        entry.name.removesuffix(".yaml") for entry in ACCELERATE_CONFIGS.iterdir() if entry.name.endswith(".yaml")
    )


def _accelerate_config(args: argparse.Namespace) -> None:
    names = accelerate_config_names()
    if args.list or args.name is None:
        print("\n".join(names))
        return
    if args.name not in names:
        raise UsageError(f"No accelerate config {args.name!r}; the shipped ones are {', '.join(names)}.")
    sys.stdout.write((ACCELERATE_CONFIGS / f"{args.name}.yaml").read_text(encoding="utf-8"))


#: The reward server's limits on the command line: (flag, type, default, help, `ServerLimits` field, unit in bytes or
#: None). The MiB flags are converted to the byte counts `ServerLimits` holds.
SERVER_LIMIT_FLAGS = (
    ("--max-request-mb", float, 64.0, "largest request body accepted (MiB)", "max_request_bytes", 2**20),
    (
        "--max-inflight-upload-mb",
        float,
        512.0,
        "request bodies being received (and parsed) at once, by declared length (MiB); a body that does not fit gets "
        "503 with Retry-After before it is read, one larger than this alone gets 413",
        "max_inflight_upload_bytes",
        2**20,
    ),
    (
        "--max-json-values",
        int,
        200_000,
        "most JSON values (list items, keys) in one body: bounds the memory parsing it takes",
        "max_json_values",
        None,
    ),
    ("--max-samples-per-request", int, 1024, "most samples in one request", "max_samples_per_request", None),
    ("--max-batch-samples", int, 64, "micro-batch size across requests", "max_batch_samples", None),
    ("--max-wait-ms", float, 10.0, "how long a request waits for company", "max_wait_ms", None),
    (
        "--max-pending-jobs",
        int,
        256,
        "jobs waiting or being scored; past it, new requests get 503 with Retry-After",
        "max_pending_jobs",
        None,
    ),
    (
        "--max-pending-mb",
        float,
        2048.0,
        "pixels of jobs waiting or being scored (MiB); past it, new requests get 503",
        "max_pending_bytes",
        2**20,
    ),
    ("--result-ttl-s", float, 600.0, "how long finished scores can be polled", "result_ttl_s", None),
    (
        "--max-stored-scores",
        int,
        2_000_000,
        "scores of finished results kept for polling at most; the oldest results go first",
        "max_stored_scores",
        None,
    ),
    (
        "--batch-timeout-s",
        float,
        600.0,
        "a reward call running longer fails its requests and counts as stuck",
        "batch_timeout_s",
        None,
    ),
    (
        "--max-stuck-batches",
        int,
        2,
        "stuck reward calls after which new work is refused (503) and /health says stuck; while fewer are stuck, "
        "/health says degraded",
        "max_stuck_batches",
        None,
    ),
    (
        "--max-connections",
        int,
        256,
        "open connections at most; past it a new one closes the oldest that has never sent a byte, then the longest "
        "idle between requests, then the longest stalled in a request without the right token; authenticated uploads "
        "are never closed for room (the new connection is, if nothing else can go)",
        "max_connections",
        None,
    ),
    (
        "--request-timeout-s",
        float,
        60.0,
        "a connection must deliver each whole request within this many seconds",
        "request_timeout_s",
        None,
    ),
)


def _serve_reward(args: argparse.Namespace) -> None:
    from ..rewards import resolve_reward
    from ..service.server import ServerLimits, read_token_file, serve

    try:
        limits = ServerLimits(
            **{
                field: int(getattr(args, flag[2:].replace("-", "_")) * unit)
                if unit
                else getattr(args, flag[2:].replace("-", "_"))
                for flag, _, _, _, field, unit in SERVER_LIMIT_FLAGS
            }
        )
        token = read_token_file(args.token_file)  # before loading a reward model: bad input fails fast
        reward_fn = resolve_reward(args.reward)
    except ValueError as err:
        raise UsageError(str(err)) from err
    serve(reward_fn, token, args.host, args.port, limits)


def build_parser() -> argparse.ArgumentParser:
    from ..rewards import REWARD_SPEC_HELP
    from .families import FAMILIES

    parser = argparse.ArgumentParser(
        prog="ddrl-trl",
        description=f"{__doc__}\nFAMILY is one of: {', '.join(FAMILIES)}.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "train",
        add_help=False,
        help="DDRL training with TRL-style arguments (`ddrl-trl train --help` lists them)",
    )  # its arguments are parsed by ddrl_trl.cli.train.train_command
    config = commands.add_parser(
        "accelerate-config",
        help="print a shipped accelerate config (for `accelerate launch --config_file`)",
        description="Print one of the accelerate configs shipped with ddrl-trl (DDP, FSDP, DeepSpeed ZeRO-2/3), to "
        "save and edit: `ddrl-trl accelerate-config --name deepspeed_zero2 > zero2.yaml`.",
    )
    config.add_argument("--name", help="the config to print (see --list)")
    config.add_argument("--list", action="store_true", help="list the shipped configs")
    config.set_defaults(func=_accelerate_config)
    serve = commands.add_parser(
        "serve-reward",
        help="serve a reward over HTTP for RemoteReward clients",
        description="Serve a reward function over HTTP (submit → id → poll), micro-batching requests. --reward is "
        "code the server runs: an import path imports and executes that module, so pass only rewards "
        "from configuration you trust, never from a request or an untrusted file.",
    )
    serve.add_argument("--reward", required=True, help=f"the reward to serve: {REWARD_SPEC_HELP}")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--token-file",
        required=True,
        help="file holding the bearer token clients must send (one line of visible ASCII, at least 16 characters)",
    )
    for flag, kind, default, help_text, _, _ in SERVER_LIMIT_FLAGS:
        serve.add_argument(flag, type=kind, default=default, help=help_text)
    serve.set_defaults(func=_serve_reward)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if argv[:1] == ["train"]:  # TRL-style arguments, parsed by TrlParser
        from .train import train_command

        command, run = "train", lambda: train_command(argv[1:])
    else:
        args = build_parser().parse_args(argv)
        command, run = args.command, lambda: args.func(args)
    try:
        run()
    except UsageError as err:  # bad input, before any work: one clear line (errors during a run keep their traceback)
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"ddrl-trl {command}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
