"""The plumbing every recipe shares: `key=value` config, a server to talk to, checkpoints, resume.

A recipe is a module with a config dataclass and a `main(argv)`:

    @dataclass(frozen=True, kw_only=True)
    class Config(RecipeConfig):
        log_path: str = "runs/my_recipe"
        batch_size: int = 8
        "Datums per step."          # the string under a field is its --help text

    def main(argv=None):
        cfg = parse_config(Config, argv)
        with connect(cfg) as service:
            training, start_step = training_client(service, cfg)
            for step in range(start_step, cfg.max_steps):
                ...                                   # one training step
                if should_save(cfg, step + 1):
                    save(training, cfg, step + 1)

`log_path` holds everything a run writes: `config.json`, `metrics.jsonl`,
`checkpoints.jsonl` (one line per save: the number of steps done and the `tinker://` path of
the full training state), and, when no `base_url` is given, the embedded server's own data
(`tinsmith-data/`: its database and checkpoint files). Running a recipe again with the same
`log_path` resumes from the last line of `checkpoints.jsonl`, optimizer state included.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import itertools
import json
import logging
import os
import sys
import textwrap
import types as pytypes
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import tinker

from tinsmith.config import DEFAULT_MODEL

C = TypeVar("C", bound="RecipeConfig")
CHECKPOINTS = "checkpoints.jsonl"


@dataclass(frozen=True, kw_only=True)
class RecipeConfig:
    """The fields every recipe accepts."""

    model_name: str = DEFAULT_MODEL
    """Base model to fine-tune (a catalog name, or a local Hugging Face folder)."""
    base_url: str | None = None
    """A running server (`tinsmith serve`, or any Tinker API). None: start an embedded Tinsmith."""
    log_path: str = "runs/recipe"
    """Folder for metrics, checkpoints and the embedded server's data. Reusing it resumes."""
    max_steps: int = 20
    """Train until this many steps are done in total (a resumed run counts earlier steps)."""
    learning_rate: float = 1e-4
    """Adam learning rate (constant)."""
    lora_rank: int = 16
    """LoRA rank of a fresh run (a resumed run keeps its checkpoint's rank)."""
    seed: int = 0
    """Seeds the LoRA initialisation, data order and sampling."""
    save_every: int = 10
    """Save the training state every this many steps (0: only at the end)."""
    table_every: int = 5
    """Print a metrics table every this many steps."""
    wandb_project: str | None = None
    """Log to this Weights & Biases project (needs `wandb` installed)."""
    tensorboard: bool = False
    """Also write TensorBoard event files to <log_path>/tensorboard (needs `tensorboard`)."""


# ----- key=value command line ---------------------------------------------------------------
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field, from the class sources (MRO order)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in itertools.pairwise(body):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _coerce(text: str, tp: Any) -> Any:
    """Turn command-line text into a value of type `tp` (raises ValueError)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, pytypes.UnionType):
        if type(None) in args and text.lower() in ("none", "null", ""):
            return None
        for arg in (a for a in args if a is not type(None)):
            with contextlib.suppress(ValueError):
                return _coerce(text, arg)
        raise ValueError(f"expected {' or '.join(getattr(a, '__name__', str(a)) for a in args)}")
    if typing.get_origin(tp) is Literal:
        if text not in [str(a) for a in args]:
            raise ValueError(f"expected one of {', '.join(map(str, args))}")
        return next(a for a in args if str(a) == text)
    if tp is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if tp in (int, float, str):
        return tp(text)
    raise ValueError(f"unsupported field type {tp}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def usage(cls: type[C], prog: str | None = None) -> str:
    """The --help text: the recipe's docstring, then every key with its type and default."""
    module = sys.modules.get(cls.__module__)
    spec = getattr(module, "__spec__", None)  # under `python -m`, __main__'s spec has the name
    prog = prog or (spec.name if spec is not None else cls.__module__)
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    lines = [f"usage: python -m {prog} [key=value ...]", ""]
    if module is not None and module.__doc__:
        lines += [module.__doc__.strip(), ""]
    lines.append("keys (default):")
    for f in dataclasses.fields(cls):
        lines.append(f"  {f.name}: {_type_name(hints[f.name])} = {f.default!r}")
        if f.name in docs:
            lines += textwrap.wrap(docs[f.name], 92, initial_indent=" " * 6,
                                   subsequent_indent=" " * 6)
    return "\n".join(lines)


