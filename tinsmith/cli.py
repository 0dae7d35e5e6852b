"""The `tinsmith` command: serve, demo, API keys, and listing or deleting what a server stored."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from tinsmith import cli_limits, cli_plan, cli_worker
from tinsmith.config import DEFAULT_MODEL, Prices, ServerSettings
from tinsmith.types import UserError


def _settings(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        data_dir=Path(args.data_dir),
        models=tuple(args.models),
        host=getattr(args, "host", "127.0.0.1"),
        port=getattr(args, "port", 8000),
        allow_open=getattr(args, "allow_open", False),
        database_url=args.database_url,
        storage_url=args.storage_url,
        loss_modules=tuple(getattr(args, "loss_module", None) or ()),
        pass_tokens=getattr(args, "pass_tokens", None),
        device=getattr(args, "device", "auto"),
        dtype=getattr(args, "dtype", "auto"),
        **_group_settings(args),
        exact_packing=getattr(args, "exact_packing", None),
        pack_linger_ms=getattr(args, "pack_linger_ms", None),
        max_resident_adapters=getattr(args, "max_resident_adapters", None),
        seq_gap_timeout_s=getattr(args, "seq_gap_timeout", ServerSettings.seq_gap_timeout_s),
        debug_slow_writes_s=float(os.environ.get("TINSMITH_DEBUG_SLOW_WRITES_S") or 0),
        prices=Prices.parse(getattr(args, "price", None) or ()),
        vllm_python=Path(args.vllm_python) if getattr(args, "vllm_python", None) else None,
        # Flags whose value is the setting as it is; a command without them gets the defaults.
        **{name: getattr(args, name) for name in _PLAIN_SERVE_FLAGS if hasattr(args, name)},
        **cli_limits.serve_settings(args),
    )


# `serve` flags named exactly as their ServerSettings field, taken unchanged.
_PLAIN_SERVE_FLAGS = (
    "devices", "replicas", "sharded", "sampler_kv_cache", "sampler_cuda_graphs",
    "prefill_chunk_tokens", "sampler", "vllm_url", "vllm_max_lora_rank", "vllm_max_logprobs",
    "vllm_tensor_parallel", "max_image_bytes", "max_image_pixels", "compile_passes",
)


def _group_settings(args: argparse.Namespace) -> dict[str, object]:
    """A rank group spanning machines (`serve --group-listen`, docs/scale-out.md)."""
    listen = getattr(args, "group_listen", None)
    if not listen:
        return {}
    if getattr(args, "replicas", 1) != 1:
        raise ValueError("--group-listen serves one rank group per model: use --replicas 1")
    token = cli_worker.group_token(args.group_token_file)
    if token is None:
        raise ValueError(f"--group-listen needs the group's shared token: set "
                         f"{cli_worker.TOKEN_ENV} or --group-token-file")
    return {"group_listen": listen, "local_ranks": args.local_ranks, "group_token": token,
            "group_join_timeout_s": args.group_join_timeout}


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=str(ServerSettings.data_dir),
                   help="metadata DB and checkpoints (default: ./%(default)s in the current folder, "
                        "the same for every command)")
    p.add_argument("--database-url", default=None, help="SQLAlchemy URL (default: SQLite in data dir)")
    p.add_argument("--storage-url", default=None, help="checkpoint store (default: <data-dir>/checkpoints)")


def cmd_serve(args: argparse.Namespace) -> int:
    from tinsmith.embedded import serve
    from tinsmith.engine.sharded import GroupFailed

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        serve(_settings(args))
    except (ImportError, ValueError, GroupFailed) as e:  # e.g. a --loss-module that cannot be
        # used, or a rank group whose workers did not join
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
    from tinsmith.models.local import hf_cache_dir, list_local

    # Hosted names already on this machine ($TINSMITH_MODELS_DIR, the HF cache): servable offline.
    for found in list_local():
        print(f"{found.name:40s} {'in ' + found.source:21s}  {found.path}")
    print(f"(hosted names are also served from $TINSMITH_MODELS_DIR/<org>/<name> or the "
          f"Hugging Face cache at {hf_cache_dir()})")
    return 0


def _db(args: argparse.Namespace):
    from tinsmith.storage.db import MetadataStore

    return MetadataStore(ServerSettings(data_dir=Path(args.data_dir),
                                        database_url=args.database_url).resolved_database_url())


def plural(n: int, word: str, words: str | None = None) -> str:
    """`1 checkpoint`, `2 checkpoints`, `0 training runs`."""
    return f"{n} {word if n == 1 else words or word + 's'}"


_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: int | None) -> str:
    """A size in binary units, one decimal: `512 B`, `65.2 MiB`. The dashboard's fmtBytes
    (tinsmith/api/dashboard/app.js) is the same function, so both show the same text;
    tests/test_cli.py runs the two side by side."""
    if n is None:
        return "–"
    x, i = float(n), 0
    while x >= 1024 and i < len(_BYTE_UNITS) - 1:
        x, i = x / 1024, i + 1
    if i == 0:
        return f"{n} B"
    # JavaScript's toFixed(1): the exact binary value rounded, ties away from zero.
    return f"{Decimal(x).quantize(Decimal('0.1'), rounding=ROUND_HALF_UP)} {_BYTE_UNITS[i]}"


def _where(args: argparse.Namespace) -> tuple[str, bool]:
    """Where a listing reads metadata (the data dir, or the --database-url without its
    password), and whether there is a database there to read."""
    from sqlalchemy.engine import make_url

    u = make_url(ServerSettings(data_dir=Path(args.data_dir),
                                database_url=args.database_url).resolved_database_url())
    if u.get_backend_name() != "sqlite" or u.database in (None, "", ":memory:"):
        return u.render_as_string(hide_password=True), True
    if args.database_url:
        return u.database, Path(u.database).is_file()
    return str(Path(args.data_dir).resolve()), Path(u.database).is_file()


def _existing_db(args: argparse.Namespace):
    """The metadata store to list from, or None (after saying so) when there is none: a
    listing never creates a data dir or a database."""
    where, exists = _where(args)
    if exists:
        return _db(args)
    hint = ("" if args.data_dir != str(ServerSettings.data_dir) or args.database_url else
            f": `tinsmith serve` keeps its data in ./{ServerSettings.data_dir} of the folder it "
            "was started in; run this there, or pass --data-dir")
    print(f"tinsmith: no Tinsmith data in {where}{hint}", file=sys.stderr)
    return None


def cmd_keys(args: argparse.Namespace) -> int:
    from tinsmith.scheduler.access import ApiKeys

    open_note = "no API keys: the server is open (tinsmith keys create makes one)"
    if args.action == "list" and not _where(args)[1]:  # no database yet: nothing to create
        print(open_note)
        return 0
    db = _db(args) if args.action == "create" else _existing_db(args)
    if db is None:
        return 1
    try:
        keys = ApiKeys(db)
        if args.action == "create":
            expires = datetime.now(UTC) + args.expires_in if args.expires_in else None
            new = keys.create(args.name, admin=args.admin, expires_at=expires,
                              **cli_limits.key_limits(args))
            print(f"created {'admin ' if new.admin else ''}API key {new.key_id}"
                  f"{f' ({new.name})' if new.name else ''}"
                  f"{f', expires {expires:%Y-%m-%d %H:%M} UTC' if expires else ''}; it is shown only now:")
            print(new.key)
            return 0
        if args.action == "limits":
            if not keys.set_limits(args.key_id, **cli_limits.key_limits(args)):
                print(f"no API key {args.key_id}", file=sys.stderr)
                return 1
            row = db.get_api_key(args.key_id)
            print(f"{args.key_id}: {cli_limits.describe(row) or 'server defaults'}")
            return 0
        if args.action == "revoke":
            if not keys.revoke(args.key_id):
                print(f"no API key {args.key_id}", file=sys.stderr)
                return 1
            print(f"revoked {args.key_id}")
            return 0
        rows = keys.list()
        active = sum(r.revoked_at is None for r in rows)
        print(f"{plural(len(rows), 'API key')} ({active} active)" if rows else open_note)
        for r in rows:
            state = f"revoked {r.revoked_at:%Y-%m-%d %H:%M}" if r.revoked_at else "active"
            if not r.revoked_at and r.expires_at and r.expires_at <= datetime.now(UTC):
                state = f"expired {r.expires_at:%Y-%m-%d %H:%M}"
            print(f"{r.key_id:18s} {r.hint + '...':15s} {'admin' if r.is_admin else 'user':5s}  "
                  f"created {r.created_at:%Y-%m-%d %H:%M}  {state:24s} {r.name or ''}"
                  f"  {cli_limits.describe(r)}".rstrip())
        return 0
    finally:
        db.close()


def cmd_runs(args: argparse.Namespace) -> int:
    db = _existing_db(args)
    if db is None:
        return 1
    try:
        rows, total = db.list_runs(args.limit, 0)
    finally:
        db.close()
    print(f"{plural(total, 'training run')} in {_where(args)[0]}"
          + (f" (the newest {len(rows)} shown)" if len(rows) < total else ""))
    for r in rows:
        print(f"{r.training_run_id:36s} {r.base_model:36s} rank {r.lora.get('rank')}  "
              f"last used {r.last_request_time:%Y-%m-%d %H:%M}"
              + (f"  owner {r.owner}" if r.owner else ""))
    return 0


def cmd_checkpoint_weights(args: argparse.Namespace) -> int:
    """`checkpoints download|export`: weights out of a running server (tinsmith.weights_out)."""
    import httpx

    from tinsmith.weights_out import Remote, export_checkpoint

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"tinsmith: {out} exists and is not empty", file=sys.stderr)
        return 1
    merged, base_dir = getattr(args, "merged", False), getattr(args, "base_model_dir", None)
    try:
        export_checkpoint(Remote.from_args(args.base_url, args.api_key), args.tinker_path, out,
                          merged=merged, base_model_dir=Path(base_dir) if base_dir else None)
    except (OSError, ValueError, httpx.HTTPError) as e:  # no server, a bad file...
        print(f"tinsmith: {e}", file=sys.stderr)
        return 1
    kind = "merged Hugging Face model" if merged else "PEFT adapter"
    print(f"wrote {args.tinker_path} as a {kind} to {out}")
    return 0


def cmd_checkpoints(args: argparse.Namespace) -> int:
    db = _existing_db(args)
    if db is None:
        return 1
    try:
        return _checkpoints(args, db)
    finally:
        db.close()


def _checkpoints(args: argparse.Namespace, db) -> int:
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
    print(f"{plural(total, 'checkpoint')} in {_where(args)[0]}"
          + (f" (the newest {len(rows)} shown)" if len(rows) < total else ""))
    for c in rows:
        print(f"{c.tinker_path:70s} {c.checkpoint_type:8s} {format_bytes(c.size_bytes):>10s}  "
              f"{c.created_at:%Y-%m-%d %H:%M}" + (f"  owner {c.owner}" if c.owner else ""))
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    """`db current`: where the schema stands (changes nothing); `db upgrade`: bring it to the
    newest revision now (a server starting on it would do the same)."""
    from sqlalchemy.engine import make_url

    from tinsmith.storage.db import create_db_engine, schema_state, upgrade_schema

    url = ServerSettings(data_dir=Path(args.data_dir),
                         database_url=args.database_url).resolved_database_url()
    u = make_url(url)
    if (args.action == "current" and u.get_backend_name() == "sqlite" and u.database
            and u.database != ":memory:" and not Path(u.database).exists()):
        print(f"no database at {u.database} yet; it is made at the newest revision on first use")
        return 0
    engine = create_db_engine(url)
    try:
        if args.action == "upgrade":
            before = upgrade_schema(engine)
            if before.up_to_date:
                print(f"{engine.url!r}: already at the newest schema revision {before.head}")
            elif before.current is None:
                print(f"{engine.url!r}: created at schema revision {before.head}")
            elif before.current == before.head:  # made before migrations, already current
                print(f"{engine.url!r}: recorded as schema revision {before.head}")
            else:
                print(f"{engine.url!r}: upgraded from schema revision {before.current} to "
                      f"{before.head}")
            return 0
        state = schema_state(engine)
        note = ("" if state.recorded or state.current is None
                else " (made before migrations: recognised from its tables, not yet stamped)")
        print(f"database  {engine.url!r}\n"
              f"revision  {state.current or 'none (empty database)'}{note}\n"
              f"newest    {state.head}")
        if not state.known:
            print("this Tinsmith does not know that revision: a newer Tinsmith made it")
            return 1
        if not state.up_to_date:
            print("`tinsmith db upgrade` (or starting the server) upgrades it in place")
        return 0
    finally:
        engine.dispose()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinsmith", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--models", nargs="+", default=[DEFAULT_MODEL], help="base models to serve")
    p.add_argument("--loss-module", action="append", metavar="MODULE",
                   help="module or .py file defining LOSSES: dict[str, LossSpec] (repeatable)")
    p.add_argument("--allow-open", action="store_true",
                   help="serve on a non-loopback --host even though no API key exists")
    p.add_argument("--device", default="auto",
                   help="auto (first GPU, else CPU), cuda, cuda:N or cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="base-model dtype (auto: bfloat16 on a GPU, float32 on a CPU); LoRA "
                        "factors and optimizer state stay float32")
    p.add_argument("--devices", type=int, default=1, metavar="N",
                   help="shard each served model's training over N devices with FSDP2: N GPUs "
                        "(NCCL) with a CUDA device, else N CPU processes (gloo); 1 (default): "
                        "one process, no sharding (docs/scale-out.md)")
    p.add_argument("--replicas", type=int, default=1, metavar="M",
                   help="M engine replicas per served model, each a group of --devices rank "
                        "processes (GPUs [k*N, (k+1)*N) for replica k); each training run lives "
                        "on one, placed and moved by load; 1 (default): one engine "
                        "(docs/scale-out.md, Replicas)")
    p.add_argument("--sharded", action="store_true",
                   help="train through the rank-group engine even with --devices 1 (one rank "
                        "process; for measuring the group path's overhead)")
    p.add_argument("--group-listen", default=None, metavar="HOST:PORT",
                   help="let `tinsmith worker --join HOST:PORT` on other machines run ranks of "
                        "the --devices N group (docs/scale-out.md, Several machines)")
    p.add_argument("--local-ranks", type=int, default=1, metavar="L",
                   help="with --group-listen: ranks run on this machine, rank 0 among them; the "
                        "other N-L come from workers (default %(default)s)")
    p.add_argument("--group-token-file", default=None, metavar="FILE",
                   help="with --group-listen: file holding the shared token workers must prove "
                        f"(default: ${cli_worker.TOKEN_ENV})")
    p.add_argument("--group-join-timeout", type=float, default=ServerSettings.group_join_timeout_s,
                   metavar="SECONDS", help="with --group-listen: how long a group start waits "
                                           "for the workers' ranks (default %(default)s)")
    p.add_argument("--exact-packing", action=argparse.BooleanOptionalAction, default=None,
                   help="packed passes bitwise equal to each request alone (default: on a CPU "
                        "only; on a GPU the base GEMMs are shared, equal within float tolerance)")
    p.add_argument("--compile-passes", action="store_true",
                   help="shared training passes run the decoder layers through torch.compile "
                        "(dense text models; the first passes compile, docs/gpu.md)")
    p.add_argument("--pack-linger-ms", type=float, default=None,
                   help="how long a small training pass may wait for runs that were just in "
                        "one (default: 10 on a GPU, 0 on a CPU)")
    p.add_argument("--pass-tokens", type=int, default=None,
                   help="tokens one training pass may hold (default: from free memory)")
    p.add_argument("--max-resident-adapters", type=int, default=None,
                   help="training runs kept in memory per model; idle ones beyond it are "
                        "spilled to disk and restored on use (default: from free memory)")
    p.add_argument("--seq-gap-timeout", type=float, default=ServerSettings.seq_gap_timeout_s,
                   metavar="SECONDS",
                   help="skip a training run's seq_id the client never sent once later requests "
                        "waited this long with none arriving (0: wait forever; default %(default)s)")
    p.add_argument("--sampler-kv-cache", choices=["slab", "dynamic"],
                   default=ServerSettings.sampler_kv_cache,
                   help="sampling's KV cache: slab (preallocated, default) or dynamic (the "
                        "older concatenating path); docs/sampling.md")
    p.add_argument("--sampler-cuda-graphs", choices=["auto", "on", "off"],
                   default=ServerSettings.sampler_cuda_graphs,
                   help="sampling decode steps in static shapes replayed from CUDA graphs: auto "
                        "(on with CUDA, default), on, off; docs/sampling.md")
    p.add_argument("--prefill-chunk-tokens", type=int, default=ServerSettings.prefill_chunk_tokens,
                   metavar="T", help="prefill longer sampling prompts T tokens per decoding step "
                                     "(0: whole; default %(default)s)")
    p.add_argument("--sampler", choices=["native", "vllm"], default=ServerSettings.sampler,
                   help="sampling engine: native (default) or vllm, a vLLM server in its own "
                        "environment (scripts/setup_vllm.sh; docs/sampling.md)")
    p.add_argument("--vllm-url", default=None, metavar="URL",
                   help="with --sampler vllm: use this running vLLM server instead of starting one")
    p.add_argument("--vllm-python", default=None, metavar="PATH",
                   help="with --sampler vllm: vLLM's Python (default .venv-vllm/bin/python)")
    p.add_argument("--vllm-max-lora-rank", type=int, default=ServerSettings.vllm_max_lora_rank,
                   metavar="R", help="largest LoRA rank the vLLM sampler loads (default %(default)s)")
    p.add_argument("--vllm-max-logprobs", type=int, default=ServerSettings.vllm_max_logprobs,
                   metavar="K", help="most top-k logprobs per token from vLLM (default %(default)s)")
    p.add_argument("--vllm-tensor-parallel", type=int, default=ServerSettings.vllm_tensor_parallel,
                   metavar="N", help="GPUs the vLLM sampler spreads the base over (default %(default)s)")
    p.add_argument("--max-image-bytes", type=int, default=ServerSettings.max_image_bytes,
                   metavar="BYTES", help="largest encoded image of an image chunk (default %(default)s)")
    p.add_argument("--max-image-pixels", type=int, default=ServerSettings.max_image_pixels,
                   metavar="PIXELS", help="most pixels (width x height) of one image (default %(default)s)")
    cli_limits.add_serve_args(p)
    p.add_argument("--price", action="append", metavar="KIND=USD",
                   help="a price for billing reports, repeatable: train, forward, prefill, "
                        "sample (USD per million tokens) or storage (USD per GB-month); "
                        "default 0 (see docs/operating.md, Accounting)")
    _store_args(p)
    p.set_defaults(fn=cmd_serve)

    cli_worker.add_parser(sub)

    p = sub.add_parser("keys", help="create, list or revoke API keys, or set their limits "
                       "(see docs/operating.md)")
    keys = p.add_subparsers(dest="action", required=True)
    k = keys.add_parser("create", help="make a key and print it (shown once)")
    k.add_argument("--name", default=None, help="a label, e.g. who or what uses the key")
    k.add_argument("--admin", action="store_true", help="an admin key sees every key's work")
    k.add_argument("--expires-in", type=cli_limits.duration, default=None, metavar="DURATION",
                   help="refuse the key (401) after this long, e.g. 30d, 12h")
    cli_limits.add_key_args(k)
    _store_args(k)
    k = keys.add_parser("limits", help="change a key's limits (takes effect within a second)")
    k.add_argument("key_id", help="the key's id, as `tinsmith keys list` shows it")
    cli_limits.add_key_args(k)
    _store_args(k)
    k = keys.add_parser("list", help="list keys (ids and first characters, never the keys)")
    _store_args(k)
    k = keys.add_parser("revoke", help="revoke a key: requests with it get 401 at once")
    k.add_argument("key_id", help="the key's id, as `tinsmith keys list` shows it")
    _store_args(k)
    p.set_defaults(fn=cmd_keys)

    p = sub.add_parser("db", help="the metadata database's schema revision (see docs/operating.md)")
    db = p.add_subparsers(dest="action", required=True)
    _store_args(db.add_parser("current", help="show the schema revision; changes nothing"))
    _store_args(db.add_parser("upgrade", help="upgrade the schema in place to the newest revision"))
    p.set_defaults(fn=cmd_db)

    p = sub.add_parser("demo", help="fine-tune the bundled model through the SDK, before/after")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--data-dir", default=None, help="keep the demo's runs here (default: temporary)")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("plan", help="memory per device to train LoRA runs on a model, from "
                       "its config alone (see docs/gpu.md, Planning memory)")
    p.add_argument("--model", nargs="+", required=True, metavar="NAME",
                   help="synthetic/..., a folder with config.json, or a name found locally")
    p.add_argument("--devices", type=int, default=1, metavar="N",
                   help="FSDP2 full sharding over N devices (default 1)")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank (default %(default)s)")
    p.add_argument("--runs", type=int, default=1, metavar="K",
                   help="resident training runs (default %(default)s)")
    p.add_argument("--pass-tokens", type=int, default=8192, metavar="T",
                   help="tokens in one training pass, over all devices (default %(default)s)")
    p.add_argument("--dtype", default="bfloat16", choices=cli_plan.DTYPE_NAMES,
                   help="base-model dtype (default %(default)s)")
    p.add_argument("--device-memory", type=cli_plan.parse_bytes, default=None, metavar="SIZE",
                   help="one device's memory, e.g. 80GiB or 141GB (default: this machine's "
                        "free GPU memory, else its free host memory)")
    p.set_defaults(fn=cli_plan.cmd_plan)

    p = sub.add_parser("models", help="list the model catalog")
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser("runs", help="list training runs stored in a data dir")
    _store_args(p)
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(fn=cmd_runs)

    p = sub.add_parser("checkpoints", help="list (or --delete) stored checkpoints; download or "
                       "export one's weights")
    _store_args(p)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--delete", metavar="TINKER_PATH", default=None)
    p.set_defaults(fn=cmd_checkpoints)
    weights = p.add_subparsers(dest="action", metavar="{download,export}")
    for name, what in (("download", "a checkpoint's PEFT adapter folder"),
                       ("export", "a PEFT adapter folder, or with --merged a merged HF model")):
        w = weights.add_parser(name, help=f"{what}, from a running server (over HTTP, with a key)")
        w.add_argument("tinker_path", metavar="TINKER_PATH")
        w.add_argument("--out", required=True, help="folder to write (made; must be empty)")
        w.add_argument("--base-url", default=None,
                       help="the server (default: $TINKER_BASE_URL, else http://127.0.0.1:8000)")
        w.add_argument("--api-key", default=None, help="default: $TINKER_API_KEY")
        if name == "export":
            w.add_argument("--merged", action="store_true",
                           help="merge the LoRA into the base model: a plain HF model folder")
            w.add_argument("--base-model-dir", default=None,
                           help="the base model's local HF folder (default: prepared from the "
                                "catalog, as the server does)")
        w.set_defaults(fn=cmd_checkpoint_weights)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except UserError as e:  # e.g. an unknown model name: a message, not a traceback
        print(f"tinsmith: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from tinsmith.storage.db import SchemaError

        if not isinstance(e, SchemaError):
            raise
        print(f"tinsmith: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
