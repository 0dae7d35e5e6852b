"""Which resolved packages the GPU check machine needs carried as wheels (collect_wheels.sh).

    python bench/gpu/pick_wheels.py REPORT.json TOP.txt PINS.txt

REPORT.json is `pip install --dry-run --report` for the project's top-level requirements
(TOP.txt) on the target (CPython 3.12, Linux x86_64). The dependency graph is walked from the
top: a package the image already holds (image_packages.txt) is not carried and its own needs
are not followed, except what a requested extra adds (tinker wants httpx[http2]: httpx is
there, h2 is not). $FORCE_CARRY names are carried anyway, $SKIP names never. Writes
`name==version` lines to PINS.txt.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # a bare pip environment: pip vendors packaging
    from pip._vendor.packaging.requirements import Requirement

HERE = Path(__file__).resolve().parent
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def names(text: str) -> set[str]:
    return {norm(w) for line in text.splitlines() if not line.startswith("#") for w in line.split()}


IMAGE = names((HERE / "image_packages.txt").read_text())
FORCE = names(os.environ.get("FORCE_CARRY", ""))
SKIP = names(os.environ.get("SKIP", ""))


def carried(name: str) -> bool:
    return (name not in IMAGE or name in FORCE) and name not in SKIP


def needs(meta: dict, name: str, extras: set[str]) -> Iterator[Requirement]:
    """The requirements of `name` (with `extras`) that apply on the target; of a package the
    image holds, only those its requested extras add."""
    for spec in meta[name].get("requires_dist") or []:
        r = Requirement(spec)

        def on(extra: str, r: Requirement = r) -> bool:
            return r.marker is None or r.marker.evaluate({**TARGET, "extra": extra})

        plain = on("")
        if (plain and carried(name)) or (not plain and any(on(e) for e in extras)):
            yield r


def pick(meta: dict, top: list[Requirement]) -> list[str]:
    carry: set[str] = set()
    seen: set[tuple[str, tuple[str, ...]]] = set()
    todo = list(top)
    while todo:
        r = todo.pop()
        n = norm(r.name)
        key = (n, tuple(sorted(r.extras)))
        if key in seen or n in SKIP or n not in meta:
            continue
        seen.add(key)
        if carried(n):
            carry.add(n)
        todo.extend(needs(meta, n, set(r.extras)))
    carry |= {n for n in FORCE if n in meta}
    return sorted(f"{meta[n]['name']}=={meta[n]['version']}" for n in carry)


def main() -> int:
    report, top_file, out = sys.argv[1:4]
    meta = {norm(i["metadata"]["name"]): i["metadata"] for i in json.loads(Path(report).read_text())["install"]}
    top = [Requirement(line) for line in Path(top_file).read_text().splitlines() if line.strip()]
    pins = pick(meta, top)
    Path(out).write_text("\n".join(pins) + "\n")
    print(f"  carry {len(pins)}: " + " ".join(pins))
    print(f"  resolved but left to the image (or not needed there): {len(meta) - len(pins)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
