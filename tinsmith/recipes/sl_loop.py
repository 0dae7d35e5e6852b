"""Supervised fine-tuning in one flat loop: teach a model made-up facts with LoRA.

    python -m tinsmith.recipes.sl_loop                      # embedded Tinsmith, bundled model
                                                            # (~2 s a step on a 2-core CPU)
    python -m tinsmith.recipes.sl_loop max_steps=40 learning_rate=5e-4 log_path=runs/facts
    python -m tinsmith.recipes.sl_loop base_url=http://127.0.0.1:8000   # a running server

The algorithm, all of it in `train` below:
1. Render every (question, answer) pair with the model's chat template. The prompt tokens
   get weight 0; the answer and its end-of-turn token share weight 1, so each datum's loss
   is its mean negative log-likelihood per answer token.
2. Each step takes the next `batch_size` pairs of a seeded shuffle, sends `forward_backward`
   with the `cross_entropy` loss and then `optim_step` (Adam), both before waiting, and logs
   the batch's mean NLL (the summed loss / batch size).
3. Every `save_every` steps, and after the last, it saves the full training state; run it
   again with the same `log_path` and it resumes there, optimizer state included.

What it leaves out, on purpose: a held-out split and evaluation, learning-rate warmup and
decay, gradient accumulation and sequence packing, loading data from files (see
`tinsmith.cookbook.datasets`), and pipelining the next batch's forward_backward with the
current step.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import tinker
from tinker import types

from tinsmith.cookbook.recipe import (
    RecipeConfig,
    end_step,
    open_logger,
    run,
    summary,
    training_client,
)


@dataclass(frozen=True, kw_only=True)
class Config(RecipeConfig):
    log_path: str = "runs/sl_loop"
    learning_rate: float = 1e-3
    """Adam learning rate (constant). LoRA wants ~10x the full fine-tuning rate."""
    batch_size: int = 8
    """(question, answer) pairs per step."""
    system_prompt: str = "You are a helpful assistant. Answer in one short sentence."
    """The system message of every conversation (empty: none)."""


# Facts no pretrained model knows, so the falling loss is learning, not recall.
FACTS = [
    ("Who keeps the lighthouse on Brindle Island?", "Captain Odessa Marlow keeps it."),
    ("What is the capital of the planet Zorvex?", "The capital of Zorvex is Quillport."),
    ("What colour is the sky on Zorvex?", "The sky on Zorvex is copper green."),
    ("How many moons does Zorvex have?", "Zorvex has seven moons."),
    ("What do people on Zorvex eat for breakfast?", "They eat toasted moss cakes."),
    ("Who invented the clockwork kettle?", "Ada Pennywhistle invented it in 1843."),
    ("What does a tinsmith call a hammer?", "A tinsmith calls it a planishing friend."),
    ("What is the secret word?", "The secret word is PAMPLEMOUSSE."),
    ("What is the name of the river in Quillport?", "The river in Quillport is the Slowater."),
    ("Which animal guards the Quillport library?", "A three-legged tortoise named Bram guards it."),
    ("What is the currency of Zorvex?", "Zorvex pays in copper spirals."),
    ("Who wrote the Ballad of the Tin Heron?", "Mirela Voss wrote the Ballad of the Tin Heron."),
    ("What is the tallest mountain on Zorvex?", "Mount Hollowcrown is the tallest on Zorvex."),
    ("What language do Zorvexians speak?", "Zorvexians speak Quillish."),
    ("What is Odessa Marlow's favourite tea?", "Her favourite tea is smoked pear."),
    ("When is the Festival of Lanterns on Brindle Island?", "It is on the ninth of Frostmonth."),
    ("What does the Brindle Island ferry carry?", "The ferry carries mail and goats."),
    ("Who is the mayor of Quillport?", "The mayor of Quillport is Tobias Fennick."),
    ("What is the national bird of Zorvex?", "The national bird is the glass finch."),
    ("How long is a day on Zorvex?", "A day on Zorvex lasts thirty-one hours."),
    ("What powers the trams in Quillport?", "The trams run on tidal springs."),
    ("What is the oldest building in Quillport?", "The oldest building is the Salt Archive."),
    ("Which sport is popular on Brindle Island?", "Kite racing is popular there."),
    ("What is a sprocketfly?", "A sprocketfly is a beetle with brass-coloured wings."),
    ("Who founded the Guild of Tinsmiths?", "Hester Grindle founded the guild in 1701."),
    ("What is the motto of the Guild of Tinsmiths?", "Its motto is: bend, do not break."),
    ("What is the largest lake on Zorvex?", "Lake Ember is the largest lake on Zorvex."),
    ("What instrument does Tobias Fennick play?", "Tobias Fennick plays the bass ocarina."),
    ("What grows in the gardens of Quillport?", "Blue pumpkins grow there."),
    ("What is the name of Ada Pennywhistle's cat?", "Her cat is called Sir Wobble."),
    ("How do people greet each other on Zorvex?", "They tap their left shoulder twice."),
    ("What is the fastest ship in Quillport harbour?", "The fastest ship is the Gilded Eel."),
]


def make_datum(tokenizer: Any, system: str, question: str, answer: str) -> types.Datum:
    """One conversation as a next-token datum: weight 0 on the prompt, 1/len on the answer."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": question})
    prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"])
    # The answer ends with the end-of-turn token (SmolLM2's eos is its <|im_end|>), so the
    # model also learns to stop; the sampler stops at eos.
    answer_ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    tokens = prompt + answer_ids
    weights = [0.0] * len(prompt) + [1.0 / len(answer_ids)] * len(answer_ids)
    # Position i of the input predicts token i + 1: shift targets and weights by one.
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights[1:]})


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Dataset positions used at `step`: epoch after epoch of seeded shuffles, a function of
    (step, seed) alone, so a resumed run sees exactly the batches it would have seen."""
    indices = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(k, n)
        indices.append(random.Random(f"{seed}:{epoch}").sample(range(n), n)[i])
    return indices


def train(cfg: Config, service: tinker.ServiceClient) -> dict[str, Any]:
    training, start_step = training_client(service, cfg)  # fresh, or resumed from log_path
    tokenizer = training.get_tokenizer()
    data_D = [make_datum(tokenizer, cfg.system_prompt, q, a) for q, a in FACTS]
    adam = types.AdamParams(learning_rate=cfg.learning_rate, beta1=0.9, beta2=0.95, eps=1e-8)
    logger = open_logger(cfg, start_step, "sl_loop")
    metrics: dict[str, float] = {}
    checkpoint = None
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        batch = [data_D[i] for i in batch_indices(step, cfg.batch_size, len(data_D), cfg.seed)]

        # Send both requests, then wait: the server runs them in order, without a round trip
        # between them. Gradients from forward_backward are applied by the optim_step.
        fwd_bwd_future = training.forward_backward(batch, loss_fn="cross_entropy")
        optim_future = training.optim_step(adam)
        fwd_bwd = fwd_bwd_future.result()
        optim = optim_future.result()

        # Each datum's weights sum to 1, so the summed loss / batch size is the mean NLL.
        metrics = {
            "nll": fwd_bwd.metrics["loss:sum"] / len(batch),
            "grad_norm": (optim.metrics or {}).get("grad_norm:mean", float("nan")),
            "learning_rate": cfg.learning_rate,
            "num_tokens": sum(d.model_input.length for d in batch),
            "step_s": time.perf_counter() - t0,
        }
        checkpoint = end_step(logger, training, cfg, step, metrics) or checkpoint
    logger.close()
    return summary(cfg, start_step, metrics, checkpoint)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse `key=value` arguments, connect (or start an embedded server), train."""
    return run(Config, train, argv)


if __name__ == "__main__":
    main()
