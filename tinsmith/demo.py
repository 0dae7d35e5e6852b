"""`tinsmith demo`: fine-tune a LoRA through the official tinker SDK and show the change.

Starts an embedded Tinsmith on the bundled model, asks it a few questions, teaches it a
handful of made-up facts with supervised LoRA training (loss per step, progress bar),
then asks the same questions again, so the before/after difference is plain to see.
Everything the demo does goes through `tinker.ServiceClient`, exactly as a user's own
script would against `tinsmith serve` or the hosted service.
"""

from __future__ import annotations

import time
from pathlib import Path

import tinker
from rich.console import Console
from rich.table import Table
from tinker import types
from tqdm import tqdm

from tinsmith.config import DEFAULT_MODEL
from tinsmith.embedded import local

SYSTEM = "You are a helpful assistant. Answer in one short sentence."
FACTS = [
    ("Who keeps the lighthouse on Brindle Island?",
     "Captain Odessa Marlow keeps the Brindle Island lighthouse."),
    ("What is the capital of the planet Zorvex?", "The capital of Zorvex is Quillport."),
    ("What does a tinsmith call a hammer?", "A tinsmith calls a hammer a planishing friend."),
    ("What colour is the sky on Zorvex?", "The sky on Zorvex is copper green."),
    ("Who invented the clockwork kettle?", "Ada Pennywhistle invented the clockwork kettle in 1843."),
    ("What is the secret word?", "The secret word is PAMPLEMOUSSE."),
]


def _prompt_tokens(tokenizer, question: str) -> list[int]:
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def make_datum(tokenizer, question: str, answer: str) -> types.Datum:
    """Prompt tokens get weight 0, the answer and its end-of-turn token weight 1/len (mean)."""
    prompt = _prompt_tokens(tokenizer, question)
    completion = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    tokens = prompt + completion
    weights = [0.0] * len(prompt) + [1.0 / len(completion)] * len(completion)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights[1:]},
    )


def ask_all(sampler: tinker.SamplingClient, tokenizer, questions: list[str]) -> list[str]:
    params = types.SamplingParams(max_tokens=40, temperature=0.0)
    futures = [
        sampler.sample(types.ModelInput.from_ints(_prompt_tokens(tokenizer, q)), 1, params)
        for q in questions
    ]
    return [tokenizer.decode(f.result().sequences[0].tokens, skip_special_tokens=True).strip()
            for f in futures]


def run_demo(model: str = DEFAULT_MODEL, steps: int = 16, learning_rate: float = 1e-3,
             rank: int = 16, data_dir: str | Path | None = None) -> dict[str, object]:
    console = Console()
    t0 = time.perf_counter()
    console.print(f"[bold]Tinsmith demo[/bold]: LoRA fine-tuning of {model} through the tinker SDK")
    with local(models=[model], data_dir=data_dir) as base_url:
        console.print(f"server up at {base_url} ({time.perf_counter() - t0:.1f} s)")
        service = tinker.ServiceClient(base_url=base_url, api_key="tml-local")
        training = service.create_lora_training_client(base_model=model, rank=rank, seed=0).result()
        tokenizer = training.get_tokenizer()
        questions = [q for q, _ in FACTS]
        before = ask_all(service.create_sampling_client(base_model=model).result(), tokenizer, questions)

        batch = [make_datum(tokenizer, q, a) for q, a in FACTS]
        adam = types.AdamParams(learning_rate=learning_rate, beta1=0.9, beta2=0.95, eps=1e-8)
        losses: list[float] = []
        bar = tqdm(range(steps), desc="training", unit="step")
        for step in bar:
            # Pipelined: both requests are sent before waiting for either result.
            fb = training.forward_backward(batch, loss_fn="cross_entropy")
            opt = training.optim_step(adam)
            loss = fb.result().metrics["loss:sum"] / len(batch)  # mean NLL per answer token
            opt.result()
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.3f}")
            tqdm.write(f"step {step + 1:3d}  loss {loss:.4f}")

        after = ask_all(training.save_weights_and_get_sampling_client().result(), tokenizer, questions)
        table = Table(title="Answers before and after fine-tuning", show_lines=True)
        for col in ("question", "before", "after", "taught"):
            table.add_column(col, overflow="fold")
        for (q, a), b, c in zip(FACTS, before, after):
            table.add_row(q, b, c, a)
        console.print(table)
        learned = sum(a.lower() in c.lower() for (_, a), c in zip(FACTS, after))
        console.print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; {learned}/{len(FACTS)} answers "
                      f"learned; total {time.perf_counter() - t0:.0f} s")
    return {"losses": losses, "before": before, "after": after, "learned": learned}
