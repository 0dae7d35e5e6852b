"""How closely Tinsmith's vision-language passes match plain transformers + PEFT, per family
(the figures of docs/models.md "Vision-language models", "Measured"), on the tiny synthetic
models, float32, CPU:

  base      the base model's logprobs with images vs transformers fed processor-style inputs
  peft      a LoRA run's logprobs with images vs PEFT loading the run's exported checkpoint
  greedy    greedy tokens from an image prompt vs a PEFT greedy loop (matching steps / steps)

Data, adapter perturbation and the transformers reference are tests/test_vision.py's own
helpers, so the figures are of exactly what the tests hold to their bounds.

    python bench/vl_accuracy.py                    # both tiny VL families
    python bench/vl_accuracy.py tiny-qwen2.5-vl
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np
import test_vision as tv
import torch
from transformers import AutoTokenizer

from tinsmith.engine.local import local_backends
from tinsmith.engine.losses import LossRegistry
from tinsmith.engine.runner import ModelRunner
from tinsmith.engine.sampler import Sampler
from tinsmith.models import synthetic
from tinsmith.types import IMAGE_SLOT, LoraSpec, SampleSpec


def measure(key: str, work: Path) -> dict[str, str]:
    import peft

    folder = work / key
    folder.mkdir()
    synthetic.write_folder(key, folder)
    runner = ModelRunner(folder, tv.name_of(folder))
    trainer, _ = local_backends(runner, AutoTokenizer.from_pretrained(folder), LossRegistry.load(()))
    data = [tv.datum(folder, 1, [(64, 48)]), tv.datum(folder, 2, [(96, 64), (40, 40)]), tv.datum(folder, 3, [])]
    base = tv.hf_base(folder)
    trainer.create_run("base", LoraSpec(rank=4, seed=1))  # B = 0: the base model's function
    ours = tv._forward(trainer, "base", data).outputs
    base_diff = max(float(np.abs(o["logprobs"] - tv.hf_logprobs(base, folder, d)).max()) for d, o in zip(data, ours))

    trainer.create_run("r", LoraSpec(rank=4, alpha=8, seed=1))
    tv.perturb(trainer._run("r")[0], seed=5)
    ckpt = work / f"{key}-ckpt"
    ckpt.mkdir()
    for name, blob in trainer.export_run("r", tv.name_of(folder), include_optimizer=False).items():
        (ckpt / name).write_bytes(blob)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(tv.hf_base(folder), str(ckpt)).eval()
    ours = tv._forward(trainer, "r", data).outputs
    peft_diff = max(float(np.abs(o["logprobs"] - tv.hf_logprobs(pm, folder, d)).max()) for d, o in zip(data, ours))

    d = tv.datum(folder, 7, [(96, 64)])
    steps = 8
    seq = torch.as_tensor(np.where(d.tokens == IMAGE_SLOT, tv.IMAGE_TOKEN, d.tokens))[None]
    with torch.no_grad():
        for _ in range(steps):
            logits = pm(**tv.hf_inputs(folder, seq, d.images)).logits[0, -1]
            seq = torch.cat([seq, logits.argmax()[None, None]], dim=1)
    want = seq[0, -steps:].tolist()
    slot = runner.attach(trainer.snapshot("r"))
    sampler = Sampler(runner, AutoTokenizer.from_pretrained(folder))
    outs: list = []
    sampler.admit(slot, SampleSpec(prompt=d.tokens, max_tokens=steps, temperature=0.0, stop_tokens=(),
                                   images=d.images), outs.append)
    while sampler.pending:
        sampler.step()
    got = outs[0].sequences[0].tokens.tolist()
    same = sum(a == b for a, b in zip(got, want))
    return {"base": f"{base_diff:.1e}", "peft": f"{peft_diff:.1e}", "greedy": f"{same}/{steps}"}


def main(argv: list[str]) -> None:
    keys = argv or tv.KEYS
    with tempfile.TemporaryDirectory() as tmp:
        for key in keys:
            print(key, measure(key, Path(tmp)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