def _fail(cls: type, message: str) -> typing.NoReturn:
    keys = ", ".join(f.name for f in dataclasses.fields(cls))
    print(f"error: {message}\naccepted keys: {keys}\n(--help describes them)", file=sys.stderr)
    raise SystemExit(2)


def parse_config(cls: type[C], argv: Sequence[str] | None = None) -> C:
    """Build `cls` from `key=value` arguments (default: sys.argv[1:]), each coerced to the
    field's type (int, float, bool, str, Optional, Literal). `--help` prints the keys and
    exits 0; an unknown key or a bad value exits 2 with a message naming it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(usage(cls))
        raise SystemExit(0)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for arg in argv:
        key, sep, text = arg.partition("=")
        key = key.strip().removeprefix("--").replace("-", "_")
        if not sep:
            _fail(cls, f"expected key=value, got {arg!r}")
        if key not in names:
            _fail(cls, f"unknown key {key!r}")
        try:
            values[key] = _coerce(text, hints[key])
        except ValueError as e:
            _fail(cls, f"bad value for {key}: {text!r} ({e})")
    return cls(**values)


# ----- the server -----------------------------------------------------------------------------
class _DropTryAgain(logging.Filter):
    """The SDK logs a warning each time a long poll ends with "try again" (any request that
    takes longer than the poll, e.g. sampling on a CPU); that is routine, not a problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "because of try_again" not in record.getMessage()


@contextlib.contextmanager
def connect(cfg: RecipeConfig) -> Iterator[tinker.ServiceClient]:
    """A ServiceClient for `cfg.base_url`, or for an embedded Tinsmith serving `cfg.model_name`
    whose data folder is <log_path>/tinsmith-data, so its checkpoints outlive the process.
    The API key comes from $TINKER_API_KEY (default "tml-local")."""
    api_key = os.environ.get("TINKER_API_KEY", "tml-local")
    sdk_log = logging.getLogger("tinker.lib.api_future_impl")
    if not any(isinstance(f, _DropTryAgain) for f in sdk_log.filters):
        sdk_log.addFilter(_DropTryAgain())
    with contextlib.ExitStack() as stack:
        base_url = cfg.base_url
        if base_url is None:
            from tinsmith.embedded import local

            data_dir = Path(cfg.log_path) / "tinsmith-data"
            base_url = stack.enter_context(local(models=[cfg.model_name], data_dir=data_dir))
        yield stack.enter_context(tinker.ServiceClient(base_url=base_url, api_key=api_key))


# ----- checkpoints and resume -----------------------------------------------------------------
def last_checkpoint(log_path: str | Path) -> dict[str, Any] | None:
    """The last line of <log_path>/checkpoints.jsonl ({"step", "state_path", ...}), or None."""
    path = Path(log_path) / CHECKPOINTS
    if not path.exists():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else None


def training_client(service: tinker.ServiceClient, cfg: RecipeConfig,
                    init_state: str | None = None) -> tuple[tinker.TrainingClient, int]:
    """(client, first step to run): resumed from the last checkpoint in `cfg.log_path`, with
    its Adam moments, or else a new run: the weights of `init_state` (a `tinker://` training
    state, e.g. an earlier stage's result) with fresh Adam moments, or a fresh LoRA run of
    rank `cfg.lora_rank` seeded by `cfg.seed`."""
    ckpt = last_checkpoint(cfg.log_path)
    if ckpt is None and init_state is not None:
        return service.create_training_client_from_state(init_state).result(), 0
    if ckpt is None:
        client = service.create_lora_training_client(
            base_model=cfg.model_name, rank=cfg.lora_rank, seed=cfg.seed).result()
        return client, 0
    if ckpt.get("model_name", cfg.model_name) != cfg.model_name:
        raise SystemExit(f"error: {cfg.log_path} holds a run of {ckpt['model_name']}, not "
                         f"{cfg.model_name}; pick another log_path")
    print(f"resuming from {ckpt['state_path']} at step {ckpt['step']}", file=sys.stderr)
    if ckpt["step"] >= cfg.max_steps:
        print(f"already {ckpt['step']} steps done: raise max_steps to train more", file=sys.stderr)
    client = service.create_training_client_from_state_with_optimizer(ckpt["state_path"]).result()
    return client, int(ckpt["step"])


