"""Weights out: `tinsmith checkpoints download|export`, save_weights_external and its signed
URLs, and the SDK's own `tinker checkpoint download`, against a real server.

The exported folders are checked by what matters: a PEFT adapter loaded with peft, and a
merged model loaded with plain transformers, give the same logprobs as the server's own
forward pass on the same tokens.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
import tinker
import torch
from conftest import API_KEY, SENTENCES, TINY, KeyedServer, ServeProcess, logprobs_of, text_datum
from tinker import types

from tinsmith.cli import main as tinsmith_cli
from tinsmith.models import resolve_model_dir
from tinsmith.scheduler.paths import parse_path
from tinsmith.storage.files import CheckpointStore

PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def _trained(service_client: tinker.ServiceClient, tokenizer, steps: int = 3):
    tc = service_client.create_lora_training_client(base_model=TINY, rank=4)
    data = [text_datum(tokenizer, s) for s in SENTENCES]
    for _ in range(steps):
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=2e-2)).result()
    return tc, data


def _hf_logprobs(model: torch.nn.Module, datum: types.Datum) -> np.ndarray:
    ids = torch.tensor([datum.model_input.to_ints()])
    targets = torch.tensor(datum.loss_fn_inputs["target_tokens"].to_numpy()).long()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0].numpy()


def _base():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_model_dir(TINY), dtype=torch.float32)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")  # peft, on lm_head
def test_exported_peft_and_merged_models_match_the_server(
    base_url: str, service_client: tinker.ServiceClient, tokenizer, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tc, data = _trained(service_client, tokenizer)
    path = tc.save_state("export-me").result().path
    server = logprobs_of(tc.forward(data, "cross_entropy").result())

    peft_dir, merged_dir = tmp_path / "peft", tmp_path / "merged"
    assert tinsmith_cli(["checkpoints", "download", path, "--out", str(peft_dir),
                         "--base-url", base_url]) == 0
    assert {p.name for p in peft_dir.iterdir()} == PEFT_FILES
    assert tinsmith_cli(["checkpoints", "export", path, "--merged", "--out", str(merged_dir),
                         "--base-url", base_url]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in merged_dir.iterdir()}

    base = _base()
    untrained = [_hf_logprobs(base, d) for d in data]
    peft_model = PeftModel.from_pretrained(base, peft_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()  # plain transformers
    for d, want, before in zip(data, server, untrained):
        assert np.abs(want - before).max() > 1e-2  # training moved the logprobs
        np.testing.assert_allclose(_hf_logprobs(peft_model, d), want, atol=1e-4)
        np.testing.assert_allclose(_hf_logprobs(merged, d), want, atol=1e-4)
    # The unembedding update was not merged into the (tied) input embeddings as well, and the
    # config says the two are untied now (other loaders than transformers trust it).
    assert torch.equal(merged.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert json.loads((merged_dir / "config.json").read_text())["tie_word_embeddings"] is False


def test_save_weights_external_through_the_sdk(
    service_client: tinker.ServiceClient, rest_client: tinker.RestClient, tokenizer
) -> None:
    tc, _ = _trained(service_client, tokenizer, steps=1)
    path = tc.save_weights_external("ext").result().path
    assert path == f"tinker://{tc.model_id}/external_weights/ext"
    listed = rest_client.list_checkpoints(tc.model_id).result().checkpoints
    assert [(c.checkpoint_type, c.tinker_path) for c in listed] == [("external", path)]

    signed = rest_client.get_external_weights_urls(path).result()
    assert set(signed.urls) == PEFT_FILES
    from safetensors.torch import load

    sizes = {}
    for name, url in signed.urls.items():
        with urllib.request.urlopen(url, timeout=30) as r:  # as the SDK does: no API key
            body = r.read()
        sizes[name] = len(body)
    assert load(urllib.request.urlopen(signed.urls["adapter_model.safetensors"]).read())
    assert sum(sizes.values()) == listed[0].size_bytes

    # A tampered or expired URL is refused; another file name does not share a signature.
    url = signed.urls["adapter_config.json"]
    for bad in (url.replace("signature=", "signature=0"), re.sub(r"expires=\d+", "expires=1", url),
                url.replace("adapter_config.json", "adapter_model.safetensors")):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bad, timeout=30)
        assert e.value.code == 403 and b"invalid or has expired" in e.value.read()

    # A sampler can be made from it, and it can be deleted like any checkpoint.
    sc = service_client.create_sampling_client(model_path=path)
    out = sc.sample(types.ModelInput.from_ints([1, 2, 3]), 1,
                    types.SamplingParams(max_tokens=3, temperature=0.0)).result()
    assert len(out.sequences[0].tokens) == 3
    with pytest.raises(tinker.BadRequestError, match="external checkpoint and holds no optimizer"):
        service_client.create_training_client_from_state_with_optimizer(path).result()
    rest_client.delete_checkpoint_from_tinker_path(path).result()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(signed.urls["adapter_config.json"], timeout=30)
    assert e.value.code == 404


def test_set_checkpoint_ttl(service_client: tinker.ServiceClient,
                            rest_client: tinker.RestClient, tokenizer) -> None:
    tc, _ = _trained(service_client, tokenizer, steps=1)
    path = tc.save_state("ttl").result().path

    def expires_at():
        (c,) = rest_client.list_checkpoints(tc.model_id).result().checkpoints
        return c.expires_at

    assert expires_at() is None
    rest_client.set_checkpoint_ttl_from_tinker_path(path, 7200).result()
    left = (expires_at() - datetime.now(UTC)).total_seconds()
    assert 7100 < left <= 7200
    rest_client.set_checkpoint_ttl_from_tinker_path(path, None).result()
    assert expires_at() is None
    with pytest.raises(tinker.BadRequestError):
        rest_client.set_checkpoint_ttl_from_tinker_path(path, -5).result()


def test_downloads_respect_api_keys(keyed_server: KeyedServer, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    alice = tinker.ServiceClient(base_url=keyed_server.url, api_key=keyed_server.key("a"))
    tc = alice.create_lora_training_client(base_model=TINY, rank=2)
    path = tc.save_state("mine").result().path
    ext = tc.save_weights_external("mine-ext").result().path
    ckpt = path.removeprefix(f"tinker://{tc.model_id}/")
    urls = (f"{keyed_server.url}/api/v1/training_runs/{tc.model_id}/checkpoints/{ckpt}"
            "/external_weights_urls")

    assert httpx.get(urls, headers=keyed_server.headers("a")).status_code == 200
    assert httpx.get(urls, headers=keyed_server.headers("admin")).status_code == 200
    other = httpx.get(urls, headers=keyed_server.headers("b"))
    assert other.status_code == 404 and "does not exist" in other.json()["detail"]
    assert httpx.get(urls).status_code == 401
    bob = tinker.RestClient(base_url=keyed_server.url, api_key=keyed_server.key("b"))
    with pytest.raises(tinker.NotFoundError):
        bob.get_external_weights_urls(ext).result()

    for who, code in (("a", 0), ("b", 1)):
        out = tmp_path / who
        assert tinsmith_cli(["checkpoints", "download", path, "--out", str(out), "--base-url",
                             keyed_server.url, "--api-key", keyed_server.key(who)]) == code
        assert (out / "adapter_model.safetensors").is_file() == (code == 0)
    assert f"checkpoint {path} does not exist" in capsys.readouterr().err


def test_sdk_cli_downloads_training_and_external_checkpoints(
    base_url: str, service_client: tinker.ServiceClient, tokenizer, tmp_path: Path
) -> None:
    """`tinker checkpoint download` (the SDK's CLI): a training checkpoint goes through a
    temporary save_weights_external of a run loaded from it, deleted afterwards."""
    tc, _ = _trained(service_client, tokenizer, steps=1)
    paths = [tc.save_state("for-cli").result().path,
             tc.save_weights_external("for-cli").result().path]
    env = {**os.environ, "TINKER_BASE_URL": base_url, "TINKER_API_KEY": "tml-test"}
    for path in paths:
        subprocess.run([sys.executable, "-m", "tinker.cli", "checkpoint", "download", path,
                        "--output", str(tmp_path)], env=env, check=True, capture_output=True,
                       timeout=300)
        folder = tmp_path / path.removeprefix("tinker://").replace("/", "_")
        assert {p.name for p in folder.iterdir()} == PEFT_FILES
    rest = tinker.RestClient(base_url=base_url, api_key="tml-test")
    temporary = [c for c in rest.list_user_checkpoints(limit=1000).result().checkpoints
                 if c.tinker_path.endswith("/external_weights/download")]
    assert temporary == []  # the CLI deleted its temporary export


def test_signed_urls_expire() -> None:
    from tinsmith.scheduler.signing import UrlSigner

    signer = UrlSigner(ttl_s=60)
    late = signer.sign("r", "weights/a", "f", int(time.time()) - 1)  # correctly signed, expired
    assert not signer.valid("r", "weights/a", "f", late.expires, late.signature)
    good = signer.sign("r", "weights/a", "f", signer.expiry())
    assert signer.valid("r", "weights/a", "f", good.expires, good.signature)
    assert not UrlSigner(ttl_s=60).valid("r", "weights/a", "f", good.expires, good.signature)


def test_signing_secret_is_made_once_and_kept_private(tmp_path: Path) -> None:
    from tinsmith.scheduler.signing import SECRET_FILE, UrlSigner, stored_secret

    signed = UrlSigner.stored(tmp_path, ttl_s=60).sign("r", "weights/a", "f", int(time.time()) + 60)
    assert stored_secret(tmp_path) == stored_secret(tmp_path)
    assert (tmp_path / SECRET_FILE).stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [SECRET_FILE]  # no temporary file left
    again = UrlSigner.stored(tmp_path, ttl_s=60)  # as after a restart
    assert again.valid("r", "weights/a", "f", signed.expires, signed.signature)
    (tmp_path / SECRET_FILE).write_bytes(b"short")
    with pytest.raises(ValueError, match="32-byte signing secret"):
        stored_secret(tmp_path)


def _stored_file(data_dir: Path, path: str, name: str) -> bytes:
    return CheckpointStore(str(data_dir / "checkpoints")).get(parse_path(path).storage_key)[name]


def test_downloads_stream_the_stored_file(
    service_client: tinker.ServiceClient, rest_client: tinker.RestClient, tokenizer,
    data_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A signed download is sent in chunks from the file on disk, never read whole."""
    from tinsmith.api.routes import downloads
    from tinsmith.scheduler.service import Service

    def whole(*_: object) -> bytes:
        raise AssertionError("a local checkpoint file was read whole")

    sent: list[int] = []

    def chunks(f):
        for chunk in real_chunks(f):
            sent.append(len(chunk))
            yield chunk

    real_chunks = downloads._chunks
    monkeypatch.setattr(Service, "read_checkpoint_file", whole)
    monkeypatch.setattr(downloads, "_chunks", chunks)
    monkeypatch.setattr(downloads, "CHUNK_BYTES", 4096)
    tc, _ = _trained(service_client, tokenizer, steps=1)
    path = tc.save_weights_external("streamed").result().path
    url = rest_client.get_external_weights_urls(path).result().urls["adapter_model.safetensors"]
    with httpx.stream("GET", url, timeout=30) as r:
        assert r.status_code == 200
        body = r.read()
    stored = _stored_file(data_dir, path, "adapter_model.safetensors")
    assert body == stored and int(r.headers["content-length"]) == len(stored)
    assert len(sent) > 1 and max(sent) == 4096 and sum(sent) == len(stored)


def test_signed_urls_survive_a_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    server = ServeProcess(tmp_path, ["--data-dir", str(data_dir), "--models", TINY])
    try:
        server.start()
        sc = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
        tc = sc.create_lora_training_client(base_model=TINY, rank=2)
        path = tc.save_weights_external("kept").result().path
        rest = tinker.RestClient(base_url=server.url, api_key=API_KEY)
        urls = rest.get_external_weights_urls(path).result().urls
        before = {name: httpx.get(url, timeout=30).content for name, url in urls.items()}
        server.stop()
        server.start()  # same port, same data dir
        for name, url in urls.items():
            r = httpx.get(url, timeout=30)
            assert r.status_code == 200, r.text
            assert r.content == before[name] == _stored_file(data_dir, path, name)
        bad = httpx.get(urls["adapter_config.json"].replace("signature=", "signature=0"))
        assert bad.status_code == 403
    finally:
        server.stop()


def test_merged_moe_model_equals_adapter_on_base(tmp_path: Path) -> None:
    """`--merged` on a Qwen3-MoE: every expert's update (W[e] += scale * B_e @ A_e, from
    PEFT's target_parameters layout) merged into the fused expert weights, attention and
    lm_head as Linears; the saved folder, loaded by plain transformers, gives the logprobs
    of the adapter on the base (synthetic/tiny-qwen3-moe, float32, within 1e-4)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinsmith.engine.backend import TrainWork
    from tinsmith.engine.export import write_merged_model
    from tinsmith.engine.local import local_backends
    from tinsmith.engine.losses import LossRegistry
    from tinsmith.engine.runner import ModelRunner
    from tinsmith.types import DatumIn, LoraSpec

    name = "synthetic/tiny-qwen3-moe"
    folder = resolve_model_dir(name)
    trainer, _ = local_backends(ModelRunner(folder, name), AutoTokenizer.from_pretrained(folder),
                                LossRegistry.load(()))
    trainer.create_run("moe", LoraSpec(rank=4, alpha=8, seed=1))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-zero B: the adapter changes the function
        for w in trainer._run("moe")[0].weights.values():
            w.B.copy_(torch.randn(w.B.shape, generator=gen) * 0.2)
    rng = np.random.default_rng(0)
    data = []
    for n in (11, 7):
        toks = rng.integers(0, 256, size=n + 1)
        data.append(DatumIn(toks[:-1], {"target_tokens": toks[1:], "weights": np.ones(n, np.float32)}))
    out = trainer.forward_backward_many([TrainWork("moe", data, "cross_entropy", {})],
                                        forward_only=True)[0]
    files = trainer.export_run("moe", name, include_optimizer=False)
    merged_dir = write_merged_model(files, folder, tmp_path / "merged")
    assert not (merged_dir / "synthetic.json").exists()  # a folder with weights now
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base = ModelRunner(folder, name).model
    for param in ("gate_up_proj", "down_proj"):  # the experts took their updates
        key = f"model.layers.1.mlp.experts.{param}"
        assert (merged.get_parameter(key) - base.get_parameter(key)).abs().amax(dim=(1, 2)).min() > 0
    for d, o in zip(data, out.outputs):
        ids = torch.as_tensor(d.tokens)[None]
        t = torch.as_tensor(d.inputs["target_tokens"])[:, None]
        with torch.no_grad():
            got = torch.log_softmax(merged(input_ids=ids).logits[0].float(), -1).gather(-1, t)[:, 0]
            before = torch.log_softmax(base(input_ids=ids).logits[0].float(), -1).gather(-1, t)[:, 0]
        np.testing.assert_allclose(got.numpy(), o["logprobs"], atol=1e-4, rtol=0)
        assert np.abs(o["logprobs"] - before.numpy()).max() > 1e-2, "the adapter changed nothing"
