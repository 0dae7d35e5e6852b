"""The loss registry of one server: the built-in losses plus operator-supplied modules.

An operator adds losses by naming Python modules at start-up (`tinsmith serve
--loss-module my_losses` or a path to a .py file). Each module defines

    LOSSES: dict[str, tinsmith.engine.losses.LossSpec]

and clients then call those names through `forward_backward(data, "<name>", config)`
exactly like the built-ins. A name that clashes with a built-in (or with another module)
stops the server at start-up rather than silently shadowing it.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType

from tinsmith.engine.losses.base import LossSpec
from tinsmith.engine.losses.policy import POLICY
from tinsmith.engine.losses.preference import PREFERENCE
from tinsmith.engine.losses.supervised import SUPERVISED
from tinsmith.types import UserError

BUILTIN: Mapping[str, LossSpec] = {**SUPERVISED, **POLICY, **PREFERENCE}


def _import(ref: str) -> ModuleType:
    path = Path(ref)
    if ref.endswith(".py"):
        if not path.is_file():
            raise ValueError(f"loss module file {ref} does not exist")
        spec = importlib.util.spec_from_file_location(f"tinsmith_user_losses_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise ValueError(f"cannot import loss module {ref}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(ref)


class LossRegistry:
    def __init__(self, specs: Mapping[str, LossSpec]) -> None:
        self._specs = dict(specs)

    @classmethod
    def load(cls, modules: Iterable[str] = ()) -> LossRegistry:
        """Built-ins plus the `LOSSES` of each module; raises ValueError on a bad module."""
        specs = dict(BUILTIN)
        for ref in modules:
            found = getattr(_import(ref), "LOSSES", None)
            if not isinstance(found, Mapping) or not all(
                isinstance(k, str) and isinstance(v, LossSpec) for k, v in found.items()
            ):
                raise ValueError(f"loss module {ref} must define LOSSES: dict[str, LossSpec]")
            for name, spec in found.items():
                if name in specs:
                    raise ValueError(f"loss module {ref} redefines the loss {name!r}")
                if ":" in name or not name:
                    raise ValueError(f"loss module {ref}: invalid loss name {name!r}")
                specs[name] = spec
        return cls(specs)

    def names(self) -> list[str]:
        return sorted(self._specs)

    def get(self, name: str) -> LossSpec:
        spec = self._specs.get(name)
        if spec is None:
            raise UserError(f"unknown loss function {name!r}; available: {', '.join(self.names())}")
        return spec

    def __contains__(self, name: object) -> bool:
        return name in self._specs
