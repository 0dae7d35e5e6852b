"""GPU tests: the official SDK against `tinsmith serve --device <dev>` on a tiny synthetic model.

Run on CUDA when a GPU is present; skipped on a CPU-only machine unless
TINSMITH_TEST_DEVICE names a device (`cpu` in the suite's dry run, tests/test_gpu_check.py).
TINSMITH_TEST_MODEL overrides the model (default synthetic/tiny-llama: no download, no
bundled GGUF, so it runs on the offline GPU machine). The server computes in bf16 on a GPU,
float32 on a CPU; tolerances below are per dtype. Well under a minute on a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tinker
import torch
from conftest import API_KEY, ServeProcess, logprobs_of
from tinker import types

DEVICE = os.environ.get("TINSMITH_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
MODEL = os.environ.get("TINSMITH_TEST_MODEL", "synthetic/tiny-llama")
BF16 = DEVICE is not None and not DEVICE.startswith("cpu")
# Packed with other runs vs alone: bitwise equal on a CPU (exact packing); in bf16 the shared
# base GEMMs see other rows, so sums may round differently: 2% relative on a summed loss.
PACKED_RTOL = 2e-2 if BF16 else 1e-5
# Same adapter, same batch, same device, before and after a save/load round trip.
ROUND_TRIP_ATOL = 1e-3 if BF16 else 1e-6

pytestmark = pytest.mark.skipif(
    DEVICE is None, reason="no CUDA device (TINSMITH_TEST_DEVICE=cpu runs these on the CPU)")


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    d = tmp_path_factory.mktemp("tinsmith-gpu")
    server = ServeProcess(d, ["--data-dir", str(d / "data"), "--models", MODEL, "--device", str(DEVICE),
                              "--dtype", "bfloat16" if BF16 else "float32"])
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def sc(gpu_server: str) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=gpu_server, api_key=API_KEY)


def batch(seed: int, rows: int = 2, tokens: int = 32) -> list[types.Datum]:
    """Next-token data over byte-range ids (any tokenizer's, the byte-level one's included)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rows):
        ids = rng.integers(3, 250, size=tokens + 1).tolist()
        out.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                               loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0 / tokens] * tokens}))
    return out


def steps(tc: tinker.TrainingClient, data: list[types.Datum], n: int, lr: float = 1e-3) -> list[float]:
    """n pipelined steps (forward_backward and optim_step sent before waiting); the losses."""
    losses = []
    for _ in range(n):
        fb, opt = tc.forward_backward(data, "cross_entropy"), tc.optim_step(types.AdamParams(learning_rate=lr))
        losses.append(fb.result().metrics["loss:sum"])
        opt.result()
    return losses


def test_training_loss_decreases(sc: tinker.ServiceClient) -> None:
    tc = sc.create_lora_training_client(base_model=MODEL, rank=8, seed=0).result()
    losses = steps(tc, batch(0), 8, lr=3e-3)
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0] - 0.05 * abs(losses[0]), losses


def test_sampling_greedy_and_seeded(sc: tinker.ServiceClient) -> None:
    tc = sc.create_lora_training_client(base_model=MODEL, rank=8, seed=1).result()
    steps(tc, batch(1), 2)
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(list(range(40, 56)))

    def draw(**kw: object) -> list[int]:
        params = types.SamplingParams(max_tokens=12, stop=[], **kw)
        return list(sampler.sample(prompt, 1, params).result().sequences[0].tokens)

    greedy = draw(temperature=0.0)
    assert len(greedy) == 12 and greedy == draw(temperature=0.0)
    seeded = [draw(temperature=1.0, seed=s) for s in (7, 7, 8, 9)]
    assert seeded[0] == seeded[1] and len(seeded[0]) == 12
    assert seeded[0] != seeded[2] or seeded[0] != seeded[3], "different seeds drew the same tokens"


def test_save_load_round_trip(sc: tinker.ServiceClient) -> None:
    tc = sc.create_lora_training_client(base_model=MODEL, rank=8, seed=2).result()
    data = batch(2)
    steps(tc, data, 3)
    before = logprobs_of(tc.forward(data, "cross_entropy").result())
    path = tc.save_state("round-trip").result().path
    loaded = sc.create_training_client_from_state(path).result()
    after = logprobs_of(loaded.forward(data, "cross_entropy").result())
    for a, b in zip(before, after, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=ROUND_TRIP_ATOL)


