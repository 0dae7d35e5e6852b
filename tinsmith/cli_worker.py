"""`tinsmith worker`: run some ranks of a server's sharded engine on this machine
(docs/scale-out.md, "Several machines"); and `group_token`, the shared secret both sides read."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

TOKEN_ENV = "TINSMITH_GROUP_TOKEN"


def group_token(token_file: str | None) -> bytes | None:
    """The group's shared secret: the file's contents (stripped) when given, else
    $TINSMITH_GROUP_TOKEN; None when neither. ValueError for an unreadable or empty file."""
    if token_file:
        try:
            text = Path(token_file).read_text().strip()
        except OSError as e:
            raise ValueError(f"cannot read the group token file {token_file}: {e}") from e
        if not text:
            raise ValueError(f"the group token file {token_file} is empty")
        return text.encode()
    env = os.environ.get(TOKEN_ENV, "").strip()
    return env.encode() if env else None


def _resolver(cache_dir: Path | None):
    def resolve(name: str, server_dir: str) -> str:
        """The server's folder when this machine has it too (a shared file system, or one
        machine), else the model prepared in this machine's cache."""
        if (Path(server_dir) / "config.json").is_file():
            return server_dir
        from tinsmith.models import resolve_model_dir

        return str(resolve_model_dir(name, cache_dir))
    return resolve


def cmd_worker(args: argparse.Namespace) -> int:
    from tinsmith.engine.sharded.desk import parse_address
    from tinsmith.engine.sharded.joiner import WorkerOptions, run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        address = parse_address(args.join)
        token = group_token(args.token_file)
    except ValueError as e:
        print(f"tinsmith worker: {e}", file=sys.stderr)
        return 2
    if token is None:
        print(f"tinsmith worker: a group token is required: set {TOKEN_ENV} or --token-file "
              "(the same secret as the server's)", file=sys.stderr)
        return 2
    if args.local_ranks < 1:
        print("tinsmith worker: --local-ranks must be >= 1", file=sys.stderr)
        return 2
    try:
        return run_worker(WorkerOptions(
            address=address, token=token, local_ranks=args.local_ranks, device_type=args.device,
            retry=args.retry,
            resolve_model=_resolver(Path(args.cache_dir) if args.cache_dir else None)))
    except KeyboardInterrupt:  # Ctrl-C: its ranks were stopped on the way out
        return 130


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run ranks of a server's sharded engine on this machine "
                                      "(docs/scale-out.md, Several machines)")
    p.add_argument("--join", required=True, metavar="HOST:PORT",
                   help="the server's --group-listen address, as this machine reaches it")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help=f"file holding the group's shared token (default: ${TOKEN_ENV})")
    p.add_argument("--local-ranks", type=int, default=1, metavar="K",
                   help="ranks to run here: K processes, on cuda:0..K-1 with --device cuda "
                        "(default %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda",
                   help="cuda (NCCL) or cpu (gloo); must match the server's (default %(default)s)")
    p.add_argument("--retry", action="store_true",
                   help="keep connecting (every 2 s) when the server is not there or goes "
                        "away, so the worker rejoins a restarted group on its own")
    p.add_argument("--cache-dir", default=None,
                   help="where base models are prepared on this machine (default: "
                        "$TINSMITH_CACHE or ~/.cache/tinsmith)")
    p.set_defaults(fn=cmd_worker)
