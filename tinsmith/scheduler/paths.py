"""The id scheme, and tinker:// checkpoint paths and checkpoint names.

Ids follow the hosted service's scheme, which the SDK relies on: training run
`<session>:train:<model_seq_id>`, sampler `<session>:sample:<seq>`, sampled sequence
`<sampler>:<seq_id>:<i>`.

`tinker://<training_run_id>/<kind>/<name>` with kind `weights` (save_state: weights and
optimizer state), `sampler_weights` (save_weights_for_sampler: weights only) or
`external_weights` (save_weights_external: a plain PEFT adapter folder). The
checkpoint id used in REST URLs is `<kind>/<name>`; the storage key adds the run id. That
is where a checkpoint's files start out: a copy (copy_weights) shares its source's key, and
a save that would write over shared files takes a fresh one (checkpoint_ops.write_key).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tinsmith.types import UserError

PREFIX = "tinker://"
_SESSION_END = re.compile(":(?:train|sample):")
KINDS = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def run_id(session_id: str, model_seq_id: int) -> str:
    return f"{session_id}:train:{model_seq_id}"


def sampler_id(session_id: str, sampling_session_seq_id: int) -> str:
    return f"{session_id}:sample:{sampling_session_seq_id}"


def sequence_ids(sampler: str, seq_id: int, num_samples: int) -> list[str]:
    """The ids of the sequences one sample request returns."""
    return [f"{sampler}:{seq_id}:{i}" for i in range(num_samples)]


def session_of(any_id: str) -> str:
    """The session a run, sampler or sampled-sequence id names."""
    return _SESSION_END.split(any_id, maxsplit=1)[0]


@dataclass(frozen=True)
class CheckpointRef:
    run_id: str
    kind: str  # "weights" | "sampler_weights"
    name: str

    @property
    def checkpoint_id(self) -> str:
        return f"{self.kind}/{self.name}"

    @property
    def tinker_path(self) -> str:
        return f"{PREFIX}{self.run_id}/{self.kind}/{self.name}"

    @property
    def storage_key(self) -> str:
        return f"{self.run_id}/{self.kind}/{self.name}"

    @property
    def checkpoint_type(self) -> str:
        return KINDS[self.kind]


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise UserError(
            f"invalid checkpoint name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def parse_path(path: str | None) -> CheckpointRef:
    """Parse a tinker:// checkpoint path, with an error that says what is wrong."""
    if not path:
        raise UserError("a tinker:// checkpoint path is required")
    if not path.startswith(PREFIX):
        raise UserError(f"invalid checkpoint path {path!r}: it must start with {PREFIX}")
    parts = path[len(PREFIX) :].split("/")
    if len(parts) != 3 or not all(parts):
        raise UserError(
            f"invalid checkpoint path {path!r}: expected tinker://<training_run_id>/<kind>/<name> "
            f"with kind one of {sorted(KINDS)}"
        )
    run_id, kind, name = parts
    if kind not in KINDS:
        raise UserError(
            f"invalid checkpoint path {path!r}: kind {kind!r} is not one of {sorted(KINDS)}"
        )
    return CheckpointRef(run_id, kind, check_name(name))


def ref_from_checkpoint_id(run_id: str, checkpoint_id: str) -> CheckpointRef:
    return parse_path(f"{PREFIX}{run_id}/{checkpoint_id}")