def test_packed_runs_match_alone(sc: tinker.ServiceClient) -> None:
    """Four runs stepping at once (packed into shared passes) lose what the same runs lose
    stepping one after another: two sets of runs with the same seeds and data."""
    seeds, n = range(10, 14), 3

    def one_set() -> list[tinker.TrainingClient]:
        return [sc.create_lora_training_client(base_model=MODEL, rank=8, seed=s).result() for s in seeds]

    alone = [steps(tc, batch(s), n) for tc, s in zip(one_set(), seeds)]
    together_clients = one_set()
    with ThreadPoolExecutor(len(seeds)) as pool:
        together = list(pool.map(lambda a: steps(a[0], batch(a[1]), n), zip(together_clients, seeds)))
    np.testing.assert_allclose(np.array(together), np.array(alone), rtol=PACKED_RTOL, atol=0)


def test_gpu_memory_gauge(gpu_server: str) -> None:
    """The server reports its peak GPU memory: above zero on a GPU, zero on a CPU."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{gpu_server}/metrics", timeout=30).text
    values = [s.value for fam in text_string_to_metric_families(text) for s in fam.samples
              if s.name == "tinsmith_device_memory_peak_bytes" and s.labels.get("model") == MODEL]
    assert len(values) == 1
    assert (values[0] > 0) == str(DEVICE).startswith("cuda"), values



# ----- CUDA-only engine checks: new CPU-tested paths (MoE kernels, Dimuon, slab KV cache) -----
# These compare a CUDA computation against a CPU or alternative-path reference in-process, so
# they need a real CUDA device: skipped in the CPU dry run (TINSMITH_TEST_DEVICE=cpu) too.
CUDA = DEVICE is not None and DEVICE.startswith("cuda") and torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (compares CUDA against a reference)")


def _to_device(case: tuple, dev: str) -> tuple:
    """A tests/test_moe.py kernel case moved to `dev`, with fresh leaves for the gradients."""
    from tinsmith.engine.lora import LoraWeights

    x, top_idx, top_w, gate_up, down, gu, dn, token_group = case

    def lw(w):
        return None if w is None else LoraWeights(w.A.detach().to(dev).requires_grad_(),
                                                   w.B.detach().to(dev).requires_grad_(), w.scale)

    return (x.detach().to(dev).requires_grad_(), top_idx.to(dev), top_w.to(dev), gate_up.to(dev), down.to(dev),
            [lw(w) for w in gu], [lw(w) for w in dn], None if token_group is None else token_group.to(dev))


@cuda_only
@pytest.mark.parametrize("single", [False, True], ids=["3-adapters", "1-adapter"])
def test_moe_grouped_experts_cuda_bf16_near_float32_loop(single: bool) -> None:
    """The grouped expert path on CUDA in bf16 (grouped_mm on sm80+, else padded bmm) is within
    bf16 rounding of the float32 reference loop on the CPU: 3e-2 of the output's scale, as the
    CPU bf16 test bounds it; input gradients within 5e-2 of their scale."""
    from test_moe import _kernel_case, _run_kernel

    from tinsmith.engine import moe_kernels

    case = _to_device(_kernel_case(torch.bfloat16, single), "cuda")
    if torch.cuda.get_device_capability() >= (8, 0) and hasattr(torch.nn.functional, "grouped_mm"):
        assert moe_kernels._native_ok(case[0], case[3].transpose(1, 2)), "grouped_mm path not taken on sm80+"
    y16, g16 = _run_kernel(moe_kernels.experts_forward, case)
    y32, g32 = _run_kernel(moe_kernels.experts_forward_loop, _kernel_case(torch.float32, single))
    assert y16.is_cuda and y32.abs().max() > 0.1
    err = float((y16.cpu() - y32).abs().max() / y32.abs().max())
    assert err < 3e-2, err
    gerr = float((g16[0].cpu() - g32[0]).abs().max() / g32[0].abs().max())  # d loss / d x
    assert g32[0].abs().max() > 0 and gerr < 5e-2, gerr


@cuda_only
def test_dimuon_step_cuda_equals_cpu() -> None:
    """One Dimuon optim_step (Newton-Schulz, momentum, clipping) on CUDA float32 equals the same
    step on the CPU within 1e-5 relative (of each parameter's update scale)."""
    from tinsmith.engine.adapter import Adapter
    from tinsmith.engine.lora import LoraWeights
    from tinsmith.types import DIMUON, DimuonSpec, LoraSpec

    rng = np.random.default_rng(0)
    layers = [(4, 16, 24), (1, 16, 24), (8, 5, 3), (6, 6, 6)]
    init = [(rng.normal(size=(r, i)).astype(np.float32), rng.normal(size=(o, r)).astype(np.float32))
            for r, i, o in layers]
    grads = [rng.normal(size=x.shape).astype(np.float32) for ab in init for x in ab]
    spec = DimuonSpec(learning_rate=5e-2, grad_clip_norm=3.0, beta1=0.9)

    def step(dev: str) -> tuple[list[np.ndarray], dict]:
        weights = {f"layers.{k}.proj": LoraWeights(torch.tensor(a, device=dev).requires_grad_(),
                                                   torch.tensor(b, device=dev).requires_grad_(), 1.0)
                   for k, (a, b) in enumerate(init)}
        adapter = Adapter(LoraSpec(rank=4), weights, DIMUON)
        for p, g in zip(adapter.parameters(), grads, strict=True):
            p.grad = torch.tensor(g, device=dev)
        metrics = adapter.optim_step(spec)
        return [p.detach().cpu().numpy() for p in adapter.parameters()], metrics

    gpu, gpu_m = step("cuda")
    cpu, cpu_m = step("cpu")
    assert gpu_m["grad_norm:mean"] == pytest.approx(cpu_m["grad_norm:mean"], rel=1e-5)
    start = [x for ab in init for x in ab]
    for g, c, s in zip(gpu, cpu, start, strict=True):
        update = float(np.abs(c - s).max())
        assert update > 1e-4, "the step moved nothing"  # not trivially equal
        assert float(np.abs(g - c).max()) <= 1e-5 * max(update, float(np.abs(c).max())), (g, c)


@cuda_only
def test_slab_kv_cache_greedy_equals_dynamic_on_cuda() -> None:
    """Greedy sampling (two requests decoding together, one with a LoRA) through the slab KV
    cache on CUDA draws the tokens the DynamicCache path draws; float32, so the comparison is
    strict: tokens equal, logprobs within 1e-4."""
    from tinsmith.engine.decode import DecodeBatch
    from tinsmith.engine.sampler import Sampler
    from tinsmith.engine.slab_batch import SlabBatch
    from tinsmith.types import SampleSpec

    runner, tokenizer, slot = _graph_runner("float32")
    prompts = [np.asarray(tokenizer.encode(t), np.int64)
               for t in ("Hello there, my friend", "The cat sat on the mat and then")]

    def run(kv_cache: str, batch_type: type) -> list:
        sampler = Sampler(runner, tokenizer, kv_cache=kv_cache)
        assert isinstance(sampler.batch, batch_type)
        boxes: list[list] = [[], []]
        for s, p, box in zip((slot, None), prompts, boxes):
            sampler.admit(s, SampleSpec(prompt=p, max_tokens=16, temperature=0.0), box.append)
        while sampler.pending:
            sampler.step()
        return [box[0].sequences[0] for box in boxes]

    try:
        slab, dynamic = run("slab", SlabBatch), run("dynamic", DecodeBatch)
    finally:
        runner.detach(slot)
    for got, want in zip(slab, dynamic, strict=True):
        assert len(want.tokens) == 16
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=0, atol=1e-4)


