"""Several SDK clients training and sampling at once on one server: every run gets exactly
the losses and weights it gets alone, and nobody's requests are lost or mixed up."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from conftest import SENTENCES, TINY, logprobs_of, text_datum
from tinker import types


def _job(service_client, tokenizer, k: int) -> tuple[list[float], list[np.ndarray], list[int]]:
    batch = [text_datum(tokenizer, s) for s in SENTENCES[k:] + SENTENCES[:k]][: 2 + k]
    tc = service_client.create_lora_training_client(base_model=TINY, rank=2 + k, seed=k).result()
    adam = types.AdamParams(learning_rate=1e-2 * (k + 1))
    futures = []
    for _ in range(4):
        futures.append(tc.forward_backward(batch, "cross_entropy"))
        futures.append(tc.optim_step(adam))
    losses = [f.result().metrics["loss:sum"] for f in futures[::2]]
    after = logprobs_of(tc.forward(batch, "cross_entropy").result())
    sampler = tc.save_weights_and_get_sampling_client().result()
    sample = sampler.sample(types.ModelInput.from_ints(tokenizer.encode("The quick brown")), 1,
                            types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])).result()
    return losses, after, sample.sequences[0].tokens


def test_concurrent_runs_equal_solo_runs(service_client, tokenizer) -> None:
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda k: _job(service_client, tokenizer, k), range(4)))
    alone = [_job(service_client, tokenizer, k) for k in range(4)]
    for (l1, a1, s1), (l2, a2, s2) in zip(together, alone):
        assert l1 == l2
        for x, y in zip(a1, a2):
            np.testing.assert_array_equal(x, y)
        assert s1 == s2
    assert len({tuple(x[0]) for x in together}) == 4  # the runs really differ from each other
