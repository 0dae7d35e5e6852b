"""Vision-language models on `synthetic/tiny-qwen3-vl` and `synthetic/tiny-qwen2.5-vl` (the
`folder` fixture runs a test on both; tests marked `qwen3_only` on Qwen3-VL): image chunks in
forward, forward_backward and sampling prompts, held to plain transformers + PEFT.

- forward logprobs with images equal PEFT's on the saved checkpoint (1e-4, float32), and the
  checkpoint loads back as a run with the same logprobs;
- packed passes (a run with images beside a text-only run) equal solo passes bitwise (exact
  packing; each image is encoded on its own, without autograd);
- greedy sampling from an image prompt equals a plain PEFT greedy loop (which recomputes the
  whole sequence with the images every step, so it needs no RoPE state);
- through the official SDK: SFT with images lowers the loss, and each bad image (corrupt,
  unknown format, wrong expected_tokens, too many pixels, an asset pointer) is a 400 after
  which the same client's next request gives what it gave before.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tinsmith.engine.adapter import Adapter
from tinsmith.engine.backend import TrainWork
from tinsmith.engine.local import local_backends
from tinsmith.engine.losses import LossRegistry
from tinsmith.engine.runner import ModelRunner
from tinsmith.engine.sampler import Sampler
from tinsmith.models import synthetic
from tinsmith.types import IMAGE_SLOT, DatumIn, ImageIn, LoraSpec, SampleSpec

NAME = "synthetic/tiny-qwen3-vl"
KEY = "tiny-qwen3-vl"
KEYS = [KEY, "tiny-qwen2.5-vl"]  # one tiny model per VL family
qwen3_only = pytest.mark.parametrize("folder", [KEY], indirect=True)
PEFT_ATOL = 1e-4
IMAGE_TOKEN = 261  # <|image_pad|> of the tiny model's tokenizer
VISION_START, VISION_END = 259, 260


def png(w: int, h: int, seed: int, fmt: str = "PNG") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def image_tokens(folder: Path, w: int, h: int) -> int:
    """What a client computes for expected_tokens: the model's image processor's patches / merge^2."""
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(folder)
    return proc.get_number_of_image_patches(h, w, {}) // proc.merge_size**2


@pytest.fixture(scope="module", params=KEYS)
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The prepared folder of one tiny VL model, named as its key (see `name_of`)."""
    out = tmp_path_factory.mktemp("vl") / request.param
    out.mkdir()
    synthetic.write_folder(request.param, out)
    return out


def name_of(folder: Path) -> str:
    """The catalog name of the model in `folder`."""
    return synthetic.PREFIX + folder.name


def datum(folder: Path, seed: int, sizes: list[tuple[int, int]], n_text: int = 6) -> DatumIn:
    """Text, then each image wrapped in <|vision_start|> ... <|vision_end|>, then text; targets
    are random ids over the whole model input (image positions included)."""
    rng = np.random.default_rng(seed)
    toks: list[int] = list(rng.integers(0, 256, n_text))
    images = []
    for k, (w, h) in enumerate(sizes):
        n = image_tokens(folder, w, h)
        toks.append(VISION_START)
        images.append(ImageIn(png(w, h, seed * 10 + k), "png", len(toks), n, n))
        toks += [IMAGE_SLOT] * n + [VISION_END]
    toks += list(rng.integers(0, 256, n_text))
    targets = rng.integers(0, 256, len(toks))
    return DatumIn(np.asarray(toks, np.int64), {"target_tokens": targets,
                                                "weights": np.ones(len(toks), np.float32)},
                   images=tuple(images))


def hf_base(folder: Path) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForImageTextToText

    torch.manual_seed(synthetic.synthetic_seed(folder))
    return AutoModelForImageTextToText.from_config(
        AutoConfig.from_pretrained(folder), dtype=torch.float32, attn_implementation="sdpa").eval()


