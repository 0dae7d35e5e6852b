"""The multi-turn rollout (`tinsmith.cookbook.rl.run_episodes`) with a stand-in sampler: a
turn's input is the previous input + the sampled tokens + the observation's tokens, even
when the sampled tokens do not survive decoding and encoding again. No server needed."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from tinsmith.cookbook.arithmetic import Problem
from tinsmith.cookbook.renderers import PlainRenderer, Renderer, get_renderer
from tinsmith.cookbook.rl import run_episodes
from tinsmith.cookbook.tools import CalculatorEnv
from tinsmith.models.catalog import resolve_model_dir

PROBLEM = Problem(question="What is 2 times 3?", answer=6, operation="multiply", operands=(2, 3))


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model_dir("HuggingFaceTB/SmolLM2-135M-Instruct"))


@pytest.fixture(scope="module", params=["chat", "plain"])
def renderer(request, tok) -> Renderer:
    if request.param == "chat":
        return get_renderer(tok)
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    return get_renderer(bare)


def by_character(tok, text: str) -> list[int]:
    """`text` one character a token: not how the tokenizer would encode it."""
    return [t for ch in text for t in tok.encode(ch, add_special_tokens=False)]


class Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class Scripted:
    """Replies turn after turn with fixed token lists, and records every prompt it gets."""

    def __init__(self, replies: list[list[int]]) -> None:
        self.replies, self.prompts = replies, []

    def sample(self, prompt, num_samples, sampling_params):
        tokens = self.replies[len(self.prompts)]
        self.prompts.append(prompt.to_ints())
        return Done(SimpleNamespace(sequences=[SimpleNamespace(
            tokens=tokens, logprobs=[-0.25] * len(tokens))]))


@pytest.mark.parametrize("cut_off", [False, True], ids=["ended", "cut-off"])
def test_turns_append_sampled_tokens_that_do_not_round_trip(renderer: Renderer, tok,
                                                            cut_off: bool) -> None:
    stop = renderer.stop_sequences()
    end = stop if isinstance(stop[0], int) else tok.encode(stop[0], add_special_tokens=False)
    # Chat: leading white space, which the template's "assistant\n" merges with when the
    # text is encoded again. Plain: a leading space (a newline would end the turn).
    lead = "\n\t\t\t\t\t" if not isinstance(renderer, PlainRenderer) else " "
    call = by_character(tok, f"{lead}<calc>2*3</calc>") + ([] if cut_off else end)
    answer = by_character(tok, "So \\boxed{6}") + end
    for tokens in (call, answer):
        text = tok.decode(tokens)
        assert tok.encode(text, add_special_tokens=False) != tokens  # no round trip
    sampler = Scripted([call, answer])

    (episode,) = run_episodes(sampler, renderer, [CalculatorEnv(PROBLEM, max_turns=3)], seed=0,
                              max_tokens=32, temperature=1.0)

    first, second = sampler.prompts
    assert first == renderer.build_generation_prompt(CalculatorEnv(PROBLEM).initial_observation())
    assert second[:len(first) + len(call)] == first + call  # the sampled tokens, as sampled
    observation = second[len(first) + len(call):]
    assert tok.decode(observation).replace(" ", "").endswith("6" + (
        "<|im_end|>\n<|im_start|>assistant\n" if lead != " " else "\nassistant:"))
    if cut_off:  # the end-of-turn marker the sampler did not write comes first
        assert observation[:len(end)] == end
    assert episode.tokens == second + answer
    assert episode.sampled == ([False] * len(first) + [True] * len(call)
                               + [False] * len(observation) + [True] * len(answer))
    assert [lp for lp, s in zip(episode.logprobs, episode.sampled) if s] == [-0.25] * (
        len(call) + len(answer))
    assert not any(lp for lp, s in zip(episode.logprobs, episode.sampled) if not s)
    assert episode.done and episode.reward == pytest.approx(1.2)  # right, boxed, a good call
    assert episode.info["tool_calls"] == 1.0 and episode.info["turns"] == 2.0
    assert [m["role"] for m in episode.messages][-3:] == ["user", "assistant", "tool"]
    assert episode.messages[-1]["content"] == "6"


def test_observation_tokens_continue_the_template(renderer: Renderer, tok) -> None:
    """With a reply the tokenizer would encode the same way, the appended transcript is
    exactly the template's rendering of the whole conversation."""
    before = [{"role": "user", "content": "guess"}]
    new = [{"role": "user", "content": "higher"}]
    reply = tok.encode("8" if not isinstance(renderer, PlainRenderer) else " 8",
                       add_special_tokens=False)  # plain: the space after "assistant:"
    stop = renderer.stop_sequences()
    end = stop if isinstance(stop[0], int) else tok.encode(stop[0], add_special_tokens=False)
    after = [*before, {"role": "assistant", "content": "8"}, *new]
    prompt = renderer.build_generation_prompt(before)
    extra = renderer.observation_tokens(before, new, ended=True)
    assert prompt + reply + end + extra == renderer.build_generation_prompt(after)
    assert renderer.observation_tokens(before, new, ended=False) == end + extra
