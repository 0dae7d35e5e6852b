"""A bounded soak: 16 concurrent SDK clients train, sample and save on one server for 30 s and
stop by themselves; not one future may be lost. Runs bench/soak.py's driver, shorter."""

from __future__ import annotations

import faulthandler
import gc
import importlib.util
import sys
import tempfile
import warnings
from pathlib import Path

from conftest import TINY

import tinsmith

_BENCH = Path(__file__).resolve().parents[1] / "bench" / "soak.py"


def _soak_module():
    spec = importlib.util.spec_from_file_location("tinsmith_bench_soak", _BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _where_it_waits(line: str, out: list[str]) -> None:
    """When a future is not answered: what the server's futures store still holds (pending,
    or done and never fetched, and the completion feeds) and every thread's stack, so that a
    failure says whether the server or the client lost it."""
    from tinsmith.scheduler.futures import FutureStore

    with warnings.catch_warnings():  # isinstance on some lazy torch objects warns
        warnings.simplefilter("ignore")
        stores = [o for o in gc.get_objects() if isinstance(o, FutureStore)]
    with tempfile.TemporaryFile("w+") as f:
        faulthandler.dump_traceback(f, all_threads=True)
        f.seek(0)
        stacks = f.read()
    out.append("\n".join([f"lost: {line}", *(x for s in stores for x in s.outstanding()), stacks]))


def test_soak_loses_no_future(tmp_path: Path) -> None:
    soak = _soak_module()
    lost: list[str] = []
    with tinsmith.local(models=[TINY], data_dir=tmp_path) as url:
        result = soak.run_soak(url, clients=16, duration_s=30, model=TINY,
                               sample_every=3, save_every=5, result_timeout_s=60,
                               on_lost=lambda line: _where_it_waits(line, lost))
    print("\n" + result.table())
    assert result.errors == [], "\n\n".join(lost)
    assert result.submitted == result.resolved
    kinds = {k: len(v) for k, v in result.latencies.items()}
    assert kinds["create_model"] == 16
    for kind in ("forward_backward", "optim_step", "sample", "save_state"):
        assert kinds.get(kind, 0) >= 16, kinds  # every client did each at least once
    assert kinds["forward_backward"] == kinds["optim_step"]
