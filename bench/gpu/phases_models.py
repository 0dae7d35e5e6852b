"""The GPU check's phases on other model kinds and engine paths:

- server-group  `tinsmith serve --sharded` (issue 15): the rank-group engine with one rank,
                B1's run and shape; the table divides its median step by server-small's B1
                (the single-process engine, same model, shape and steps)
- plain-moe     plain transformers + PEFT on the MoE model (issue 16): LoRA on the attention
                projections and, through PEFT's `target_parameters`, on the fused expert
                weights (`mlp.experts.gate_up_proj` / `down_proj`), as Tinsmith's MoE LoRA;
                when PEFT cannot (an error or out of memory) the same on attention only,
                which the record's `lora` field and the table say
- server-vl     `tinsmith serve` + the SDK on the VL model: datums of one image chunk and
                text, pipelined forward_backward + optim_step, median step time
- plain-vl      plain transformers + PEFT on the VL model (LoRA on the language model's
                linear layers), the same datums through the model's own image processor

The MoE server figure comes from phases.py's server-moe. Tokens/s counts every token of the
batch (a VL datum's image tokens included) over the median step time.
"""

from __future__ import annotations

import inspect
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from phases import (
    API_KEY,
    LR,
    Recorder,
    clients,
    finite,
    median,
    model_config,
    server,
    shape_fields,
    torch_dtype,
    train_steps,
)
from plan import Plan

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# The language model's linear layers of a Qwen3-VL (the vision tower's have other names).
VL_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def peak_bytes(plan: Plan) -> int:
    return int(torch.cuda.max_memory_allocated()) if plan.device.startswith("cuda") else 0


def phase_server_group(plan: Plan, rec: Recorder, workdir: Path) -> None:
    import tinker
    from step_overhead import make_batch, sdk_arm
    from tinker import types

    vocab = int(model_config(plan.small).vocab_size)
    with server(plan, plan.small, workdir, rec, extra=["--devices", "1", "--sharded"]) as url:
        sc = tinker.ServiceClient(base_url=url, api_key=API_KEY)
        (tc,) = clients(sc, plan.small, plan.rank, range(1))
        times, losses = sdk_arm(tc, make_batch(vocab, *plan.b1), types.AdamParams(learning_rate=LR),
                                plan.steps, plan.warmup, pipelined=True)
        rec.emit("server", tag="b1-group", model=plan.small, **shape_fields(plan.b1),
                 median_s=round(median(times), 5), losses=losses, finite=finite(losses))


# --- MoE --------------------------------------------------------------------------------------

def phase_plain_moe(plan: Plan, rec: Recorder, workdir: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = model_config(plan.moe)
    rec.say(f"building {plan.moe} ({plan.dtype}) on {plan.device}")
    torch.manual_seed(0)
    with torch.device(plan.device):
        base = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype(plan), attn_implementation="sdpa")
    b, t = plan.moe_shape
    ids = torch.randint(0, cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(0)).to(plan.device)
    inputs = {"input_ids": ids, "labels": ids}
    arms: list[tuple[str, dict[str, Any]]] = [
        ("attention + experts", {"target_modules": ATTENTION, "target_parameters": EXPERTS}),
        ("attention only", {"target_modules": ATTENTION}),
    ]
    why = ""
    for lora, targets in arms:
        try:
            model = get_peft_model(base, LoraConfig(r=plan.rank, lora_alpha=32, lora_dropout=0.0, **targets))
        except Exception as e:  # noqa: BLE001 - a PEFT (or model) that cannot target the experts
            why = f"PEFT: {type(e).__name__}: {e}"[:160]
            rec.say(f"{lora}: {why}")
            continue
        if "target_parameters" in targets and not any(
                "experts" in n and p.requires_grad for n, p in model.named_parameters()):
            why = "PEFT adapted no expert weight"  # it skips names it does not find, silently
            rec.say(f"{lora}: {why}")
            base = model.unload()
            continue
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        times, losses, oom = train_steps(plan, model, opt, inputs, plan.big_steps)
        rec.emit("plain", tag="moe" if not oom else "moe-oom", model=plan.moe, **shape_fields((b, t)),
                 lora=lora + (f"; {why}" if why else ""), oom=oom,
                 median_s=None if oom else round(median(times), 5), losses=losses, peak_bytes=peak_bytes(plan))
        if not oom:
            return
        why = "with the experts: out of memory"
        del opt
        base = model.unload()  # the base model again, without LoRA layers
        if plan.device.startswith("cuda"):
            torch.cuda.empty_cache()


# --- VL ---------------------------------------------------------------------------------------