def hf_inputs(folder: Path, ids: torch.Tensor, d_images: tuple[ImageIn, ...]) -> dict[str, torch.Tensor]:
    """What the HF processor would give the model: pixel values, grids and token types."""
    from PIL import Image
    from transformers import AutoImageProcessor

    out: dict[str, torch.Tensor] = {"input_ids": ids, "mm_token_type_ids": (ids == IMAGE_TOKEN).int()}
    if d_images:
        proc = AutoImageProcessor.from_pretrained(folder)
        pics = [Image.open(io.BytesIO(im.data)).convert("RGB") for im in d_images]
        enc = proc(images=pics, return_tensors="pt")
        out.update(pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"])
    return out


def hf_logprobs(model: torch.nn.Module, folder: Path, d: DatumIn) -> np.ndarray:
    ids = np.where(d.tokens == IMAGE_SLOT, IMAGE_TOKEN, d.tokens)
    with torch.no_grad():
        logits = model(**hf_inputs(folder, torch.as_tensor(ids)[None], d.images)).logits[0]
    t = torch.as_tensor(d.inputs["target_tokens"])
    return torch.log_softmax(logits.float(), -1).gather(-1, t[:, None])[:, 0].numpy()


def perturb(adapter: Adapter, seed: int, std: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in adapter.weights.values():
            w.B.copy_(torch.randn(w.B.shape, generator=gen) * std)


@pytest.fixture(scope="module")
def trained(folder: Path):
    from transformers import AutoTokenizer

    runner = ModelRunner(folder, name_of(folder))
    trainer, _ = local_backends(runner, AutoTokenizer.from_pretrained(folder), LossRegistry.load(()))
    trainer.create_run("r", LoraSpec(rank=4, alpha=8, seed=1))
    perturb(trainer._run("r")[0], seed=5)
    return runner, trainer


def _forward(trainer, run_id: str, data: list[DatumIn]):
    out = trainer.forward_backward_many([TrainWork(run_id, data, "cross_entropy", {})], forward_only=True)[0]
    assert not isinstance(out, Exception), out
    return out


@pytest.fixture(scope="module")
def peft_model(trained, folder: Path, tmp_path_factory: pytest.TempPathFactory):
    import peft

    _, trainer = trained
    out = tmp_path_factory.mktemp("vl-ckpt")
    files = trainer.export_run("r", name_of(folder), include_optimizer=True)
    for name, blob in files.items():
        (out / name).write_bytes(blob)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(hf_base(folder), str(out)).eval(), files


def test_lora_targets_the_language_model_only(trained) -> None:
    runner, _ = trained
    assert all(p.startswith("model.language_model.layers.") or p == "lm_head" for p in runner.layers)
    assert len(runner.layers) == 2 * 7 + 1
    assert runner.vision is not None and runner.vision.image_token_id == IMAGE_TOKEN


def test_forward_with_images_equals_peft_and_checkpoint_round_trips(trained, peft_model, folder: Path) -> None:
    _, trainer = trained
    pm, files = peft_model
    data = [datum(folder, 1, [(64, 48)]), datum(folder, 2, [(96, 64), (40, 40)]), datum(folder, 3, [])]
    ours = _forward(trainer, "r", data)
    base = hf_base(folder)
    for d, o in zip(data, ours.outputs):
        assert o["logprobs"].shape == d.inputs["target_tokens"].shape
        np.testing.assert_allclose(o["logprobs"], hf_logprobs(pm, folder, d), atol=PEFT_ATOL, rtol=0)
        assert np.abs(o["logprobs"] - hf_logprobs(base, folder, d)).max() > 1e-2, "adapter changed nothing"
    # The image matters: another picture of the same size gives other logprobs.
    other = datum(folder, 1, [(64, 48)])
    other = DatumIn(other.tokens, other.inputs, images=(ImageIn(png(64, 48, 99), "png", other.images[0].at,
                                                                 other.images[0].length),))
    assert np.abs(_forward(trainer, "r", [other]).outputs[0]["logprobs"] - ours.outputs[0]["logprobs"]).max() > 1e-4
    trainer.load_run("copy", files, with_optimizer=True)
    again = _forward(trainer, "copy", data)
    for a, b in zip(again.outputs, ours.outputs):
        np.testing.assert_array_equal(a["logprobs"], b["logprobs"])


def _grads(trainer, run_id: str) -> list[torch.Tensor]:
    adapter = trainer._run(run_id)[0]
    out = [p.grad.clone() for p in adapter.parameters() if p.grad is not None]
    adapter.zero_grad()
    return out


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "shared"])
def test_packed_runs_with_images_equal_solo_runs(folder: Path, exact: bool) -> None:
    """A run with images and a text-only run in one pass, against each alone: exact packing
    gives bitwise the same loss and gradients; shared base GEMMs (the GPU default) the loss
    within 1e-5 relative and each gradient within 2e-4 of its norm."""
    from transformers import AutoTokenizer

    runner = ModelRunner(folder, name_of(folder), exact_packing=exact)
    trainer, _ = local_backends(runner, AutoTokenizer.from_pretrained(folder), LossRegistry.load(()))
    trainer.create_run("a", LoraSpec(rank=4, seed=1))
    trainer.create_run("b", LoraSpec(rank=2, seed=2))
    perturb(trainer._run("a")[0], 1)
    perturb(trainer._run("b")[0], 2)
    works = [TrainWork("a", [datum(folder, 30, [(64, 64)]), datum(folder, 31, [(48, 96)], 3)], "cross_entropy", {}),
             TrainWork("b", [datum(folder, 32, [], 9)], "cross_entropy", {})]
    packed = trainer.forward_backward_many(works, forward_only=False)
    packed_grads = {w.run_id: _grads(trainer, w.run_id) for w in works}
    for w, p in zip(works, packed):
        solo = trainer.forward_backward_many([w], forward_only=False)[0]
        assert p.metrics["loss:sum"] == pytest.approx(solo.metrics["loss:sum"], rel=0 if exact else 1e-5)
        solo_grads = _grads(trainer, w.run_id)
        assert solo_grads and all(s.abs().max() > 0 for s in solo_grads)
        for g, s in zip(packed_grads[w.run_id], solo_grads, strict=True):
            if exact:
                torch.testing.assert_close(g, s, atol=0, rtol=0)
            else:
                assert float((g - s).norm() / s.norm()) < 2e-4