def _graph_runner(dtype: str):
    """The tiny model on CUDA in `dtype`, with one LoRA adapter (non-zero B) attached."""
    from conftest import TINY, attach_random_adapter
    from transformers import AutoTokenizer

    from tinsmith.engine.device import placement
    from tinsmith.engine.runner import ModelRunner
    from tinsmith.models.catalog import resolve_model_dir

    runner = ModelRunner(resolve_model_dir(TINY), TINY, placement("cuda", dtype))
    tokenizer = AutoTokenizer.from_pretrained(runner.model_dir)
    return runner, tokenizer, attach_random_adapter(runner, 4, 1)


@cuda_only
@pytest.mark.parametrize("dtype,atol", [("float32", 1e-4), ("bfloat16", 5e-2)])
def test_graph_replay_equals_eager_static_step(dtype: str, atol: float) -> None:
    """Sampling's decode step replayed from CUDA graphs (engine/graph_decode.py) gives the
    logits the same static step gives run eagerly, step by step on the same slab and inputs,
    with an adapter and the base model in one batch; the slab grows twice on the way (rows
    past 8, columns past 64), which rebuilds and recaptures the graphs. Tolerance: float32
    1e-4 absolute, bfloat16 5e-2 (a replay runs the captured kernels, so the two normally
    agree bitwise; the margin covers a different GEMM algorithm choice under capture)."""
    from tinsmith.engine.graph_decode import GraphDecoder
    from tinsmith.engine.sampler import Sampler
    from tinsmith.types import SampleSpec

    runner, tokenizer, slot = _graph_runner(dtype)
    try:
        sampler = Sampler(runner, tokenizer, cuda_graphs="on")
        batch, eager = sampler.batch, GraphDecoder(runner, capture=False)
        graphs = batch.graphs
        assert graphs is not None and graphs.capture

        def admit(s: int | None, text: str, n: int) -> None:
            spec = SampleSpec(prompt=np.asarray(tokenizer.encode(text), np.int64), num_samples=n,
                              max_tokens=1000, temperature=0.0)
            sampler.admit(s, spec, lambda out: None)

        admit(slot, "word " * 50, 2)  # 51 prompt tokens: the columns outgrow 64 after ~13 steps
        admit(None, "Hello there", 1)
        worst = 0.0
        with torch.inference_mode():
            for step in range(20):
                if step == 5:
                    admit(slot, "More rows join the batch now", 6)  # 9 rows: the slab rows grow
                batch._slab.reserve(batch._hi() + 1, batch.width + 1)  # as forward() does
                want = eager.step(batch._slab, batch.next_tok, batch.lens, batch.slab_rows, batch.slots)
                got = batch.forward()  # the graph replay; rewrites the cells eager.step wrote
                worst = max(worst, float((got - want).abs().max()))
                batch.keep(list(range(batch.rows)), got.argmax(-1))
        assert worst <= atol, worst
        counts = (graphs.steps, graphs.rebuilds, graphs.captures)
        assert counts[0] == 20 and counts[1] >= 3 and counts[2] >= 3, counts
    finally:
        runner.detach(slot)