def vl_folder(plan: Plan, workdir: Path) -> Path:
    """The VL model's prepared folder (config, tokenizer, image processor; no weights), as
    the server prepares it: what a client reads to count an image's tokens."""
    from tinsmith.models import synthetic

    out = workdir / "vl-folder"
    out.mkdir(parents=True, exist_ok=True)
    synthetic.write_folder(plan.vl.removeprefix(synthetic.PREFIX), out)
    return out


def png(w: int, h: int, seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def vl_batch(plan: Plan, folder: Path) -> list[tuple[list[int], bytes, int]]:
    """`vl_shape[0]` datums of exactly `vl_shape[1]` tokens: text, <|vision_start|>, one
    `vl_image` image (n placeholder tokens), <|vision_end|>, text. (token ids with the image
    positions set to the image token, the PNG, n) each."""
    from transformers import AutoImageProcessor

    from tinsmith.cookbook.renderers_vision import image_tokens

    cfg = model_config(plan.vl)
    w, h = plan.vl_image
    n = image_tokens(AutoImageProcessor.from_pretrained(folder), w, h)
    b, t = plan.vl_shape
    text = t - n - 2
    if text < 2:
        raise ValueError(f"a {w}x{h} image is {n} tokens: more than a {t}-token datum holds")
    out = []
    for k in range(b):
        rng = np.random.default_rng(k)
        words = rng.integers(0, 256, text).tolist()  # byte tokens
        ids = [*words[: text // 2], cfg.vision_start_token_id, *[cfg.image_token_id] * n,
               cfg.vision_end_token_id, *words[text // 2:]]
        out.append((ids, png(w, h, k), n))
    return out


def phase_server_vl(plan: Plan, rec: Recorder, workdir: Path) -> None:
    import tinker
    from step_overhead import sdk_arm
    from tinker import types

    cfg = model_config(plan.vl)
    data = []
    for ids, image, n in vl_batch(plan, vl_folder(plan, workdir)):
        start, end = ids.index(cfg.vision_start_token_id), ids.index(cfg.vision_end_token_id)
        chunk = types.ImageChunk.model_construct(data=image, format="png", expected_tokens=n, type="image")
        mi = types.ModelInput(chunks=[types.EncodedTextChunk(tokens=ids[: start + 1]), chunk,
                                      types.EncodedTextChunk(tokens=ids[end:])])
        targets = np.random.default_rng(len(data)).integers(0, 256, mi.length).tolist()
        data.append(types.Datum(model_input=mi, loss_fn_inputs={
            "target_tokens": targets, "weights": [1.0 / mi.length] * mi.length}))
    with server(plan, plan.vl, workdir, rec) as url:
        sc = tinker.ServiceClient(base_url=url, api_key=API_KEY)
        (tc,) = clients(sc, plan.vl, plan.rank, range(1))
        times, losses = sdk_arm(tc, data, types.AdamParams(learning_rate=LR), plan.big_steps, plan.warmup,
                                pipelined=True)
        rec.emit("server", tag="vl", model=plan.vl, **shape_fields(plan.vl_shape), image=list(plan.vl_image),
                 median_s=round(median(times), 5), losses=losses, finite=finite(losses))


def phase_plain_vl(plan: Plan, rec: Recorder, workdir: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    folder = vl_folder(plan, workdir)
    batch = vl_batch(plan, folder)
    cfg = model_config(plan.vl)
    rec.say(f"building {plan.vl} ({plan.dtype}) on {plan.device}")
    torch.manual_seed(0)
    with torch.device(plan.device):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=torch_dtype(plan), attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=plan.rank, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=VL_TARGETS))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    # What the processor gives a model: pixel patches and grids of every image, in datum order.
    enc = AutoImageProcessor.from_pretrained(folder)(
        images=[Image.open(io.BytesIO(image)).convert("RGB") for _, image, _ in batch], return_tensors="pt")
    ids = torch.tensor([row for row, _, _ in batch], device=plan.device)
    inputs: dict[str, Any] = {"input_ids": ids, "labels": ids,
                              "pixel_values": enc["pixel_values"].to(plan.device, torch_dtype(plan)),
                              "image_grid_thw": enc["image_grid_thw"].to(plan.device)}
    if "mm_token_type_ids" in inspect.signature(model.get_base_model().forward).parameters:
        inputs["mm_token_type_ids"] = (ids == cfg.image_token_id).int()  # newer transformers: M-RoPE needs it
    times, losses, oom = train_steps(plan, model, opt, inputs, plan.big_steps)
    rec.emit("plain", tag="vl", model=plan.vl, **shape_fields(plan.vl_shape), image=list(plan.vl_image),
             oom=oom, median_s=None if oom else round(median(times), 5), losses=losses,
             peak_bytes=peak_bytes(plan))


PHASE_FUNCS = {
    "server-group": phase_server_group,
    "plain-moe": phase_plain_moe,
    "server-vl": phase_server_vl,
    "plain-vl": phase_plain_vl,
}
