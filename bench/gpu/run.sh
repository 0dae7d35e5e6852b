#!/usr/bin/env bash
# The whole GPU check in one command, on the offline GPU machine, from the repo root:
#     bash bench/gpu/run.sh
# 1. installs the carried wheels (.whl/, from bench/gpu/collect_wheels.sh) into /tmp, with
#    no index: `pip install --no-index --find-links .whl --no-deps --target`; the repo itself
#    goes on PYTHONPATH;
# 2. runs the GPU tests (tests/test_gpu.py) on CUDA;
# 3. runs bench/gpu/bench.py (B1-B4, S1-S3, the 1-rank group, MoE and VL against plain
#    PEFT / HF generate / the single-process engine: ratios on this very GPU);
# 4. prints ONE table; with $OUT set, writes there run.log (everything printed), table.txt,
#    results.jsonl (the raw figures) and servers.log (the tails of the servers' logs).
# Every step has a time budget: the whole run ends within TOTAL_BUDGET_S (default 470 s, under
# 8 minutes), the bench getting what the install and the tests left of it; a failing or
# overrunning test or phase is reported in the table, never aborts the rest. Exit status: 0
# when the tests passed and every phase finished (goals met or not: the table says), else 1.
#
# TINSMITH_GPU_CHECK_DRY=1: the CPU dry run (tests/test_gpu_check.py): no pip, the tests with
# TINSMITH_TEST_DEVICE=cpu, the bench with --tiny. PYTHON picks the interpreter (default python3).
# TEST_BUDGET_S / BENCH_BUDGET_S / TOTAL_BUDGET_S override the budgets (TEST_BUDGET_S=0: no
# tests, e.g. for a second run of the phases the first skipped: BENCH_ARGS="--only plain-vl");
# BENCH_ARGS adds bench.py flags.
set -euo pipefail

cd "$(dirname "$0")/../.."
ROOT=$PWD
START=$SECONDS
DRY=${TINSMITH_GPU_CHECK_DRY:-0}
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tinsmith-gpu-check.XXXXXX")
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    exec > >(tee "$OUT/run.log") 2>&1
fi
export HF_HUB_OFFLINE=1 TINKER_TELEMETRY=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TINSMITH_CACHE="$WORK/cache"   # prepared (synthetic) model folders: fresh each run

say() { printf '[run.sh +%4ds] %s\n' $((SECONDS - START)) "$*"; }

if [[ "$DRY" == 1 ]]; then
    TEST_BUDGET_S=${TEST_BUDGET_S:-240}
    TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-900}
    BENCH_BUDGET_S=${BENCH_BUDGET_S:-600}
    BENCH_MODE=(--tiny)
    export TINSMITH_TEST_DEVICE=${TINSMITH_TEST_DEVICE:-cpu}
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    say "dry run on the CPU: no wheel install"
else
    TEST_BUDGET_S=${TEST_BUDGET_S:-100}
    TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-470}
    BENCH_MODE=(--exact-packing)
    SITE=/tmp/tinsmith-site
    if compgen -G ".whl/*.whl" >/dev/null; then
        say "installing $(ls .whl/*.whl | wc -l) carried wheels into $SITE"
        "$PYTHON" -m pip install -q --no-index --find-links .whl --no-deps --no-compile \
            --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
            || say "pip install failed (status $?): the tests and bench below will say what is missing"
    else
        say "no .whl/ here: run bench/gpu/collect_wheels.sh on a machine with package access and carry .whl"
    fi
    export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    "$PYTHON" - <<'EOF' || say "imports failed: the server cannot start"
import importlib.metadata as m, sys
names = ["torch", "transformers", "peft", "tinker", "fastapi", "uvicorn", "pydantic", "sqlalchemy", "alembic"]
print("python", sys.version.split()[0], " ".join(f"{n} {m.version(n)}" for n in names))
import tinsmith.cli, tinsmith.embedded  # noqa: F401,E401  (the server's whole import chain)
EOF
fi

# --- 1. GPU tests ---------------------------------------------------------------------------
rc=0
if [[ "$TEST_BUDGET_S" == 0 ]]; then
    say "GPU tests: not run (TEST_BUDGET_S=0)"
    rc=5
    summary="not run (TEST_BUDGET_S=0)"
else
    say "GPU tests: tests/test_gpu.py (budget ${TEST_BUDGET_S} s)"
    timeout -k 10 "$TEST_BUDGET_S" "$PYTHON" -m pytest -q -p no:cacheprovider \
        tests/test_gpu.py 2>&1 | tee "$WORK/tests.log" || rc=$?
    summary=$(grep -E '[0-9]+ (passed|failed|skipped|error)' "$WORK/tests.log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//' || true)
    if [[ $rc == 124 || $rc == 137 ]]; then summary="cut at ${TEST_BUDGET_S} s; ${summary}"; fi
    if grep -qE '^[0-9]+ skipped' <<<"$summary" && ! grep -q passed <<<"$summary"; then rc=5; fi
fi
"$PYTHON" -c 'import json,sys; print(json.dumps({"rc": int(sys.argv[1]), "summary": sys.argv[2] or "no summary"}))' \
    "$rc" "$summary" > "$WORK/tests.json"
say "GPU tests: exit $rc, $summary"

# --- 2. bench -------------------------------------------------------------------------------
# What is left of the total, less 30 s: bench.py may overrun its budget by a phase's kill
# grace (20 s), and the table and copies take a few seconds.
BENCH_BUDGET_S=${BENCH_BUDGET_S:-$((TOTAL_BUDGET_S - (SECONDS - START) - 30))}
say "bench: bench/gpu/bench.py ${BENCH_MODE[*]} (budget ${BENCH_BUDGET_S} s)"
brc=0
# shellcheck disable=SC2086
timeout -k 5 $((BENCH_BUDGET_S + 25)) "$PYTHON" bench/gpu/bench.py "${BENCH_MODE[@]}" ${BENCH_ARGS:-} \
    --budget-s "$BENCH_BUDGET_S" --results "$WORK/results.jsonl" --workdir "$WORK/bench" --no-table \
    || brc=$?
say "bench: exit $brc"

# --- 3. the table ---------------------------------------------------------------------------
for log in "$WORK"/bench/*/server.log; do
    [[ -f "$log" ]] || continue
    echo "==== ${log#"$WORK/bench/"} (last 60 lines)"
    tail -n 60 "$log"
done > "$WORK/servers.log"
"$PYTHON" bench/gpu/table.py "$WORK/results.jsonl" --tests "$WORK/tests.json" --out "$WORK/table.txt" \
    || say "table.py failed"
if [[ -n "${OUT:-}" ]]; then
    cp "$WORK/results.jsonl" "$WORK/table.txt" "$WORK/servers.log" "$OUT/" 2>/dev/null || true
fi
say "done in $((SECONDS - START)) s"
[[ $rc == 0 && $brc == 0 ]]