def test_greedy_sampling_with_an_image_equals_transformers(trained, peft_model, folder: Path) -> None:
    """Prefill with the image, decode text-only at the image-shifted RoPE positions: the
    same tokens as PEFT recomputing the whole sequence (with the image) at every step. Two
    requests decode together (one with an image, one without), on both KV cache layouts."""
    from transformers import AutoTokenizer

    runner, trainer = trained
    pm, _ = peft_model
    slot = runner.attach(trainer.snapshot("r"))
    d = datum(folder, 7, [(96, 64)])  # 6 image tokens over 3 RoPE positions: delta -3
    text = datum(folder, 8, [])
    steps = 8
    specs = [SampleSpec(prompt=x.tokens, max_tokens=steps, temperature=0.0, stop_tokens=(), images=x.images)
             for x in (d, text)]
    # The image prompt again, sent without expected_tokens (no placeholder positions): the
    # server counts the image itself.
    im = d.images[0]
    bare = SampleSpec(prompt=np.delete(d.tokens, range(im.at, im.at + im.length)), max_tokens=steps,
                      temperature=0.0, stop_tokens=(), images=(ImageIn(im.data, "png", im.at, 0),))
    want = []
    for x in (d, text):
        seq = torch.as_tensor(np.where(x.tokens == IMAGE_SLOT, IMAGE_TOKEN, x.tokens))[None]
        with torch.no_grad():
            for _ in range(steps):
                logits = pm(**hf_inputs(folder, seq, x.images)).logits[0, -1]
                seq = torch.cat([seq, logits.argmax()[None, None]], dim=1)
        want.append(seq[0, -steps:].tolist())
    tok = AutoTokenizer.from_pretrained(folder)
    try:
        for kv in ("slab", "dynamic"):
            sampler = Sampler(runner, tok, kv_cache=kv)
            outs: list = []
            for spec in [*specs, bare]:
                sampler.admit(slot, spec, outs.append)
            while sampler.pending:
                sampler.step()
            got = [o.sequences[0].tokens.tolist() for o in outs]
            assert got == [*want, want[0]], (kv, got, want)
    finally:
        runner.detach(slot)


# ----- through the official SDK ------------------------------------------------------------
MAX_PIXELS = 160 * 160


@pytest.fixture(scope="module")
def vl_url(folder: Path, tmp_path_factory: pytest.TempPathFactory):
    import tinsmith

    with tinsmith.local(models=[name_of(folder)], data_dir=tmp_path_factory.mktemp("vl-server"),
                        max_image_pixels=MAX_PIXELS, seq_gap_timeout_s=600) as url:
        yield url


def sdk_datum(folder: Path, seed: int, w: int, h: int, *, fmt: str = "png", data: bytes | None = None,
              expected: int | None = None):
    """An SDK Datum: text, an image chunk (expected_tokens from the image processor), text."""
    from tinker import types

    rng = np.random.default_rng(seed)
    n = image_tokens(folder, w, h) if expected is None else expected
    image = types.ImageChunk.model_construct(data=data if data is not None else png(w, h, seed),
                                             format=fmt, expected_tokens=n, type="image")
    mi = types.ModelInput(chunks=[types.EncodedTextChunk(tokens=[*rng.integers(0, 256, 4).tolist(), VISION_START]),
                                  image, types.EncodedTextChunk(tokens=[VISION_END, 10, 11, 12])])
    targets = rng.integers(0, 256, mi.length).tolist()
    return types.Datum(model_input=mi, loss_fn_inputs={"target_tokens": targets, "weights": [1.0] * mi.length})


