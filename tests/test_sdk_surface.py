"""Every public method of the installed SDK's clients, called once against a real server.

The methods are enumerated from the installed `tinker` package (`ServiceClient`,
`TrainingClient`, `SamplingClient`, `RestClient`, `AdminClient`, each `foo` and its deprecated
`foo_async`), so a newer SDK's additions show up here as failures ("not in the walk") until
they are added and work. Each call must answer within `CALL_TIMEOUT_S` and either work (its
result is checked for the SDK's type) or be one of `REFUSED`: a 4xx whose body says why, never
a bare 404/405. docs/compatibility.md lists the same surface with its status.

The server has API keys: the walk runs as a plain user key ("a"); `AdminClient` and the
cross-key checks use an admin key and a second user ("b"). tests/test_cli_surface.py walks the
`tinker` CLI the same way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
import tinker
from tinker import types
from tinker.lib.api_future_impl import QueueState
from tinker.lib.public_interfaces.api_future import APIFuture, AwaitableConcurrentFuture

import tinsmith
from tests.conftest import TINY

CALL_TIMEOUT_S = 120
CLASSES = ("ServiceClient", "TrainingClient", "SamplingClient", "RestClient", "AdminClient")
# Methods that stay off, with the words their 4xx must contain (docs/compatibility.md says why).
REFUSED: dict[str, str] = {}
# Methods whose work is wholly in the SDK and fails offline, with the exception they raise:
# SamplingClient.get_tokenizer loads the tokenizer from the Hugging Face Hub by the model's
# name and never asks the server. docs/compatibility.md gives the workaround, checked here.
CLIENT_SIDE: dict[str, type[Exception]] = {"SamplingClient.get_tokenizer": OSError}


def surface() -> list[str]:
    """`Class.method` for every public member of the SDK's clients, `_async` variants too."""
    names = []
    for cls_name in CLASSES:
        cls = getattr(tinker, cls_name)
        names += [f"{cls_name}.{m}" for m, _ in inspect.getmembers(cls) if not m.startswith("_")]
    return sorted(names)


