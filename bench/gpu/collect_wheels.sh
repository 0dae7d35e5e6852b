#!/usr/bin/env bash
# Collect into .whl/ the wheels Tinsmith needs on the GPU check machine beyond what its image
# already holds (bench/gpu/image_packages.txt): CPython 3.12, manylinux x86_64, binary only.
#
# Run it here, on a machine with package access, from anywhere:
#     bash bench/gpu/collect_wheels.sh          # PYTHON=... picks the pip to use
# then name ".whl" in the device call's `carry` (bench/gpu/README.md).
#
# How: the project's runtime dependencies (pyproject.toml), less those the image has and less
# the PostgreSQL driver, are resolved for the target by pip's own resolver (`--dry-run
# --report`: metadata only, nothing big is fetched); every resolved package the image lacks
# (plus FORCE_CARRY, whose image versions may be too old for pydantic) is then downloaded
# with --no-deps at the resolved version. torch, transformers, numpy... are never fetched.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
DEST=${WHEEL_DIR:-.whl}
LIMIT_MIB=${WHEEL_LIMIT_MIB:-60}
# The image is Ubuntu 24.04 (glibc 2.39); pip matches manylinux_2_N tags one by one.
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux_2_24_x86_64 --platform manylinux_2_27_x86_64
        --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64
        --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64
        --platform manylinux_2_39_x86_64 --platform any)
export FORCE_CARRY="typing-extensions"   # pydantic needs a recent one; carrying it is harmless
# Never carried: the image's own packages, and what only some deployments need.
export SKIP="torch psycopg psycopg-binary"

quiet() { grep -v "^WARNING: Location .* is ignored" || true; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "[collect] top-level requirements from pyproject.toml"
"$PY" - "$work/top.txt" <<'EOF'
import os, re, sys, tomllib
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
image = {norm(l.strip()) for l in open("bench/gpu/image_packages.txt") if l.strip() and not l.startswith("#")}
skip = {norm(n) for n in os.environ["SKIP"].split()}
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
keep = [d for d in deps if (n := norm(re.match(r"[A-Za-z0-9_.-]+", d).group())) not in image | skip]
open(sys.argv[1], "w").write("\n".join(keep) + "\n")
print("  " + " ".join(keep))
EOF

echo "[collect] resolving for CPython 3.12 manylinux x86_64 (metadata only)"
"$PY" -m pip install -q --dry-run --ignore-installed --target "$work/t" "${TARGET[@]}" \
    --report "$work/report.json" -r "$work/top.txt" 2> >(quiet >&2)

"$PY" bench/gpu/pick_wheels.py "$work/report.json" "$work/top.txt" "$work/pins.txt"

echo "[collect] downloading into $DEST/"
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
"$PY" -m pip download -q --no-deps "${TARGET[@]}" -d "$DEST" -r "$work/pins.txt" 2> >(quiet >&2)
cp "$work/pins.txt" "$DEST/pins.txt"

total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
count=$(ls "$DEST"/*.whl | wc -l)
mib=$(( (total + 1048575) / 1048576 ))
printf '[collect] %d wheels, total %.1f MiB (%d bytes) in %s/\n' "$count" \
    "$(echo "$total / 1048576" | bc -l)" "$total" "$DEST"
if (( mib > LIMIT_MIB )); then
    echo "[collect] over the ${LIMIT_MIB} MiB limit" >&2
    exit 1
fi