def test_sft_with_images_through_sdk_lowers_loss_and_samples(vl_url: str, folder: Path) -> None:
    import tinker
    from tinker import types

    tc = tinker.ServiceClient(base_url=vl_url, api_key="tml-test").create_lora_training_client(
        base_model=name_of(folder), rank=8)
    data = [sdk_datum(folder, 1, 64, 48), sdk_datum(folder, 2, 96, 96, fmt="jpeg", data=png(96, 96, 2, "JPEG"))]
    losses = []
    for _ in range(4):
        fb = tc.forward_backward(data, "cross_entropy").result()
        assert [len(o["logprobs"].data) for o in fb.loss_fn_outputs] == [d.model_input.length for d in data]
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        losses.append(fb.metrics["loss:sum"])
    assert losses[-1] < losses[0] * 0.9, losses
    sampler = tc.save_weights_and_get_sampling_client(name="vl")
    prompt = data[0].model_input
    res = sampler.sample(prompt, num_samples=2, sampling_params=types.SamplingParams(max_tokens=5, temperature=0.0),
                         include_prompt_logprobs=True).result()
    assert [len(s.tokens) for s in res.sequences] == [5, 5] and res.sequences[0].tokens == res.sequences[1].tokens
    assert len(res.prompt_logprobs) == prompt.length


def _corrupt(folder: Path, seed: int):
    return sdk_datum(folder, seed, 64, 48, data=png(64, 48, seed)[:60], expected=image_tokens(folder, 64, 48))


BAD_IMAGES = {
    "truncated png": (lambda f: _corrupt(f, 3), "the PNG image data is corrupt"),
    "not an image": (lambda f: sdk_datum(f, 8, 64, 48, data=b"hello, world"), "not a readable PNG"),
    "jpeg declared as png": (lambda f: sdk_datum(f, 4, 64, 48, data=png(64, 48, 4, "JPEG")), "not a readable PNG"),
    "unknown format": (lambda f: sdk_datum(f, 5, 64, 48, fmt="gif"), "unknown image format 'gif'"),
    "wrong expected_tokens": (lambda f: sdk_datum(f, 6, 64, 48, expected=7),
                              "becomes 4 tokens for this model, but the chunk's expected_tokens is 7"),
    "too many pixels": (lambda f: sdk_datum(f, 7, 200, 200), "the limit is 25600 (max_image_pixels)"),
}


@qwen3_only
@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image_is_a_400_and_the_client_goes_on(case: str, vl_url: str, folder: Path) -> None:
    import tinker

    tc = tinker.ServiceClient(base_url=vl_url, api_key="tml-test").create_lora_training_client(
        base_model=name_of(folder), rank=4, seed=3)
    good = [sdk_datum(folder, 11, 64, 64)]
    before = tc.forward(good, "cross_entropy").result(timeout=60)
    make, message = BAD_IMAGES[case]
    with pytest.raises(tinker.APIStatusError) as err:
        tc.forward_backward([make(folder)], "cross_entropy").result(timeout=60)
    assert err.value.status_code == 400 and message in str(err.value), err.value
    after = tc.forward(good, "cross_entropy").result(timeout=60)  # the next seq_id is answered
    np.testing.assert_array_equal(after.loss_fn_outputs[0]["logprobs"].to_numpy(),
                                  before.loss_fn_outputs[0]["logprobs"].to_numpy())


@qwen3_only
def test_bad_sampling_prompts_are_400s(vl_url: str, folder: Path) -> None:
    import tinker
    from tinker import types

    sc = tinker.ServiceClient(base_url=vl_url, api_key="tml-test")
    sampler = sc.create_sampling_client(base_model=name_of(folder))
    params = types.SamplingParams(max_tokens=2, temperature=0.0)
    pointer = types.ModelInput(chunks=[types.EncodedTextChunk(tokens=[1, 2]), types.ImageAssetPointerChunk(
        format="png", location="file:///etc/hosts", expected_tokens=4)])
    for prompt, message in ((pointer, "image_asset_pointer chunks are not supported"),
                            (_corrupt(folder, 9).model_input, "the PNG image data is corrupt")):
        with pytest.raises(tinker.APIStatusError) as err:
            sampler.sample(prompt, 1, params).result(timeout=60)
        assert err.value.status_code == 400 and message in str(err.value), err.value
    ok = sampler.sample(sdk_datum(folder, 12, 64, 64).model_input, 1, params).result(timeout=60)
    assert len(ok.sequences[0].tokens) == 2


