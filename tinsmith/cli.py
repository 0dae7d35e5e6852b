"""The `tinsmith` command: serve, demo, and listing or deleting what a server stored."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tinsmith.config import DEFAULT_MODEL, ServerSettings
from tinsmith.types import UserError


def _settings(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        data_dir=Path(args.data_dir),
        models=tuple(args.models),
        host=getattr(args, "host", "127.0.0.1"),
        port=getattr(args, "port", 8000),
        database_url=args.database_url,
        storage_url=args.storage_url,
        loss_modules=tuple(getattr(args, "loss_module", None) or ()),
    )


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default="tinsmith-data", help="metadata DB and checkpoints")
    p.add_argument("--database-url", default=None, help="SQLAlchemy URL (default: SQLite in data dir)")
    p.add_argument("--storage-url", default=None, help="checkpoint store (default: <data-dir>/checkpoints)")


def cmd_serve(args: argparse.Namespace) -> int:
    from tinsmith.embedded import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        serve(_settings(args))
    except (ImportError, ValueError) as e:  # e.g. a --loss-module that cannot be used
        print(f"tinsmith serve: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tinsmith.demo import run_demo

    result = run_demo(model=args.model, steps=args.steps, learning_rate=args.learning_rate,
                      data_dir=args.data_dir)
    return 0 if result["losses"][-1] < result["losses"][0] else 1


def cmd_models(_: argparse.Namespace) -> int:
    from tinsmith.models import default_cache_dir, known_models

    for spec in known_models():
        ready = (default_cache_dir() / "models" / spec.folder_name / "READY").is_file()
        print(f"{spec.name:40s} {'prepared' if ready else 'prepared on first use'}  {spec.description}")
    return 0


def _db(args: argparse.Namespace):
    from tinsmith.storage.db import MetadataStore

    return MetadataStore(ServerSettings(data_dir=Path(args.data_dir),
                                        database_url=args.database_url).resolved_database_url())


def cmd_runs(args: argparse.Namespace) -> int:
    rows, total = _db(args).list_runs(args.limit, 0)
    print(f"{total} training runs")
    for r in rows:
        print(f"{r.training_run_id:36s} {r.base_model:36s} rank {r.lora.get('rank')}  "
              f"last used {r.last_request_time:%Y-%m-%d %H:%M}")
    return 0


def cmd_checkpoints(args: argparse.Namespace) -> int:
    db = _db(args)
    if args.delete:
        from tinsmith.scheduler.paths import parse_path
        from tinsmith.storage.checkpoints import remove_checkpoint
        from tinsmith.storage.files import CheckpointStore

        ref = parse_path(args.delete)
        row = db.get_checkpoint(ref.run_id, ref.checkpoint_id)
        if row is None:
            print(f"no checkpoint {args.delete}", file=sys.stderr)
            return 1
        settings = ServerSettings(data_dir=Path(args.data_dir), storage_url=args.storage_url)
        remove_checkpoint(db, CheckpointStore(settings.resolved_storage_url()), row)
        print(f"deleted {args.delete}")
        return 0
    rows, total = db.list_all_checkpoints(args.limit, 0)
    print(f"{total} checkpoints")
    for c in rows:
        print(f"{c.tinker_path:70s} {c.checkpoint_type:8s} {c.size_bytes / 1e6:8.1f} MB  "
              f"{c.created_at:%Y-%m-%d %H:%M}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinsmith", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--models", nargs="+", default=[DEFAULT_MODEL], help="base models to serve")
    p.add_argument("--loss-module", action="append", metavar="MODULE",
                   help="module or .py file defining LOSSES: dict[str, LossSpec] (repeatable)")
    _store_args(p)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("demo", help="fine-tune the bundled model through the SDK, before/after")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--data-dir", default=None, help="keep the demo's runs here (default: temporary)")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("models", help="list the model catalog")
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser("runs", help="list training runs stored in a data dir")
    _store_args(p)
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(fn=cmd_runs)

    p = sub.add_parser("checkpoints", help="list (or --delete) stored checkpoints")
    _store_args(p)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--delete", metavar="TINKER_PATH", default=None)
    p.set_defaults(fn=cmd_checkpoints)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except UserError as e:  # e.g. an unknown model name: a message, not a traceback
        print(f"tinsmith: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
