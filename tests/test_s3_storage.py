"""Checkpoints in S3 object storage: `tinsmith serve --storage-url s3://bucket/prefix` against
a real S3-compatible server (moto's, on loopback), driven through the SDK.

The server finds the endpoint the standard AWS way (AWS_ENDPOINT_URL and the usual
credential variables), as an operator would point it at MinIO, Ceph or R2. What lands in
the bucket is checked with boto3, which bypasses Tinsmith and s3fs's caches.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pytest
import tinker
from conftest import API_KEY, SENTENCES, TINY, ServeProcess, logprobs_of, text_datum
from moto.server import ThreadedMotoServer
from tinker import types

from tinsmith.storage.files import MANIFEST, VERSION_PREFIX, CheckpointStore

BUCKET = "tinsmith-test"
SLOW_WRITE_S = 0.3


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    """A moto S3 server on loopback with one bucket; yields the AWS_* variables that point
    at it (also set in this process for the duration of the module)."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _objects(prefix: str) -> dict[str, int]:
    """{key: size} of the bucket's objects under `prefix`, listed by boto3."""
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET,
                                                                         Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def test_checkpoint_store_on_s3(s3_env: dict[str, str]) -> None:
    store = CheckpointStore(f"s3://{BUCKET}/unit")
    key = "s:train:0/weights/a"
    assert store.put(key, {"x.bin": b"12345", "y.json": b"{}"}) == 7
    objects = _objects("unit/")
    (version,) = {k.split("/")[-2] for k in objects if not k.endswith(MANIFEST)}
    assert version.startswith(VERSION_PREFIX)
    v = f"unit/{key}/{version}"
    assert set(objects) == {f"{v}/x.bin", f"{v}/y.json", f"unit/{key}/{MANIFEST}"}
    assert objects[f"{v}/x.bin"] == 5 and objects[f"{v}/y.json"] == 2
    assert store.exists(key) and store.get(key) == {"x.bin": b"12345", "y.json": b"{}"}
    assert store.size(key) == 7 and store.read(key, "x.bin") == b"12345"
    with pytest.raises(FileNotFoundError):
        store.read(key, MANIFEST)

    store.put(key, {"z.bin": b"new"})  # overwrite: only the new files are the checkpoint
    assert store.get(key) == {"z.bin": b"new"}
    objects = _objects(f"unit/{key}/")
    assert len(objects) == 2 and f"unit/{key}/{MANIFEST}" in objects  # the old version is gone
    assert not any(version in k for k in objects)

    # Files without a manifest (a writer that died before its last object) are no checkpoint.
    half = "s:train:0/weights/half"
    boto3.client("s3").put_object(Bucket=BUCKET, Key=f"unit/{half}/x.bin", Body=b"1")
    fresh = CheckpointStore(f"s3://{BUCKET}/unit")
    fresh.fs.invalidate_cache()
    assert not fresh.exists(half)
    with pytest.raises(FileNotFoundError):
        fresh.get(half)

    store.delete(key)
    assert _objects(f"unit/{key}/") == {} and not store.exists(key)


class S3Server(ServeProcess):
    """`tinsmith serve --storage-url s3://...` in a subprocess (restartable, killable)."""

    def __init__(self, tmp: Path, env: dict[str, str], prefix: str) -> None:
        super().__init__(tmp, ["--models", TINY, "--data-dir", str(tmp / "data"),
                               "--storage-url", f"s3://{BUCKET}/{prefix}"], env)
        self.tmp, self.prefix = tmp, prefix


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory,
              s3_env: dict[str, str]) -> Iterator[S3Server]:
    """One server for the module. Each checkpoint file it writes is followed by a short pause
    (a testing setting), so a test can kill it between two objects of one save."""
    server = S3Server(tmp_path_factory.mktemp("s3-serve"), s3_env, prefix="srv")
    server.start(TINSMITH_DEBUG_SLOW_WRITES_S=str(SLOW_WRITE_S))
    yield server
    server.stop()


