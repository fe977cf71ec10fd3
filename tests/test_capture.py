"""Activation capture: stopped forward == full forward's hidden states, pooling, padding, layer checks."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from steering.capture import ActivationCapture, capture, forward_until, pooling_weights
from steering.models import CAPTION_MASK, FAMILIES, get_adapter, model_inputs

TEMPLATE = "Describe the image. {caption}"
CAPTIONS = ["a red dog", "two people riding a horse near the river"]
LAYERS = [0, 2]  # of 4: layer 3 and the LM head must not run


@functools.cache
def tiny(family: str):
    return get_adapter(family).build_untrained(seed=0)


def stimuli(adapter, n: int):
    rng = np.random.default_rng(1)
    shapes = [(40, 56, 3), (64, 32, 3)]
    images = [
        Image.fromarray(rng.integers(0, 255, shapes[i % 2], dtype=np.uint8)) if adapter.takes_images else None
        for i in range(n)
    ]
    return images, CAPTIONS[:n]


class CallCounter:
    """Counts forward calls of a module through a forward hook."""

    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.calls += 1


@pytest.mark.parametrize("family", FAMILIES)
def test_stopped_forward_captures_equal_the_full_forwards_hidden_states(family):
    adapter = get_adapter(family)
    model, processor = tiny(family)
    inputs = adapter.build_inputs(processor, *stimuli(adapter, 2), TEMPLATE)
    with torch.inference_mode():
        hidden_states = model(**model_inputs(inputs), output_hidden_states=True).hidden_states
    assert len(hidden_states) == adapter.num_layers(model) + 1
    hooks_before = [dict(layer._forward_hooks) for layer in adapter.decoder_layers(model)]
    last_layer = CallCounter(adapter.decoder_layers(model)[3])
    head = CallCounter(model.get_output_embeddings())
    for pooling in ("mean", "caption", "last"):
        got = capture(model, adapter, inputs, LAYERS, pooling)
        weights = pooling_weights(inputs["attention_mask"], pooling, inputs[CAPTION_MASK])
        assert sorted(got) == LAYERS
        for layer in LAYERS:
            expected = torch.einsum("bs,bsd->bd", weights, hidden_states[layer + 1])  # [0] is the embeddings
            assert got[layer].shape == (2, model.get_input_embeddings().embedding_dim)
            assert got[layer].dtype == torch.float32
            torch.testing.assert_close(got[layer], expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got[0], got[2])
    assert last_layer.calls == 0 and head.calls == 0
    last_layer.handle.remove()
    head.handle.remove()
    assert [dict(layer._forward_hooks) for layer in adapter.decoder_layers(model)] == hooks_before


def test_poolings_differ_and_select_what_they_say():
    adapter = get_adapter("llava")
    model, processor = tiny("llava")
    inputs = adapter.build_inputs(processor, *stimuli(adapter, 2), TEMPLATE)
    got = {p: capture(model, adapter, inputs, [1], p)[1] for p in ("mean", "caption", "last")}
    assert not torch.allclose(got["mean"], got["caption"]) and not torch.allclose(got["mean"], got["last"])


@pytest.mark.parametrize("family,padding_side", [("qwen2_vl", "left"), ("llava", "right"), ("internvl", "left"),
                                                 ("qwen2", "right"), ("qwen2", "left")])
def test_padding_is_never_pooled(family, padding_side):
    adapter = get_adapter(family)
    model, processor = tiny(family)
    tokenizer = getattr(processor, "tokenizer", processor)
    default_side = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        images, captions = stimuli(adapter, 2)
        batch = adapter.build_inputs(processor, images, captions, TEMPLATE)
        alone = adapter.build_inputs(processor, images[:1], captions[:1], TEMPLATE)
    finally:
        tokenizer.padding_side = default_side
    short = batch["attention_mask"][0]
    assert (short == 0).any(), "the first item is the shorter one, so it is padded"
    assert (short[0] == 0) == (padding_side == "left")
    for pooling in ("mean", "caption", "last"):
        in_batch = capture(model, adapter, batch, LAYERS, pooling)
        single = capture(model, adapter, alone, LAYERS, pooling)
        for layer in LAYERS:
            torch.testing.assert_close(in_batch[layer][:1], single[layer], rtol=1e-4, atol=1e-5)


def test_a_missing_layer_is_an_error_before_any_forward():
    adapter = get_adapter("qwen2_vl")
    model, processor = tiny("qwen2_vl")
    inputs = adapter.build_inputs(processor, *stimuli(adapter, 1), TEMPLATE)
    started = []
    handle = model.register_forward_pre_hook(lambda module, args: started.append(module))
    try:
        with pytest.raises(ValueError, match="it has 4 decoder layers"):
            capture(model, adapter, inputs, [2, 15], "mean")
        with pytest.raises(ValueError, match="it has 4 decoder layers"):
            capture(model, adapter, inputs)  # the default layers 15-19 do not exist in a tiny model
        with pytest.raises(ValueError, match="unknown pooling 'max'"):
            capture(model, adapter, inputs, [1], "max")
        assert started == []
        capture(model, adapter, inputs, [1], "mean")
        assert started == [model], "the pre-hook does see a forward"
    finally:
        handle.remove()


def test_pooling_weights_pick_the_last_attended_token_on_either_padding_side():
    attention = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    last = pooling_weights(attention, "last")
    assert last.tolist() == [[0, 0, 0, 0, 1], [0, 0, 1, 0, 0]]
    mean = pooling_weights(attention, "mean")
    torch.testing.assert_close(mean.sum(dim=1), torch.ones(2))
    assert (mean[attention == 0] == 0).all()
    caption = torch.tensor([[0, 0, 0, 1, 1], [1, 0, 0, 0, 1]], dtype=torch.bool)
    assert pooling_weights(attention, "caption", caption).tolist() == [[0, 0, 0, 0.5, 0.5], [1, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match=r"batch items \[0\] have no token to pool"):
        pooling_weights(attention, "caption", torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="needs the caption_mask"):
        pooling_weights(attention, "caption")


def test_capture_context_reuses_hooks_across_batches_and_removes_them():
    adapter = get_adapter("qwen2")
    model, tokenizer = tiny("qwen2")
    first = adapter.build_inputs(tokenizer, [None], CAPTIONS[:1], TEMPLATE)
    second = adapter.build_inputs(tokenizer, [None], CAPTIONS[1:], TEMPLATE)
    layers = adapter.decoder_layers(model)
    before = [len(layer._forward_hooks) for layer in layers]
    with ActivationCapture(model, adapter, [1, 3], "mean") as cap:
        assert [len(layer._forward_hooks) for layer in layers] == [n + (i in (1, 3)) for i, n in enumerate(before)]
        a, b = cap.run(first), cap.run(second)
    assert [len(layer._forward_hooks) for layer in layers] == before
    torch.testing.assert_close(a[1], capture(model, adapter, first, [1], "mean")[1])
    assert not torch.allclose(a[3], b[3])
    with pytest.raises(RuntimeError, match="inside its 'with' block"):
        cap.run(first)


def test_forward_until_stops_after_the_layer_and_leaves_no_hook():
    adapter = get_adapter("llava")
    model, processor = tiny("llava")
    inputs = adapter.build_inputs(processor, *stimuli(adapter, 1), TEMPLATE)
    layers = adapter.decoder_layers(model)
    ran, not_ran = CallCounter(layers[1]), CallCounter(layers[2])
    before = list(layers[1]._forward_hooks)
    forward_until(model, adapter, inputs, 1)
    assert ran.calls == 1 and not_ran.calls == 0
    assert list(layers[1]._forward_hooks) == before
    ran.handle.remove()
    not_ran.handle.remove()


def test_bf16_model_captures_in_float32_close_to_fp32():
    adapter = get_adapter("qwen2")
    model, tokenizer = adapter.build_untrained(seed=0)
    inputs = adapter.build_inputs(tokenizer, [None, None], CAPTIONS, TEMPLATE)
    full = capture(model, adapter, inputs, [1], "mean")[1]
    half = capture(model.to(torch.bfloat16), adapter, inputs, [1], "mean")[1]
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.05)