def finished_stage(cfg: RecipeConfig, name: str) -> str | None:
    """The final training state of a run (e.g. one stage of a multi-stage recipe) whose last
    checkpoint already reached `cfg.max_steps`, else None."""
    ckpt = last_checkpoint(cfg.log_path)
    if ckpt is None or ckpt["step"] < cfg.max_steps:
        return None
    print(f"{name}: done ({ckpt['step']} steps), using {ckpt['state_path']}", file=sys.stderr)
    return str(ckpt["state_path"])


def recommended_lora_lr(model_name: str) -> float:
    """`hyperparams.get_lora_lr_for_model` for a model this machine can resolve (a catalog
    name or a local folder); exits with a message asking for `learning_rate=` otherwise."""
    from tinsmith.cookbook.hyperparams import get_lora_lr_for_model
    from tinsmith.models.catalog import resolve_model_dir

    try:
        return get_lora_lr_for_model(resolve_model_dir(model_name))
    except (ValueError, OSError, KeyError) as e:
        raise SystemExit(f"error: no recommended learning rate for {model_name} ({e}); "
                         "pass learning_rate=...") from e


def should_save(cfg: RecipeConfig, steps_done: int) -> bool:
    """Save every `save_every` steps and after the last one."""
    return steps_done == cfg.max_steps or (cfg.save_every > 0 and steps_done % cfg.save_every == 0)


def save(client: tinker.TrainingClient, cfg: RecipeConfig, steps_done: int, *,
         sampler: bool = False) -> dict[str, Any]:
    """Save the full training state (weights + Adam moments) as `<steps_done:06d>`, optionally
    sampler weights too, and append the line to checkpoints.jsonl; returns the line."""
    name = f"{steps_done:06d}"
    state = client.save_state(name)
    weights = client.save_weights_for_sampler(name) if sampler else None
    entry: dict[str, Any] = {"step": steps_done, "state_path": state.result().path,
                             "model_name": cfg.model_name}
    if weights is not None:
        entry["sampler_path"] = weights.result().path
    Path(cfg.log_path).mkdir(parents=True, exist_ok=True)
    with open(Path(cfg.log_path) / CHECKPOINTS, "a") as f:
        f.write(json.dumps(entry) + "\n")
    return entry


# ----- the parts of every training loop that are not the algorithm -----------------------------
def open_logger(cfg: RecipeConfig, start_step: int, desc: str, **config_extra: Any) -> Any:
    """The run's MetricsLogger, configured from the common fields; config.json gets the
    config plus `config_extra` (values the recipe derived, e.g. the learning rate used)."""
    from tinsmith.cookbook.logs import MetricsLogger

    return MetricsLogger(cfg.log_path, cfg.max_steps, start_step, desc=desc,
                         wandb_project=cfg.wandb_project, tensorboard=cfg.tensorboard,
                         table_every=cfg.table_every,
                         config={**dataclasses.asdict(cfg), **config_extra})


def end_step(logger: Any, client: tinker.TrainingClient, cfg: RecipeConfig, step: int,
             metrics: dict[str, Any], *, sampler_at_end: bool = True) -> dict[str, Any] | None:
    """Log step `step` (0-based) and save when due (with sampler weights after the last step
    unless told otherwise); returns the checkpoints.jsonl line written, if any."""
    logger.log(step, metrics)
    if not should_save(cfg, step + 1):
        return None
    return save(client, cfg, step + 1, sampler=sampler_at_end and step + 1 == cfg.max_steps)


def summary(cfg: RecipeConfig, start_step: int, metrics: dict[str, Any],
            checkpoint: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    """What a recipe's `main` returns: where it started, the last metrics, the last save."""
    return {"start_step": start_step, "steps_done": max(start_step, cfg.max_steps),
            "resumed": start_step > 0, "metrics": metrics, "checkpoint": checkpoint, **extra}


def run(config_cls: type[C], train: Any, argv: Sequence[str] | None = None) -> Any:
    """A recipe's `main`: parse `key=value` arguments, connect (or start an embedded
    server), and call `train(cfg, service)`."""
    cfg = parse_config(config_cls, argv)
    with connect(cfg) as service:
        return train(cfg, service)