# ----- cookbook: image parts in messages, and the vlm_sl recipe ---------------------------
@qwen3_only
def test_vision_renderer_lays_images_out_as_the_chat_template_does(folder: Path) -> None:
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer

    from tinsmith.cookbook.renderers_vision import VisionRenderer, to_datum

    tok = AutoTokenizer.from_pretrained(folder)
    renderer = VisionRenderer(tok, AutoImageProcessor.from_pretrained(folder))
    image = Image.open(io.BytesIO(png(96, 64, 3)))
    chat = [{"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image", "image": image},
                                         {"type": "text", "text": " ok?"}]},
            {"role": "assistant", "content": "yes"}]
    mi, weights = renderer.build_supervised_example(chat)
    kinds = [c.type for c in mi.chunks]
    assert kinds == ["encoded_text", "image", "encoded_text"]
    n = image_tokens(folder, 96, 64)
    assert mi.chunks[1].expected_tokens == n == 6 and mi.length == len(weights)
    # The text around the image is exactly the chat template's, with n image tokens in place.
    text = tok.apply_chat_template([{"role": "user", "content": "Look: <|vision_start|><|image_pad|><|vision_end|> ok?"},
                                    {"role": "assistant", "content": "yes"}], tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    assert mi.chunks[0].tokens[-1] == VISION_START and mi.chunks[2].tokens[0] == VISION_END
    assert list(mi.chunks[0].tokens) + [IMAGE_TOKEN] + list(mi.chunks[2].tokens) == ids
    trained = [w for w in weights if w > 0]
    assert len(trained) == len(tok.encode("yes")) + 1  # the answer and its end-of-turn
    d = to_datum(mi, weights)
    assert d.model_input.length == mi.length - 1 == len(d.loss_fn_inputs["target_tokens"].data)


def test_vlm_sl_recipe_runs_two_steps(tmp_path: Path) -> None:  # Qwen3-VL (its default)
    import json

    from tinsmith.recipes import vlm_sl

    log = tmp_path / "vlm"
    out = vlm_sl.main([f"model_name={NAME}", f"log_path={log}", "max_steps=2", "batch_size=4",
                       "num_images=12", "eval_fraction=0.25", "lora_rank=4", "save_every=2"])
    rows = [json.loads(line) for line in (log / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert all(np.isfinite(r["nll"]) for r in rows) and rows[1]["nll"] < rows[0]["nll"]
    assert 0.0 <= rows[1]["eval/accuracy"] <= 1.0 and np.isfinite(rows[1]["eval/nll"])
    assert out["checkpoint"] is not None and out["steps_done"] == 2


@qwen3_only
def test_engine_checks_refuse_images_a_model_cannot_take(trained, folder: Path) -> None:
    """Without the SDK: an image to a text-only model (training and sampling), an image over
    max_image_bytes, and a text token holding the image placeholder id are UserErrors."""
    from tinsmith.engine.losses import LossRegistry
    from tinsmith.engine.validation import check_data, check_sample
    from tinsmith.engine.vision import Vision
    from tinsmith.types import UserError

    runner, _ = trained
    d = datum(folder, 40, [(64, 64)])
    spec = SampleSpec(prompt=d.tokens, images=d.images)
    ce = LossRegistry.load(()).get("cross_entropy")
    with pytest.raises(UserError, match="image inputs are not supported by this model: it is text-only"):
        check_data([d], "cross_entropy", ce, {}, 512, 4096, None)
    with pytest.raises(UserError, match="image inputs are not supported by this model: it is text-only"):
        check_sample(spec, 512, 4096, None)
    check_data([d], "cross_entropy", ce, {}, 512, 4096, runner.vision)  # the VL model takes it
    small = Vision(folder, runner.config).set_limits(max_bytes=100, max_pixels=1 << 20)
    with pytest.raises(UserError, match=r"bytes; the limit is 100 \(max_image_bytes\)"):
        check_sample(spec, 512, 4096, small)
    sneaky = SampleSpec(prompt=np.asarray([1, IMAGE_TOKEN, 2]))
    with pytest.raises(UserError, match="is this model's image placeholder"):
        check_sample(sneaky, 512, 4096, runner.vision)
