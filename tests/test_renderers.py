"""Renderers on the bundled SmolLM2 tokenizer (its own chat template) and the plain renderer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from transformers import AutoTokenizer

from tinsmith.cookbook.renderers import (
    ChatTemplateRenderer,
    PlainRenderer,
    TrainOn,
    get_renderer,
    to_datum,
)
from tinsmith.models.catalog import resolve_model_dir

CONVO = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?\nThink about it."},
    {"role": "assistant", "content": " Six, of course.\n"},
]
ASSISTANT = [m["content"] for m in CONVO if m["role"] == "assistant"]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model_dir("HuggingFaceTB/SmolLM2-135M-Instruct"))


@pytest.fixture(scope="module")
def chat(tok) -> ChatTemplateRenderer:
    r = get_renderer(tok)
    assert isinstance(r, ChatTemplateRenderer)
    return r


@pytest.fixture(scope="module")
def plain(tok) -> PlainRenderer:
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    r = get_renderer(bare)
    assert isinstance(r, PlainRenderer)
    return r


def template_ids(tok, messages, **kw) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)
    return list(out)


def weighted_runs(tok, tokens, weights) -> list[str]:
    """The decoded text of each maximal run of weighted tokens."""
    runs, cur = [], []
    for t, w in zip(tokens, weights):
        if w:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


# --- chat template -------------------------------------------------------------------------


@pytest.mark.parametrize("messages", [CONVO, CONVO[1:]], ids=["with-system", "default-system"])
def test_round_trip_matches_template(tok, chat, messages):
    tokens, weights = chat.build_supervised_example(messages)
    assert len(tokens) == len(weights)
    assert tok.decode(tokens) == tok.apply_chat_template(messages, tokenize=False)
    assert tokens == template_ids(tok, messages)


def test_default_system_prompt_is_unweighted(tok, chat):
    text = tok.apply_chat_template(CONVO[1:], tokenize=False)
    assert "You are a helpful AI assistant named SmolLM" in text  # SmolLM2 inserts it
    for option in (TrainOn.ALL_ASSISTANT, TrainOn.ALL_MESSAGES):
        tokens, weights = chat.build_supervised_example(CONVO[1:], option)
        assert not any("SmolLM" in run for run in weighted_runs(tok, tokens, weights))


def test_weights_all_assistant(tok, chat):
    tokens, weights = chat.build_supervised_example(CONVO, TrainOn.ALL_ASSISTANT)
    assert weighted_runs(tok, tokens, weights) == [c + "<|im_end|>" for c in ASSISTANT]


def test_weights_last_assistant(tok, chat):
    tokens, weights = chat.build_supervised_example(CONVO, TrainOn.LAST_ASSISTANT)
    assert weighted_runs(tok, tokens, weights) == [ASSISTANT[-1] + "<|im_end|>"]
    # The default is ALL_ASSISTANT; the two differ on a multi-turn conversation.
    assert chat.build_supervised_example(CONVO)[1] != weights


def test_weights_all_messages(tok, chat):
    tokens, weights = chat.build_supervised_example(CONVO, TrainOn.ALL_MESSAGES)
    assert weighted_runs(tok, tokens, weights) == [m["content"] + "<|im_end|>" for m in CONVO]


def test_weights_all_tokens(chat):
    tokens, weights = chat.build_supervised_example(CONVO, TrainOn.ALL_TOKENS)
    assert weights == [1.0] * len(tokens)


def test_no_assistant_message_means_zero_weights(chat):
    _, weights = chat.build_supervised_example(CONVO[:2], TrainOn.LAST_ASSISTANT)
    assert not any(weights)


def test_generation_prompt(tok, chat):
    prompt = chat.build_generation_prompt(CONVO[:4])
    assert prompt == template_ids(tok, CONVO[:4], add_generation_prompt=True)
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    # The prompt is exactly the start of the full conversation's tokens.
    tokens, weights = chat.build_supervised_example(CONVO, TrainOn.LAST_ASSISTANT)
    assert tokens[:len(prompt)] == prompt
    assert not any(weights[:len(prompt)]) and weights[len(prompt)] == 1.0


def test_stop_token_ends_an_assistant_turn(tok, chat):
    stop = chat.stop_sequences()
    assert stop == [tok.convert_tokens_to_ids("<|im_end|>")]
    # In the template, the assistant's content is followed by exactly this token.
    prompt = chat.build_generation_prompt(CONVO[:4])
    full = template_ids(tok, CONVO)
    content_ids = tok.encode(ASSISTANT[-1], add_special_tokens=False)
    assert full[len(prompt):len(prompt) + len(content_ids) + 1] == content_ids + stop


def test_parse_response(tok, chat):
    stop = chat.stop_sequences()
    content = "Six, of course.\nSure."
    ids = tok.encode(content, add_special_tokens=False)
    msg, ok = chat.parse_response(ids + stop)
    assert msg == {"role": "assistant", "content": content} and ok is True
    msg, ok = chat.parse_response(ids)  # truncated: ran out of max_tokens
    assert msg["content"] == content and ok is False
    msg, ok = chat.parse_response(ids[:2] + stop + ids[2:])  # anything after the stop dropped
    assert msg["content"] == tok.decode(ids[:2]) and ok is True


NOT_PREFIX_STABLE = (  # marks the last message, so appending a message rewrites earlier text
    "{% for m in messages %}{% if loop.last %}[LAST]{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
)
STABLE_THEN_NOT = (  # stable for two messages, rewrites the first message after that
    "{% for m in messages %}{% if messages|length > 2 and loop.first %}[MANY]{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
)


def test_not_prefix_stable_template_raises(tok):
    bad = copy.deepcopy(tok)
    bad.chat_template = NOT_PREFIX_STABLE
    with pytest.raises(ValueError, match="not prefix-stable"):
        ChatTemplateRenderer(bad).build_supervised_example(CONVO)
    bad.chat_template = STABLE_THEN_NOT
    renderer = ChatTemplateRenderer(bad)  # the two-message probe passes
    with pytest.raises(ValueError, match=r"not prefix-stable: rendering messages\[:3\]"):
        renderer.build_supervised_example(CONVO)


def test_custom_template_without_default_system(tok):
    """Nothing is SmolLM2-specific: a different template gets its own header/footer split."""
    other = copy.deepcopy(tok)
    other.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role | upper }}: "
        "{{ m.content }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>ASSISTANT: {% endif %}")
    r = ChatTemplateRenderer(other)
    tokens, weights = r.build_supervised_example(CONVO)
    assert tokens == template_ids(other, CONVO)
    assert weighted_runs(other, tokens, weights) == [c + "<|im_end|>" for c in ASSISTANT]
    assert r.stop_sequences() == [other.eos_token_id]


# --- plain renderer ------------------------------------------------------------------------


PLAIN_CONVO = [  # single-line contents: the plain format ends a turn at the newline
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six, of course."},
]
PLAIN_TEXT = ("system: You answer briefly.\nuser: What is 2+2?\nassistant: 4\n"
              "user: And 3+3?\nassistant: Six, of course.\n")


def test_plain_round_trip_and_weights(tok, plain):
    tokens, weights = plain.build_supervised_example(PLAIN_CONVO)
    assert tok.decode(tokens) == PLAIN_TEXT
    assert tokens == tok.encode(PLAIN_TEXT)
    assert weighted_runs(tok, tokens, weights) == [" 4\n", " Six, of course.\n"]
    tokens, weights = plain.build_supervised_example(PLAIN_CONVO, TrainOn.LAST_ASSISTANT)
    assert weighted_runs(tok, tokens, weights) == [" Six, of course.\n"]
    tokens, weights = plain.build_supervised_example(PLAIN_CONVO, TrainOn.ALL_MESSAGES)
    # "\n" + next role name are separate tokens, so each message is its own run.
    assert weighted_runs(tok, tokens, weights) == [f" {m['content']}\n" for m in PLAIN_CONVO]
    tokens, weights = plain.build_supervised_example(PLAIN_CONVO, TrainOn.ALL_TOKENS)
    assert weights == [1.0] * len(tokens)


def test_plain_generation_prompt_and_parse(tok, plain):
    prompt = plain.build_generation_prompt(PLAIN_CONVO[:4])
    assert tok.decode(prompt) == PLAIN_TEXT.rsplit(" Six", 1)[0]
    assert tok.decode(prompt).endswith("assistant:")
    tokens, _ = plain.build_supervised_example(PLAIN_CONVO)
    assert tokens[:len(prompt)] == prompt  # " Six" is sampled as one token after ":"
    assert plain.stop_sequences() == ["\n"]
    response = tokens[len(prompt):]  # " Six, of course.\n", stop string included
    msg, ok = plain.parse_response(response)
    assert msg == {"role": "assistant", "content": "Six, of course."} and ok is True
    msg, ok = plain.parse_response(response[:-1])
    assert msg["content"] == "Six, of course." and ok is False


# --- to_datum ------------------------------------------------------------------------------


def test_to_datum_shift(chat):
    tokens, weights = chat.build_supervised_example(CONVO, TrainOn.LAST_ASSISTANT)
    d = to_datum(tokens, weights)
    assert d.model_input.length == len(tokens) - 1
    assert d.model_input.to_ints() == tokens[:-1]
    target = d.loss_fn_inputs["target_tokens"]
    w = d.loss_fn_inputs["weights"]
    assert target.dtype == "int64" and w.dtype == "float32"
    assert target.shape == w.shape == [len(tokens) - 1]
    assert target.tolist() == tokens[1:]
    assert np.asarray(w.to_numpy()).tolist() == weights[1:]
    with pytest.raises(ValueError):
        to_datum(tokens, weights[:-1])
