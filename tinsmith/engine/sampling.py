"""The exact local sampling backend: sampler adapters on one ModelRunner, decoded by
sampler.Sampler.

Sampler adapters are cached (LRU, `max_adapters`); ones that came from a stored checkpoint
are reloaded on demand, ephemeral ones (snapshots of training runs, from
save_weights_and_get_sampling_client) are spilled to disk when evicted and restored from
there (the newest MAX_SPILLED_SAMPLERS of them). A sampler never shares tensors with a live
run, so later training steps cannot change what an existing sampler returns; only a new
`put_snapshot` under the same key does (a run's inflight adapter, one per run). Sampling is
continuous (see sampler.py): `start_sample` admits a request and `step` advances every
request in flight; a slot stays attached while a request decodes with it (pinned), even if
the cache evicts or replaces its key meanwhile. Not thread-safe: the model's worker thread
calls everything but `encode` and `decode`.
"""

from __future__ import annotations

import shutil
from collections import Counter, OrderedDict
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from tinsmith.engine.adapter import Adapter
from tinsmith.engine.backend import FilesLoader, OnDone, WeightsSnapshot
from tinsmith.engine.checkpoint import adapter_from_files, adapter_to_files
from tinsmith.engine.pool import read_spill, write_spill
from tinsmith.engine.runner import ModelRunner
from tinsmith.engine.sampler import Sampler
from tinsmith.types import NotFound, SampleOut, SampleSpec, UserError

# Unsaved samplers (save_weights_and_get_sampling_client) evicted from memory are kept on disk
# up to this many, newest first; at rank 32 on the bundled model that is about 1.3 GB.
MAX_SPILLED_SAMPLERS = 64


class LocalSampler:
    """A SamplingBackend (backend.py) on a runner shared with the LocalTrainer."""

    def __init__(
        self, runner: ModelRunner, tokenizer, spill_dir: Path, max_adapters: int = 16,
        *, kv_cache: str = "slab", prefill_chunk: int = 512, cuda_graphs: str = "auto",
    ) -> None:
        self.runner = runner
        self._tokenizer = tokenizer
        self._sampler = Sampler(runner, tokenizer, kv_cache=kv_cache, prefill_chunk=prefill_chunk,
                                cuda_graphs=cuda_graphs)
        self.spill_dir = spill_dir
        self._samplers: OrderedDict[str, tuple[Adapter, int]] = OrderedDict()
        self._max_samplers = max_adapters
        self._ephemeral: set[str] = set()  # sampler keys with no stored files (snapshots)
        self._spilled: OrderedDict[str, Path] = OrderedDict()  # ephemeral samplers moved to disk
        self._pins: Counter[int] = Counter()  # sampler slot -> requests decoding with it
        self._unpinned_detach: set[int] = set()  # slots to detach once their last request ends

    def put_snapshot(self, key: str, snapshot: WeightsSnapshot) -> None:
        """Serve a LocalTrainer's snapshot as sampler `key` (in memory only). A key already
        served is replaced (a run's inflight adapter): later requests get the new weights,
        requests decoding now finish on the old slot, and an old copy spilled to disk goes."""
        assert isinstance(snapshot, Adapter), "a snapshot from another backend"
        stale = self._spilled.pop(key, None)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
        self._ephemeral.add(key)
        self._put_sampler(key, snapshot)

    def _put_sampler(self, key: str, adapter: Adapter) -> None:
        old = self._samplers.pop(key, None)
        if old is not None:
            self._release(old[1])
        self._samplers[key] = (adapter, self.runner.attach(adapter))
        while len(self._samplers) > self._max_samplers:
            old_key, (old_adapter, slot) = self._samplers.popitem(last=False)
            if old_key in self._ephemeral:  # nothing to reload it from: keep it on disk
                files = adapter_to_files(old_adapter, self.runner.name, include_optimizer=False)
                self._spilled[old_key] = write_spill(self.spill_dir, files)
                while len(self._spilled) > MAX_SPILLED_SAMPLERS:
                    gone, folder = self._spilled.popitem(last=False)
                    self._ephemeral.discard(gone)
                    shutil.rmtree(folder, ignore_errors=True)
            self._release(slot)

    def _release(self, slot: int) -> None:
        """Detach a sampler slot now, or when the last request decoding with it ends."""
        if self._pins[slot] > 0:
            self._unpinned_detach.add(slot)
        else:
            self.runner.detach(slot)

    def _unpin(self, slot: int) -> None:
        self._pins[slot] -= 1
        if self._pins[slot] <= 0:
            del self._pins[slot]
            if slot in self._unpinned_detach:
                self._unpinned_detach.discard(slot)
                self.runner.detach(slot)

    def _sampler_slot(self, key: str | None, load: FilesLoader | None) -> int | None:
        if key is None:
            return None
        entry = self._samplers.get(key)
        if entry is None and key in self._spilled:
            load = partial(read_spill, self._spilled.pop(key))
        if entry is None:
            if load is None:
                raise NotFound(
                    f"sampler weights {key!r} are gone (the server keeps the newest "
                    f"{self._max_samplers + MAX_SPILLED_SAMPLERS} unsaved samplers); save them "
                    "with save_weights_for_sampler(name) to keep them"
                )
            try:
                adapter = adapter_from_files(load(), self.runner.layers, load_optimizer=False)
            except ValueError as e:
                raise UserError(f"cannot load sampler weights: {e}") from e
            self._put_sampler(key, adapter.clone_frozen())
            entry = self._samplers[key]
        self._samplers.move_to_end(key)
        return entry[1]

    def start_sample(
        self, key: str | None, spec: SampleSpec, load: FilesLoader | None, on_done: OnDone
    ) -> None:
        """Admit a sampling request with sampler adapter `key` (None = base model; `load`
        fetches its files if it is not cached). `on_done` gets the output, or the exception,
        from this call or a later `step()`. Errors of the request itself raise here."""
        slot = self._sampler_slot(key, load)
        if slot is None:
            self._sampler.admit(None, spec, on_done)
            return
        self._pins[slot] += 1

        def finish(out: SampleOut | BaseException) -> None:
            self._unpin(slot)
            on_done(out)

        try:
            self._sampler.admit(slot, spec, finish)
        except BaseException:
            self._unpin(slot)
            raise

    @property
    def pending(self) -> bool:
        """True while sampling requests are decoding: `step()` has work."""
        return self._sampler.pending

    @property
    def rows(self) -> int:
        """Sequences decoding: what the next `step()` advances."""
        return self._sampler.live_rows

    def step(self) -> None:
        """One decoding step of every sampling request in flight."""
        self._sampler.step()

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self._tokenizer.encode(text)]

    def decode(self, tokens: Sequence[int]) -> str:
        return self._tokenizer.decode(list(tokens), skip_special_tokens=True)
