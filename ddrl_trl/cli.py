"""The `ddrl-trl` command: `ddrl-trl serve-reward ...` runs the reward service (the embedded demo is `ddrl-trl-demo`)."""

from __future__ import annotations

import argparse
import logging
import sys


def _serve_reward(args: argparse.Namespace) -> None:
    from .service.server import ServerLimits, serve

    limits = ServerLimits(
        max_request_bytes=int(args.max_request_mb * 2**20),
        max_samples_per_request=args.max_samples_per_request,
        max_batch_samples=args.max_batch_samples,
        max_wait_ms=args.max_wait_ms,
    )
    serve(args.reward, args.host, args.port, args.token_file, limits)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddrl-trl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve-reward", help="serve a reward over HTTP for RemoteReward clients",
        description="Serve a reward function over HTTP (submit → id → poll), micro-batching requests.",
    )  # fmt: skip
    serve.add_argument("--reward", required=True, help="a built-in name, 'package.module:function', or a Hub id/path")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--token-file", required=True, help="file holding the bearer token clients must send")
    serve.add_argument("--max-request-mb", type=float, default=64.0, help="largest request body accepted (MiB)")
    serve.add_argument("--max-samples-per-request", type=int, default=1024)
    serve.add_argument("--max-batch-samples", type=int, default=64, help="micro-batch size across requests")
    serve.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a request waits for company")
    serve.set_defaults(func=_serve_reward)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as err:  # bad input: one clear line, no traceback
        print(f"ddrl-trl {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
