"""GenerationSteps (steering/steerers/fitted.py): which positions of each forward call produce
which generated token, read from what the decoder layers compute on, so that it holds whatever
keyword ``generate`` passes the KV cache under (``past_key_values=`` up to transformers 5.2x,
``cache=`` later). MARS and RAS rely on it; tests/test_defences.py checks them end to end."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import DynamicCache

from steering.models import get_adapter
from steering.steerers.fitted import GenerationSteps


@pytest.fixture(scope="module")
def tiny():
    return get_adapter("qwen2").build_untrained(seed=0, num_hidden_layers=2)


class StepLog:
    """GenerationSteps plus a record of steps() at every call of the last decoder layer."""

    def __init__(self, model):
        self.model, self.tracker, self.calls = model, GenerationSteps(), []

    def __enter__(self):
        last = get_adapter(self.model).decoder_layers(self.model)[-1]
        self.handles = [*self.tracker.attach(self.model),
                        last.register_forward_hook(lambda *_: self.calls.append(self.tracker.steps().tolist()))]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def prompt(tokenizer, texts):
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True)


def test_generate_steps_are_prompt_then_one_per_token(tiny):
    model, tokenizer = tiny
    inputs = prompt(tokenizer, ["a knife on a table", "hi"])
    length = inputs["input_ids"].shape[1]
    with torch.no_grad(), StepLog(model) as log:
        model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # a new prompt starts over
    first = list(range(-(length - 1), 1))
    assert log.calls == [first, [1], [2], [3], first, [1]]


def test_steps_do_not_depend_on_the_cache_keyword(tiny):
    """A hand-written decode loop passing the cache under this release's keyword; the tracker
    finds it among the decoder layer's arguments by what it is, not by name."""
    model, tokenizer = tiny
    ids = prompt(tokenizer, ["a red car"])["input_ids"]
    length = ids.shape[1]
    cache = DynamicCache()
    cache_keyword = next(name for name in ("past_key_values", "cache") if name in inspect.signature(model.forward).parameters)
    with torch.no_grad(), StepLog(model) as log:
        out = model(input_ids=ids, use_cache=True, **{cache_keyword: cache})
        for _ in range(2):
            ids = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=ids, use_cache=True, **{cache_keyword: cache})
    assert log.calls == [list(range(-(length - 1), 1)), [1], [2]]


def test_without_a_cache_each_call_is_a_new_prompt(tiny):
    model, tokenizer = tiny
    ids = prompt(tokenizer, ["a red car"])["input_ids"]
    with torch.no_grad(), StepLog(model) as log:
        model(input_ids=ids, use_cache=False)
    assert log.calls == [list(range(-(ids.shape[1] - 1), 1))]


def test_a_right_padded_prefill_is_an_error(tiny):
    model, tokenizer = tiny
    tokenizer.padding_side = "right"
    inputs = tokenizer(["a knife on a table", "hi"], return_tensors="pt", padding=True)
    with torch.no_grad(), StepLog(model), pytest.raises(ValueError, match="right-padded"):
        model(**inputs, use_cache=True)
