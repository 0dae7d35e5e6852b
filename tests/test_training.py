"""Training through the official SDK against a real server: loss semantics, gradient
accumulation, pipelining, LoRA config, and the optimizer checked against PEFT + torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SENTENCES, TINY, logprobs_of, text_datum
from safetensors.torch import load_file
from tinker import types


def _batch(tokenizer, weight: float = 1.0) -> list[types.Datum]:
    return [text_datum(tokenizer, s, weight) for s in SENTENCES]


def test_sft_loss_falls(service_client, tokenizer) -> None:
    tc = service_client.create_lora_training_client(base_model=TINY, rank=8, seed=0).result()
    batch = _batch(tokenizer)
    losses = []
    for _ in range(8):
        fb = tc.forward_backward(batch, "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=1e-2))
        losses.append(fb.result().metrics["loss:sum"])
        metrics = opt.result().metrics
        assert metrics is not None and metrics["grad_norm:mean"] > 0
    assert losses[-1] < 0.6 * losses[0], losses


def test_loss_is_a_plain_sum_with_any_real_weights(service_client, tokenizer) -> None:
    tc = service_client.create_lora_training_client(base_model=TINY, rank=2).result()
    rng = np.random.default_rng(0)
    data = []
    for s in SENTENCES[:3]:
        d = text_datum(tokenizer, s)
        n = len(d.loss_fn_inputs["weights"].tolist())
        w = rng.normal(size=n).astype(np.float32)  # negative weights too, as custom losses send
        data.append(types.Datum(model_input=d.model_input,
                                loss_fn_inputs={"target_tokens": d.loss_fn_inputs["target_tokens"],
                                                "weights": w}))
    out = tc.forward(data, "cross_entropy").result()
    lps = logprobs_of(out)
    expected = -sum(float(np.dot(np.asarray(d.loss_fn_inputs["weights"].tolist()), lp))
                    for d, lp in zip(data, lps))
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)
    assert all(lp.shape == (len(d.model_input.to_ints()),) for d, lp in zip(data, lps))
    assert all((lp < 0).all() for lp in lps)


def test_forward_never_accumulates_and_fwdbwd_accumulates(service_client, tokenizer) -> None:
    batch = _batch(tokenizer)
    adam = types.AdamParams(learning_rate=5e-3)
    clients = [service_client.create_lora_training_client(base_model=TINY, rank=4, seed=7).result()
               for _ in range(3)]
    a, b, c = clients
    # a: one forward_backward over the whole batch.
    a.forward_backward(batch, "cross_entropy").result()
    # b: a forward() with huge weights first (must leave no gradient), then the same step.
    b.forward(_batch(tokenizer, weight=1000.0), "cross_entropy").result()
    b.forward_backward(batch, "cross_entropy").result()
    # c: the batch split over two calls: gradients add up before the step.
    c.forward_backward(batch[:2], "cross_entropy").result()
    c.forward_backward(batch[2:], "cross_entropy").result()
    for tc in clients:
        tc.optim_step(adam).result()
    after = [logprobs_of(tc.forward(batch, "cross_entropy").result()) for tc in clients]
    for x, y in zip(after[0], after[1]):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(after[0], after[2]):
        np.testing.assert_allclose(x, y, atol=1e-5)
    before = logprobs_of(service_client.create_lora_training_client(
        base_model=TINY, rank=4, seed=7).result().forward(batch, "cross_entropy").result())
    assert not np.allclose(before[0], after[0][0], atol=1e-4)  # the step did change the model


def test_pipelined_equals_sequential(service_client, tokenizer) -> None:
    batch = _batch(tokenizer)
    adam = types.AdamParams(learning_rate=5e-3)
    seq = service_client.create_lora_training_client(base_model=TINY, rank=4, seed=1).result()
    seq_losses = []
    for _ in range(3):
        seq_losses.append(seq.forward_backward(batch, "cross_entropy").result().metrics["loss:sum"])
        seq.optim_step(adam).result()
    pipe = service_client.create_lora_training_client(base_model=TINY, rank=4, seed=1).result()
    futures = []
    for _ in range(3):  # everything submitted before anything is awaited
        futures.append(pipe.forward_backward(batch, "cross_entropy"))
        futures.append(pipe.optim_step(adam))
    pipe_losses = [f.result().metrics["loss:sum"] for f in futures[::2]]
    assert pipe_losses == seq_losses
    a = logprobs_of(seq.forward(batch, "cross_entropy").result())
    b = logprobs_of(pipe.forward(batch, "cross_entropy").result())
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_lora_config_and_seed_are_honoured(service_client, rest_client, tokenizer, data_dir) -> None:
    tc = service_client.create_lora_training_client(
        base_model=TINY, rank=3, seed=11, train_mlp=False, train_attn=True, train_unembed=False
    ).result()
    info = tc.get_info()
    assert info.lora_rank == 3 and info.model_data.model_name == TINY
    path = tc.save_state("cfg").result().path
    winfo = rest_client.get_weights_info_by_tinker_path(path).result()
    assert (winfo.lora_rank, winfo.train_mlp, winfo.train_attn, winfo.train_unembed) == (3, False, True, False)
    folder = Path(data_dir) / "checkpoints" / tc.model_id / "weights" / "cfg"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 3
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert all(".self_attn." in k for k in tensors) and all(t.shape[0] == 3 or t.shape[1] == 3 for t in tensors.values())
    # Same seed -> the same initial adapter; another seed -> another one.
    def saved_a(seed: int) -> torch.Tensor:
        c = service_client.create_lora_training_client(
            base_model=TINY, rank=3, seed=seed, train_mlp=False, train_unembed=False).result()
        c.save_state("s").result()
        t = load_file(str(Path(data_dir) / "checkpoints" / c.model_id / "weights" / "s"
                          / "adapter_model.safetensors"))
        return next(v for k, v in t.items() if k.endswith("layers.0.self_attn.q_proj.lora_A.weight"))

    first = next(v for k, v in tensors.items() if k.endswith("layers.0.self_attn.q_proj.lora_A.weight"))
    assert torch.equal(first, saved_a(11))
    assert not torch.equal(first, saved_a(12))


def _peft_logprobs(model, ids: list[int]) -> torch.Tensor:
    x = torch.tensor([ids[:-1]])
    logits = model(input_ids=x).logits[0]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_optimizer_matches_peft_and_torch_adamw(service_client, tokenizer, data_dir) -> None:
    """Two AdamW steps with every AdamParams field set, against PEFT + torch.optim.AdamW."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tinsmith.models import resolve_model_dir

    tc = service_client.create_lora_training_client(base_model=TINY, rank=4, seed=3).result()
    adam = types.AdamParams(learning_rate=1e-2, beta1=0.8, beta2=0.9, eps=1e-6,
                            weight_decay=0.1, grad_clip_norm=0.05)
    init_path = tc.save_state("init").result().path
    batches = [_batch(tokenizer)[:2], _batch(tokenizer)[2:]]
    server_norms = []
    for batch in batches:
        tc.forward_backward(batch, "cross_entropy").result()
        server_norms.append(tc.optim_step(adam).result().metrics["grad_norm:mean"])
    tc.save_state("after").result()
    root = Path(data_dir) / "checkpoints" / tc.model_id / "weights"

    base = AutoModelForCausalLM.from_pretrained(resolve_model_dir(TINY), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(root / "init"), is_trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    ref_norms = []
    for batch in batches:
        loss = torch.zeros(())
        for d in batch:
            ids = d.model_input.to_ints() + [d.loss_fn_inputs["target_tokens"].tolist()[-1]]
            loss = loss - _peft_logprobs(model, ids).sum()
        loss.backward()
        ref_norms.append(float(torch.nn.utils.clip_grad_norm_(params, 0.05)))
        opt.step()
        opt.zero_grad()
    np.testing.assert_allclose(server_norms, ref_norms, rtol=1e-4)
    after = load_file(str(root / "after" / "adapter_model.safetensors"))
    ref = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert set(after) == set(ref), (sorted(after)[:3], sorted(ref)[:3])
    for k, v in after.items():
        # Adam amplifies float rounding where v is tiny; 1e-5 is 0.1% of one lr-sized step.
        torch.testing.assert_close(v, ref[k], atol=1e-5, rtol=1e-3)
    assert init_path.endswith("/weights/init")