def test_serve_with_checkpoints_in_s3(s3_server: S3Server) -> None:
    sc = tinker.ServiceClient(base_url=s3_server.url, api_key=API_KEY)
    rest = tinker.RestClient(base_url=s3_server.url, api_key=API_KEY)
    tc = sc.create_lora_training_client(base_model=TINY, rank=4)
    tokenizer = tc.get_tokenizer()
    data = [text_datum(tokenizer, s) for s in SENTENCES]
    for _ in range(2):
        tc.forward_backward(data, "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    state = tc.save_state("s3-state").result().path
    sampler = tc.save_weights_for_sampler("s3-sampler").result().path
    want = logprobs_of(tc.forward(data, "cross_entropy").result())

    prefix = f"{s3_server.prefix}/{tc.model_id}/"
    objects = _objects(prefix)
    for kind, name, files in (("weights", "s3-state", {"optimizer.safetensors"}),
                              ("sampler_weights", "s3-sampler", set())):
        folder = f"{prefix}{kind}/{name}/"
        # The manifest beside the files of the version it publishes (`v-<write id>/`).
        names = {k.removeprefix(folder).split("/")[-1] for k in objects if k.startswith(folder)}
        assert names == {MANIFEST, "adapter_config.json", "adapter_model.safetensors",
                         "tinsmith.json"} | files
    assert not (s3_server.tmp / "data" / "checkpoints").exists()  # nothing on local disk

    listed = {c.tinker_path: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert set(listed) == {state, sampler}
    assert listed[state].size_bytes == sum(
        size for key, size in objects.items()
        if key.startswith(f"{prefix}weights/s3-state/") and not key.endswith(MANIFEST))

    # Loaded back from the bucket: the same model, optimizer state included.
    resumed = sc.create_training_client_from_state_with_optimizer(state)
    for got, exp in zip(logprobs_of(resumed.forward(data, "cross_entropy").result()), want):
        np.testing.assert_allclose(got, exp, atol=1e-5)
    sampling = sc.create_sampling_client(model_path=sampler)
    out = sampling.sample(types.ModelInput.from_ints(data[0].model_input.to_ints()), 1,
                          types.SamplingParams(max_tokens=4, temperature=0.0)).result()
    assert len(out.sequences[0].tokens) == 4

    # External weights from the bucket, through the signed URLs.
    ext = tc.save_weights_external("s3-ext").result().path
    urls = rest.get_external_weights_urls(ext).result().urls
    config = urllib.request.urlopen(urls["adapter_config.json"], timeout=30).read()
    (stored,) = [k for k in _objects(f"{prefix}external_weights/s3-ext/")
                 if k.endswith("/adapter_config.json")]
    assert config == boto3.client("s3").get_object(Bucket=BUCKET, Key=stored)["Body"].read()

    rest.delete_checkpoint_from_tinker_path(state).result()
    assert not any(k.startswith(f"{prefix}weights/s3-state/") for k in _objects(prefix))
    left = rest.list_checkpoints(tc.model_id).result().checkpoints
    assert state not in {c.tinker_path for c in left}


def test_checkpoint_killed_mid_write_to_s3_is_never_listed(s3_server: S3Server) -> None:
    """SIGKILL while the files of a save go up one by one: after a restart the objects that
    made it are there, without a manifest, and the checkpoint is neither listed nor loadable."""
    sc = tinker.ServiceClient(base_url=s3_server.url, api_key=API_KEY)
    tc = sc.create_lora_training_client(base_model=TINY, rank=2)
    path = f"tinker://{tc.model_id}/weights/halfway"
    folder = f"{s3_server.prefix}/{tc.model_id}/weights/halfway/"
    threading.Thread(target=lambda: tc.save_state("halfway"), daemon=True).start()
    deadline = time.monotonic() + 60
    while not _objects(folder):
        assert time.monotonic() < deadline, "no object was written:\n" + s3_server.log()
        time.sleep(0.05)
    s3_server.stop(signal.SIGKILL)
    written = _objects(folder)
    assert written and f"{folder}{MANIFEST}" not in written

    s3_server.start(TINSMITH_DEBUG_SLOW_WRITES_S=str(SLOW_WRITE_S))
    sc = tinker.ServiceClient(base_url=s3_server.url, api_key=API_KEY)
    rest = tinker.RestClient(base_url=s3_server.url, api_key=API_KEY)
    assert path not in {c.tinker_path for c in rest.list_user_checkpoints().result().checkpoints}
    with pytest.raises(tinker.NotFoundError):
        sc.create_training_client_from_state(path).result()


_OVERWRITE = """
import sys
from tinsmith.storage.files import CheckpointStore
store = CheckpointStore(sys.argv[1], slow_write_s=float(sys.argv[2]))
store.put("r:train:0/weights/kept", {"a.bin": b"NEW" * 1000, "b.bin": b"new", "c.bin": b"n"})
"""


def test_overwrite_killed_midway_keeps_the_old_checkpoint(s3_env: dict[str, str]) -> None:
    """SIGKILL of a process overwriting a checkpoint in S3, between its objects: the old
    checkpoint still loads, whole, and the next write cleans up what the dead one left."""
    url, key = f"s3://{BUCKET}/overwrite", "r:train:0/weights/kept"
    old = {"a.bin": b"OLD" * 500, "b.bin": b"old"}
    CheckpointStore(url).put(key, old)
    proc = subprocess.Popen([sys.executable, "-c", _OVERWRITE, url, "2"], env={**os.environ, **s3_env})
    deadline = time.monotonic() + 60
    while len(_objects(f"overwrite/{key}/")) < 4:  # old manifest + 2 old files + a new one
        assert time.monotonic() < deadline and proc.poll() is None, "the writer made no object"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    store = CheckpointStore(url)
    store.fs.invalidate_cache()
    assert store.get(key) == old and store.size(key) == len(b"OLD" * 500) + 3
    store.put(key, {"x.bin": b"x"})
    assert store.get(key) == {"x.bin": b"x"} and len(_objects(f"overwrite/{key}/")) == 2