@dataclass
class Walk:
    """The clients and the things they act on, made on first use."""

    url: str
    keys: dict[str, str]
    names: Iterator[int] = field(default_factory=itertools.count)

    def name(self, stem: str) -> str:
        return f"{stem}-{next(self.names)}"

    @cached_property
    def sc(self) -> tinker.ServiceClient:
        return tinker.ServiceClient(base_url=self.url, api_key=self.keys["a"], project_id="proj-walk")

    def fresh_sc(self) -> tinker.ServiceClient:
        """A ServiceClient of its own session."""
        return tinker.ServiceClient(base_url=self.url, api_key=self.keys["a"])

    @cached_property
    def rc(self) -> tinker.RestClient:
        return tinker.RestClient(base_url=self.url, api_key=self.keys["a"])

    @cached_property
    def admin(self) -> tinker.AdminClient:
        return tinker.AdminClient(base_url=self.url, api_key=self.keys["admin"])

    @cached_property
    def tc(self) -> tinker.TrainingClient:
        tc = self.sc.create_lora_training_client(base_model=TINY, rank=2, seed=0).result()
        tc.forward_backward([self.datum], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        return tc

    @cached_property
    def datum(self) -> types.Datum:
        return types.Datum(model_input=types.ModelInput.from_ints([5, 6, 7, 8]),
                           loss_fn_inputs={"target_tokens": [6, 7, 8, 9],
                                           "weights": [1.0, 1.0, 1.0, 1.0]})

    @cached_property
    def sampler(self) -> tinker.SamplingClient:
        return self.tc.save_weights_and_get_sampling_client(self.name("walk-sampler")).result()

    @cached_property
    def loss_handle(self) -> Any:
        return self.sc.create_custom_loss(neg_ll, {"logprobs": 1, "weights": 1}).result()

    @property
    def run_id(self) -> str:
        return self.tc.model_id

    @property
    def session_id(self) -> str:
        return self.sc.holder.get_session_id()

    def state(self) -> str:
        """A fresh training checkpoint (weights and optimizer) of the walk's run."""
        return self.tc.save_state(self.name("walk-state")).result().path

    def sampler_weights(self) -> str:
        return self.tc.save_weights_for_sampler(self.name("walk-weights")).result().path

    def external(self) -> str:
        """Fresh external (merged, downloadable) weights of the walk's run."""
        return self.tc.save_weights_external(self.name("walk-external")).result().path

    def published(self) -> str:
        path = self.state()
        self.rc.publish_checkpoint_from_tinker_path(path).result()
        return path


def neg_ll(logprobs: Any, weights: Any) -> tuple[Any, dict[str, Any]]:
    """A per-datum loss for create_custom_loss (traced by the SDK, run on the client)."""
    loss = -(logprobs * weights).sum()
    return loss, {"custom/neg_ll:sum": loss}


A = tuple[Any, tuple[Any, ...], dict[str, Any], type | tuple[type, ...] | None]
# name -> the object, args, kwargs and the expected result type (None: anything) of one call.
CALLS: dict[str, Callable[[Walk], A]] = {
    # --- ServiceClient --------------------------------------------------------------------
    "ServiceClient.close": lambda w: (w.fresh_sc(), ("success",), {}, None),
    "ServiceClient.copy_weights": lambda w: (w.sc, (w.state(),), {}, str),
    "ServiceClient.create_custom_loss": lambda w: (  # once per loss and session: a new one
        w.fresh_sc(), (neg_ll,), {"input_ranks": {"logprobs": 1, "weights": 1}}, None),
    "ServiceClient.create_lora_training_client": lambda w: (
        w.sc, (), {"base_model": TINY, "rank": 2}, tinker.TrainingClient),
    "ServiceClient.create_rest_client": lambda w: (w.sc, (), {}, tinker.RestClient),
    "ServiceClient.create_sampling_client": lambda w: (
        w.sc, (), {"base_model": TINY}, tinker.SamplingClient),
    "ServiceClient.create_training_client_from_state": lambda w: (
        w.sc, (w.state(),), {}, tinker.TrainingClient),
    "ServiceClient.create_training_client_from_state_with_optimizer": lambda w: (
        w.sc, (w.state(),), {}, tinker.TrainingClient),
    "ServiceClient.get_console_url": lambda w: (w.sc, (), {}, str),
    "ServiceClient.get_server_capabilities": lambda w: (
        w.sc, (), {}, types.GetServerCapabilitiesResponse),
    "ServiceClient.get_telemetry": lambda w: (w.sc, (), {}, None),
    "ServiceClient.holder": lambda w: (w.sc, (), {}, None),
    # --- TrainingClient -------------------------------------------------------------------
    "TrainingClient.create_sampling_client": lambda w: (
        w.tc, (w.sampler_weights(),), {}, tinker.SamplingClient),
    "TrainingClient.forward": lambda w: (
        w.tc, ([w.datum], "cross_entropy"), {}, types.ForwardBackwardOutput),
    "TrainingClient.forward_backward": lambda w: (
        w.tc, ([w.datum], "cross_entropy"), {}, types.ForwardBackwardOutput),
    "TrainingClient.forward_backward_custom": lambda w: (
        w.tc, ([w.datum], w.loss_handle), {}, types.ForwardBackwardOutput),
    "TrainingClient.get_console_url": lambda w: (w.tc, (), {}, str),
    "TrainingClient.get_info": lambda w: (w.tc, (), {}, types.GetInfoResponse),
    "TrainingClient.get_telemetry": lambda w: (w.tc, (), {}, None),
    "TrainingClient.get_tokenizer": lambda w: (w.tc, (), {}, None),
    "TrainingClient.load_state": lambda w: (w.tc, (w.state(),), {}, types.LoadWeightsResponse),
    "TrainingClient.load_state_with_optimizer": lambda w: (
        w.tc, (w.state(),), {}, types.LoadWeightsResponse),
    "TrainingClient.optim_step": lambda w: (
        w.tc, (types.AdamParams(learning_rate=1e-4),), {}, types.OptimStepResponse),
    "TrainingClient.save_state": lambda w: (
        w.tc, (w.name("state"),), {}, types.SaveWeightsResponse),
    "TrainingClient.save_weights_and_get_sampling_client": lambda w: (
        w.tc, (), {}, tinker.SamplingClient),
    "TrainingClient.save_weights_external": lambda w: (
        w.tc, (w.name("external"),), {}, types.SaveWeightsExternalResponse),
    "TrainingClient.save_weights_for_sampler": lambda w: (
        w.tc, (w.name("weights"),), {}, types.SaveWeightsForSamplerResponse),
    # --- SamplingClient -------------------------------------------------------------------
    "SamplingClient.compute_logprobs": lambda w: (
        w.sampler, (types.ModelInput.from_ints([5, 6, 7]),), {}, list),
    "SamplingClient.create": lambda w: (
        tinker.SamplingClient, (w.sc.holder,), {"base_model": TINY}, tinker.SamplingClient),
    "SamplingClient.from_sampler_handle": lambda w: (
        tinker.SamplingClient, (w.sampler.get_sampler_handle(),), {"api_key": w.keys["a"]},
        tinker.SamplingClient),
    "SamplingClient.get_base_model": lambda w: (w.sampler, (), {}, str),
    "SamplingClient.get_sampler_handle": lambda w: (w.sampler, (), {}, str),
    "SamplingClient.get_telemetry": lambda w: (w.sampler, (), {}, None),
    "SamplingClient.get_tokenizer": lambda w: (w.sampler, (), {}, None),
    "SamplingClient.on_queue_state_change": lambda w: (
        w.sampler, (QueueState.ACTIVE, None), {}, type(None)),
    "SamplingClient.sample": lambda w: (
        w.sampler, (types.ModelInput.from_ints([5, 6, 7]), 2, types.SamplingParams(max_tokens=3)),
        {}, types.SampleResponse),
    # --- RestClient -----------------------------------------------------------------------
    "RestClient.assign_session_project": lambda w: (
        w.rc, (w.session_id, "proj-walk-2"), {}, None),
    "RestClient.copy_weights": lambda w: (w.rc, (w.state(), "proj-archive"), {}, str),
    "RestClient.delete_checkpoint": lambda w: (
        w.rc, (w.run_id, "weights/" + w.state().rsplit("/", 1)[1]), {}, None),
    "RestClient.delete_checkpoint_from_tinker_path": lambda w: (w.rc, (w.state(),), {}, None),
    "RestClient.export_session_trace": lambda w: (w.rc, (w.session_id,), {}, str),
    "RestClient.get_audit_log": lambda w: (w.rc, (), {}, types.AuditLogResponse),
    "RestClient.get_billing_usage": lambda w: (w.rc, _window(), {}, types.BillingUsageResponse),
    "RestClient.get_current_checkpoint_storage_usage": lambda w: (
        w.rc, (), {}, types.CurrentCheckpointStorageUsageResponse),
    "RestClient.get_external_weights_urls": lambda w: (
        w.rc, (w.external(),), {}, types.ExternalWeightsUrlsResponse),
    "RestClient.get_sampler": lambda w: (
        w.rc, (w.sampler._sampling_session_id,), {}, types.GetSamplerResponse),
    "RestClient.get_server_capabilities": lambda w: (
        w.rc, (), {}, types.GetServerCapabilitiesResponse),
    "RestClient.get_session": lambda w: (w.rc, (w.session_id,), {}, types.GetSessionResponse),
    "RestClient.get_telemetry": lambda w: (w.rc, (), {}, None),
    "RestClient.get_training_run": lambda w: (w.rc, (w.run_id,), {}, types.TrainingRun),
    "RestClient.get_training_run_by_tinker_path": lambda w: (
        w.rc, (w.state(),), {}, types.TrainingRun),
    "RestClient.get_weights_info_by_tinker_path": lambda w: (
        w.rc, (w.state(),), {}, types.WeightsInfoResponse),
    "RestClient.list_checkpoints": lambda w: (
        w.rc, (w.run_id,), {}, types.CheckpointsListResponse),
    "RestClient.list_sessions": lambda w: (w.rc, (), {}, types.ListSessionsResponse),
    "RestClient.list_training_runs": lambda w: (
        w.rc, (), {"project_id": "proj-walk"}, types.TrainingRunsResponse),
    "RestClient.list_user_checkpoints": lambda w: (w.rc, (), {}, types.CheckpointsListResponse),
    "RestClient.publish_checkpoint_from_tinker_path": lambda w: (w.rc, (w.state(),), {}, None),
    "RestClient.search_sessions": lambda w: (
        w.rc, (types.SessionSearchRequest(),), {}, types.SessionSearchResponse),
    "RestClient.set_checkpoint_ttl_from_tinker_path": lambda w: (
        w.rc, (w.state(), 3600), {}, None),
    "RestClient.unpublish_checkpoint_from_tinker_path": lambda w: (
        w.rc, (w.published(),), {}, None),
    "RestClient.whoami": lambda w: (w.rc, (), {}, types.WhoamiResponse),
    # --- AdminClient ----------------------------------------------------------------------
    "AdminClient.get_audit_log": lambda w: (w.admin, (), {}, types.AuditLogResponse),
    "AdminClient.get_billing_usage": lambda w: (w.admin, _window(), {}, types.BillingUsageResponse),
    "AdminClient.get_current_checkpoint_storage_usage": lambda w: (
        w.admin, (), {}, types.CurrentCheckpointStorageUsageResponse),
    "AdminClient.get_telemetry": lambda w: (w.admin, (), {}, None),
}


def _window() -> tuple[str, str]:
    """The hour-aligned window around now that billing queries take."""
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    return start.isoformat(), (start + timedelta(hours=3)).isoformat()


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Walk]:
    from tinsmith.embedded import create_api_key

    d: Path = tmp_path_factory.mktemp("tinsmith-surface")
    keys = {"a": create_api_key(d, name="walker").key, "b": create_api_key(d, name="other").key,
            "admin": create_api_key(d, name="ops", admin=True).key}
    with tinsmith.local(models=[TINY], data_dir=d) as url:
        yield Walk(url, keys)