@cuda_only
def test_graph_decode_timing_print() -> None:
    """Not an assertion on speed: prints the per-step time of the eager slab step, the static
    step run eagerly and its graph replay, for 1 and 8 rows of the tiny model in bf16
    (bench/sampling.py --device cuda measures whole runs)."""
    import time

    from tinsmith.engine.sampler import Sampler
    from tinsmith.types import SampleSpec

    runner, tokenizer, slot = _graph_runner("bfloat16")
    try:
        for rows in (1, 8):
            line = []
            for mode in ("off", "eager-static", "on"):
                sampler = Sampler(runner, tokenizer, cuda_graphs="off" if mode == "off" else "on")
                if mode == "eager-static":
                    sampler.batch.graphs.capture = False
                spec = SampleSpec(prompt=np.asarray(tokenizer.encode("Timing the decode"), np.int64),
                                  num_samples=rows, max_tokens=60, temperature=0.0)
                sampler.admit(slot, spec, lambda out: None)
                for _ in range(5):  # warm-up (and the capture)
                    sampler.step()
                t0 = time.perf_counter()
                for _ in range(40):
                    sampler.step()  # each step's logits reach the host: synchronised
                line.append(f"{mode} {(time.perf_counter() - t0) / 40 * 1e3:.2f} ms")
                while sampler.pending:
                    sampler.step()
            print(f"\ngraph decode, {rows} rows, tiny bf16, per step: " + ", ".join(line))
    finally:
        runner.detach(slot)


@cuda_only
def test_compiled_passes_inductor_equal_eager() -> None:
    """Compiled shared passes (engine/compiled.py) with inductor's CUDA kernels, bfloat16, on
    Llama-3.2-1B's 16-layer layout at hidden 64 (tests/test_compiled.py's model and passes):
    logprobs and gradients near the eager shared pass's (5e-2 absolute on logprobs; all
    gradients within 5e-2 of their norm; on a CPU through aot_eager, as `pytest -s
    tests/test_compiled.py -k bfloat16` prints: logprobs equal, gradients
    1.7% apart, and the eager bfloat16 pass 3.1% from float32) for new mixes of runs, which
    reuse the first pass's compilation. New shapes (one recompilation with symbolic sizes)
    are checked on the CPU, where tracing them is not cut by this file's time budget."""
    from test_compiled import PASSES, _close, _pass, _runner
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    eager, ea, es = _runner(None, "cuda", "bfloat16")
    comp, ca, cs = _runner("inductor", "cuda", "bfloat16")
    graphs = []
    for k, (pick, rows, length) in enumerate(PASSES):
        got = _pass(comp, ca, cs, pick, rows, length, k)
        _close(got, _pass(eager, ea, es, pick, rows, length, k), lp_atol=5e-2, grad_rel=5e-2, per_factor=False)
        graphs.append(counters["stats"]["unique_graphs"])
    assert comp.compiled is not None and comp.compiled.enabled
    assert graphs[-1] == graphs[0], graphs
