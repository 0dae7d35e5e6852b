"""RLHF in three stages: supervised fine-tuning, a reward model trained with a Bradley-Terry
loss on preference pairs, then RL against that reward model with a KL penalty to the SFT
policy.

    python -m tinsmith.recipes.rlhf                          # embedded Tinsmith, bundled model
    python -m tinsmith.recipes.rlhf data_path=pairs.jsonl sft_steps=20 rm_steps=30 max_steps=50
    python -m tinsmith.recipes.rlhf kl_coeff=0.1 group_size=8

Data: (prompt, chosen, rejected) pairs, from a JSONL file (`data_path`, the format of the
`dpo` recipe) or `dpo`'s built-in set: the same questions answered warmly and to the point
(chosen) or curtly (rejected). `eval_fraction` of the pairs is held out.

1. SFT (`<log_path>/sft`, the `chat_sl` recipe's loop): the policy learns from
   demonstrations, by default both replies of every training pair (`sft_data=both`:
   demonstrations of mixed quality, so the preference is left to stages 2 and 3 to teach;
   `sft_data=chosen` takes the chosen replies only).
2. Reward model (`<log_path>/reward_model`): a LoRA run started from the SFT weights and
   used as a judge. Each (prompt, reply) becomes the judge prompt `JUDGE_TEMPLATE`, and the
   score is the log-probability that the judge answers "yes":
       r(x, y) = log p_RM("yes" | judge prompt(x, y))
   trained with the server's `bradley_terry` loss, -log sigmoid(r(x, chosen) - r(x, rejected))
   per pair. Held-out pair accuracy is logged as `eval/pair_accuracy`.
3. RL (`<log_path>` itself: the main run): the policy starts from the SFT weights. Each step
   samples `group_size` replies to each of `batch_size` training prompts, scores all of
   them with the reward model in one `forward`, centres the scores within each group (the
   GRPO baseline) and subtracts kl_coeff * (sampler logprob - SFT logprob) per token, a
   sample-based penalty on KL(policy || SFT) logged as `kl_ref`; `importance_sampling`
   loss, one Adam step. Every `eval_every` steps: the reward model's mean score of greedy
   replies to the held-out prompts (`eval/reward`) and an HTML page of sampled replies at
   `<log_path>/transcripts/step_XXXXXX.html`.

Each stage runs once: running the recipe again with the same `log_path` skips a finished
stage (its last checkpoint reached its step count) and resumes an interrupted one from its
checkpoint. `max_steps` counts RL steps; `sft_steps` and `rm_steps` the other two stages.

What it leaves out: a reward model with a value head (a Tinker-style service trains LoRA
language models, so the judge's "yes" logprob is the score), reward normalisation across
batches, PPO's value function and several epochs per batch (a group baseline instead),
and reward-model ensembles.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tinker
from tinker import types

from tinsmith.cookbook.datasets import (
    Conversation,
    PreferencePair,
    batches,
    load_preference_pairs,
    train_test_split,
)
from tinsmith.cookbook.recipe import (
    RecipeConfig,
    end_step,
    finished_stage,
    open_logger,
    run,
    summary,
    training_client,
)
from tinsmith.cookbook.renderers import Renderer, get_renderer, to_datum
from tinsmith.cookbook.rl import (
    TRAIN_SEED_STRIDE,
    forward_logprobs,
    grpo_datums,
    policy_step,
    sample_prompts,
    with_kl_penalty,
)
from tinsmith.cookbook.transcripts import Episode, write_html_transcripts
from tinsmith.recipes import chat_sl
from tinsmith.recipes.dpo import builtin_pairs, pair_steps

JUDGE_TEMPLATE = ("Here is a conversation and a reply to it.\n\n{conversation}\n\n"
                  "Reply: {reply}\n\nIs the reply helpful and polite? Answer yes or no.")
JUDGE_ANSWER = "yes"


@dataclass(frozen=True, kw_only=True)
class Config(RecipeConfig):
    log_path: str = "runs/rlhf"
    max_steps: int = 20
    """RL steps (stage 3) in total, a resumed run counting earlier ones."""
    learning_rate: float = 2e-4
    """Adam learning rate of the RL stage."""
    sft_steps: int = 10
    """Stage 1: supervised steps."""
    sft_batch_size: int = 8
    """Stage 1: conversations per step."""
    sft_learning_rate: float | None = None
    """Stage 1: peak learning rate (None: the recommended LoRA rate, as in chat_sl)."""
    sft_data: Literal["both", "chosen"] = "both"
    """Stage 1: demonstrations are both replies of each pair, or the chosen ones only."""
    rm_steps: int = 10
    """Stage 2: reward-model steps."""
    rm_batch_size: int = 4
    """Stage 2: preference pairs per step."""
    rm_learning_rate: float = 2e-4
    """Stage 2: Adam learning rate (the Bradley-Terry loss is summed over pairs)."""
    batch_size: int = 4
    """Stage 3: prompts per step."""
    group_size: int = 4
    """Stage 3: replies sampled per prompt; scores are centred within each group."""
    max_tokens: int = 48
    """Stage 3: longest reply sampled, in tokens."""
    temperature: float = 1.0
    """Stage 3: sampling temperature (evaluation is greedy)."""
    kl_coeff: float = 0.05
    """Stage 3: penalty on (sampler logprob - SFT logprob) per token; 0: no reference."""
    data_path: str | None = None
    """JSONL of {"prompt", "chosen", "rejected"} lines (None: the dpo recipe's built-in set)."""
    eval_fraction: float = 0.25
    """Share of the pairs held out for evaluation (reward model accuracy, eval/reward)."""
    eval_every: int = 5
    """Evaluate (and write transcripts) every this many steps of stages 2 and 3."""
    num_transcripts: int = 4
    """Sampled replies written to each transcripts page."""


def judge_datum(renderer: Renderer, prompt: Conversation, reply: str) -> types.Datum:
    """The reward model's view of one reply: the judge prompt, then JUDGE_ANSWER with weight
    1 on its tokens, so the weighted logprob sum of a `forward` is the score r(x, y)."""
    conversation = "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
    question = JUDGE_TEMPLATE.format(conversation=conversation, reply=reply)
    tokens = renderer.build_generation_prompt([{"role": "user", "content": question}])
    answer = renderer.tokenizer.encode(JUDGE_ANSWER, add_special_tokens=False)
    return to_datum(tokens + answer, [0.0] * len(tokens) + [1.0] * len(answer))


def scores(reward_model: tinker.TrainingClient, data: list[types.Datum]) -> list[float]:
    """r(x, y) of each judge datum: its weighted target logprob sum (one forward)."""
    return [float((lp * d.loss_fn_inputs["weights"].to_numpy()).sum())
            for d, lp in zip(data, forward_logprobs(reward_model, data))]


def sft_stage(cfg: Config, service: tinker.ServiceClient, pairs: list[PreferencePair]) -> str:
    """Stage 1 through chat_sl's loop; returns the SFT training state's path."""
    def conversations() -> list[Conversation]:
        return [c for p in pairs for c in (
            [p.chosen_conversation(), p.rejected_conversation()] if cfg.sft_data == "both"
            else [p.chosen_conversation()])]

    return chat_sl.sft_stage(cfg, service, conversations, steps=cfg.sft_steps,
                             batch_size=cfg.sft_batch_size, learning_rate=cfg.sft_learning_rate)


def reward_model_stage(cfg: Config, service: tinker.ServiceClient, renderer: Renderer,
                       train_pairs: list[PreferencePair], eval_pairs: list[PreferencePair],
                       sft_state: str) -> str:
    """Stage 2: Bradley-Terry on judge datums, from the SFT weights; returns its state path."""
    sub = dataclasses.replace(cfg, log_path=str(Path(cfg.log_path) / "reward_model"),
                              max_steps=cfg.rm_steps, learning_rate=cfg.rm_learning_rate)
    if (done := finished_stage(sub, "reward model")) is not None:
        return done
    rm, start = training_client(service, sub, init_state=sft_state)
    train_data = [[judge_datum(renderer, p.prompt, p.chosen),
                   judge_datum(renderer, p.prompt, p.rejected)] for p in train_pairs]
    eval_data = [d for p in eval_pairs for d in (judge_datum(renderer, p.prompt, p.chosen),
                                                 judge_datum(renderer, p.prompt, p.rejected))]
    _, checkpoint = pair_steps(rm, sub, start, train_data, eval_data, loss_fn="bradley_terry",
                               loss_config={"label_smoothing": 0.0},
                               batch_size=cfg.rm_batch_size, eval_every=cfg.eval_every,
                               desc="rlhf reward model")
    assert checkpoint is not None  # pair_steps saves after the last step
    return str(checkpoint["state_path"])


def train(cfg: Config, service: tinker.ServiceClient) -> dict[str, Any]:
    pairs = load_preference_pairs(cfg.data_path) if cfg.data_path else builtin_pairs()
    train_pairs, eval_pairs = train_test_split(pairs, cfg.eval_fraction, cfg.seed)
    if len(train_pairs) < max(cfg.batch_size, cfg.rm_batch_size):
        raise SystemExit(f"error: {len(train_pairs)} training pairs, fewer than a batch")
    sft_state = sft_stage(cfg, service, train_pairs)
    policy, start_step = training_client(service, cfg, init_state=sft_state)
    renderer = get_renderer(policy.get_tokenizer())
    rm_state = reward_model_stage(cfg, service, renderer, train_pairs, eval_pairs, sft_state)
    reward_model = service.create_training_client_from_state(rm_state).result()
    reference = (service.create_training_client_from_state(sft_state).result()
                 if cfg.kl_coeff > 0 else None)

    prompts = [p.prompt for p in train_pairs]
    tokens_E = [renderer.build_generation_prompt(p.prompt) for p in eval_pairs]
    adam = types.AdamParams(learning_rate=cfg.learning_rate)
    stop = renderer.stop_sequences()
    logger = open_logger(cfg, start_step, "rlhf", sft_state=sft_state, rm_state=rm_state)
    per_epoch = max(1, len(prompts) // cfg.batch_size)
    metrics: dict[str, float] = {}
    checkpoint = None
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        evaluate = cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step + 1 == cfg.max_steps)
        sampler = policy.save_weights_and_get_sampling_client().result()
        epoch, k = divmod(step, per_epoch)
        prompts_P = batches(prompts, cfg.batch_size, cfg.seed, epoch, drop_last=True)[k]
        tokens_P = [renderer.build_generation_prompt(p) for p in prompts_P]
        futures_P = sample_prompts(sampler, tokens_P, cfg.group_size, max_tokens=cfg.max_tokens,
                                   temperature=cfg.temperature, stop=stop,
                                   seed=cfg.seed * TRAIN_SEED_STRIDE + step * 1_000)
        futures_E = sample_prompts(sampler, tokens_E, 1, max_tokens=cfg.max_tokens,
                                   temperature=0.0, stop=stop, seed=0) if evaluate else []

        # Score every reply (training groups, then greedy eval replies) in one forward.
        seqs_PG = [f.result().sequences for f in futures_P]
        seqs_E = [f.result().sequences[0] for f in futures_E]
        texts_PG = [[renderer.parse_response(list(s.tokens))[0]["content"] for s in seqs]
                    for seqs in seqs_PG]
        texts_E = [renderer.parse_response(list(s.tokens))[0]["content"] for s in seqs_E]
        judged = [judge_datum(renderer, prompt, text)
                  for prompt, texts in zip(prompts_P, texts_PG) for text in texts]
        judged += [judge_datum(renderer, p.prompt, text) for p, text in zip(eval_pairs, texts_E)]
        all_scores = scores(reward_model, judged)
        n_train = sum(len(texts) for texts in texts_PG)
        rewards, rewards_E = all_scores[:n_train], all_scores[n_train:]

        # One datum per reply of each group, with the group-centred score as advantage.
        samples = [(tokens, seq) for tokens, seqs in zip(tokens_P, seqs_PG) for seq in seqs]
        data_D, n_sampled_D, mixed_groups = grpo_datums(samples, rewards, cfg.group_size)
        metrics = {"reward": float(np.mean(rewards)),
                   "response_len": float(np.mean([len(s.tokens) for g in seqs_PG for s in g])),
                   "mixed_groups": mixed_groups / len(prompts_P), "num_datums": len(data_D)}
        if evaluate:
            metrics["eval/reward"] = float(np.mean(rewards_E)) if rewards_E else float("nan")
            replies = [(p, g, prompt, text) for p, (prompt, texts) in
                       enumerate(zip(prompts_P, texts_PG)) for g, text in enumerate(texts)]
            episodes = [Episode(messages=[*prompt, {"role": "assistant", "content": text}],
                                reward=reward, title=f"step {step}, prompt {p}, sample {g}")
                        for (p, g, prompt, text), reward in zip(replies, rewards)]
            write_html_transcripts(Path(cfg.log_path) / "transcripts" / f"step_{step:06d}.html",
                                   episodes[: cfg.num_transcripts], title=f"rlhf step {step}")
        metrics["sample_s"] = time.perf_counter() - t0

        if data_D:
            if reference is not None:
                data_D, metrics["kl_ref"] = with_kl_penalty(reference, data_D, n_sampled_D,
                                                                cfg.kl_coeff)
            metrics |= policy_step(policy, data_D, adam)
        metrics["step_s"] = time.perf_counter() - t0
        checkpoint = end_step(logger, policy, cfg, step, metrics) or checkpoint
    logger.close()
    return summary(cfg, start_step, metrics, checkpoint, sft_state=sft_state, rm_state=rm_state)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse `key=value` arguments, connect (or start an embedded server), run the stages."""
    return run(Config, train, argv)


if __name__ == "__main__":
    main()