async def _resolve_async(value: Any) -> Any:
    while inspect.isawaitable(value):
        value = await value
    return value


def _resolve(value: Any) -> Any:
    """A call's answer: futures waited on (an SDK future's own `result`, with a timeout)."""
    # A client future (create_lora_training_client's) is a client too: waited on all the same.
    if isinstance(value, APIFuture | AwaitableConcurrentFuture | concurrent.futures.Future):
        return value.result(timeout=CALL_TIMEOUT_S)
    if inspect.isawaitable(value):
        return asyncio.run(_resolve_async(value))
    return value


def call(walk: Walk, name: str) -> Any:
    """Call `name` ("Class.method" or "Class.method_async") as the walk's table says."""
    base = name.removesuffix("_async")
    obj, args, kwargs, expected = CALLS[base](walk)
    member = getattr(obj, name.split(".", 1)[1])
    if base == "ServiceClient.holder":
        value = member
    elif name.endswith("_async"):
        value = asyncio.run(_resolve_async(member(*args, **kwargs)))
    else:
        value = _resolve(member(*args, **kwargs))
    if expected is not None:
        assert isinstance(value, expected), f"{name} answered {type(value).__name__}"
    return value


def test_the_walk_covers_exactly_the_sdk_surface() -> None:
    """A method the SDK gained is missing from the walk; one it lost is stale."""
    bases = {n.removesuffix("_async") for n in surface()}
    assert not bases - CALLS.keys(), f"not in the walk (add them, make them work): {bases - CALLS.keys()}"
    assert not CALLS.keys() - bases, f"no longer in the SDK: {CALLS.keys() - bases}"


def test_the_compatibility_page_names_every_method() -> None:
    """docs/compatibility.md has a row for each method (its `_async` twin is said once)."""
    page = (Path(__file__).parents[1] / "docs" / "compatibility.md").read_text()
    missing = [b for b in sorted(CALLS) if f"`{b}`" not in page]
    assert not missing, f"docs/compatibility.md lacks: {missing}"


@pytest.mark.parametrize("name", surface())
def test_every_sdk_method_works_or_is_refused_clearly(walk: Walk, name: str) -> None:
    if name.removesuffix("_async") not in CALLS:
        pytest.fail(f"{name} is not in the walk")
    if name in CLIENT_SIDE:
        with pytest.raises(CLIENT_SIDE[name]):
            call(walk, name)
        _offline_tokenizer_workaround(walk)
        return
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(call, walk, name)
        try:
            fut.result(timeout=CALL_TIMEOUT_S + 30)
        except concurrent.futures.TimeoutError:
            pytest.fail(f"{name} did not answer within {CALL_TIMEOUT_S + 30} s")
        except tinker.APIStatusError as e:
            reason = REFUSED.get(name.removesuffix("_async"))
            assert reason is not None, f"{name} failed: {e.status_code} {e.message}"
            assert 400 <= e.status_code < 500 and e.status_code not in (404, 405), e
            assert reason in str(e), e
        else:
            assert name.removesuffix("_async") not in REFUSED, f"{name} works: take it off REFUSED"


def _offline_tokenizer_workaround(walk: Walk) -> None:
    """docs/compatibility.md's line for a sampling client's tokenizer offline: a rank-1
    training client of the same base model, whose get_tokenizer the server answers."""
    sampler = walk.sampler
    tok = walk.sc.create_lora_training_client(base_model=sampler.get_base_model(),
                                              rank=1).result().get_tokenizer()
    assert tok.encode("a tinsmith") == walk.tc.get_tokenizer().encode("a tinsmith")
