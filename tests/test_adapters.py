"""Model adapters: registry, decoder layers, layer checks, inputs and caption masks, offline builds, loading."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from steering.models import (
    CAPTION_MASK,
    FAMILIES,
    REGISTRY,
    default_dtype,
    get_adapter,
    is_untrained,
    model_inputs,
)

MULTIMODAL = [f for f in FAMILIES if get_adapter(f).takes_images]
TEMPLATE = "Describe the image. {caption}"
CAPTIONS = ["a red dog", "two people riding a horse near the river"]


@functools.cache
def tiny(family: str):
    """One seeded tiny model per family, shared by the tests of this file."""
    return get_adapter(family).build_untrained(seed=0)


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def images_for(adapter, n: int):
    rng = np.random.default_rng(0)
    shapes = [(40, 56, 3), (64, 32, 3)]
    return [
        Image.fromarray(rng.integers(0, 255, shapes[i % 2], dtype=np.uint8)) if adapter.takes_images else None
        for i in range(n)
    ]


def test_registry_finds_adapter_by_model_config_and_name():
    model, _ = tiny("qwen2_vl")
    assert get_adapter(model).family == "qwen2_vl"
    assert get_adapter(model.config).family == "qwen2_vl"
    assert get_adapter("llava_next").family == "llava_next"
    assert set(REGISTRY) >= {"qwen2_vl", "qwen2_5_vl", "llava", "llava_next", "internvl", "qwen2", "llama"}
    with pytest.raises(ValueError, match="no model adapter for model_type 'gpt2'.*supported: .*qwen2_vl"):
        get_adapter("gpt2")


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_layers_are_the_language_models_not_the_vision_towers(family):
    adapter = get_adapter(family)
    model, _ = tiny(family)
    layers = adapter.decoder_layers(model)
    text_config = getattr(model.config, "text_config", model.config)
    assert isinstance(layers, torch.nn.ModuleList)
    assert adapter.num_layers(model) == len(layers) == text_config.num_hidden_layers == 4
    embed = model.get_input_embeddings()
    assert all(layer.self_attn.q_proj.in_features == embed.embedding_dim for layer in layers)
    tower = adapter.vision_tower(model)
    if adapter.takes_images:
        tower_modules = {id(m) for m in tower.modules()}
        assert not any(id(m) in tower_modules for layer in layers for m in layer.modules())
        assert any(isinstance(m, torch.nn.ModuleList) and len(m) == 2 for m in tower.modules())  # the tower's own
    else:
        assert tower is None


def test_decoder_layers_of_a_model_of_another_class_is_a_clear_error():
    model, _ = tiny("qwen2")
    with pytest.raises(TypeError, match="expects a LlavaForConditionalGeneration.*got Qwen2ForCausalLM"):
        get_adapter("llava").decoder_layers(model)


@pytest.mark.parametrize("bad", [[4], [-1], [0, 9], [], [True]])
def test_check_layers_rejects_missing_layers_and_says_how_many_exist(bad):
    adapter = get_adapter("llava")
    model, _ = tiny("llava")
    with pytest.raises(ValueError, match="it has 4 decoder layers, so valid layers are 0..3"):
        adapter.check_layers(model, bad)
    assert adapter.check_layers(model, [3, 1, 1]) == [1, 3]


@pytest.mark.parametrize("family", FAMILIES)
def test_build_inputs_marks_exactly_the_caption_tokens(family):
    adapter = get_adapter(family)
    model, processor = tiny(family)
    inputs = adapter.build_inputs(processor, images_for(adapter, 2), CAPTIONS, TEMPLATE)
    tok = tokenizer_of(processor)
    ids, attention, caption = inputs["input_ids"], inputs["attention_mask"].bool(), inputs[CAPTION_MASK]
    assert ids.shape == attention.shape == caption.shape and ids.shape[0] == 2
    assert not attention.all(), "the shorter item is padded"
    assert not (caption & ~attention).any()
    for i, text in enumerate(CAPTIONS):
        assert tok.decode(ids[i][caption[i]]).strip() == text
        whole = tok.decode(ids[i][attention[i]])
        assert "Describe the image. " + text in whole
    if adapter.takes_images:
        image_id = model.config.image_token_id if hasattr(model.config, "image_token_id") else model.config.image_token_index
        assert ((ids == image_id).sum(dim=1) > 0).all()
        assert not (caption & (ids == image_id)).any()
    assert set(model_inputs(inputs)) == set(inputs) - {CAPTION_MASK}


def test_build_inputs_mixes_items_with_and_without_an_image():
    adapter = get_adapter("qwen2_vl")
    model, processor = tiny("qwen2_vl")
    inputs = adapter.build_inputs(processor, [images_for(adapter, 1)[0], None], CAPTIONS, "{caption}")
    image_tokens = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1)
    assert image_tokens[0] > 0 and image_tokens[1] == 0
    assert tokenizer_of(processor).decode(inputs["input_ids"][1][inputs[CAPTION_MASK][1]]).strip() == CAPTIONS[1]


QWEN_TURN_END = "<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("family,caption,after", [("qwen2", "assistant", QWEN_TURN_END), ("llava", "ASSISTANT:", " ASSISTANT:"),
                                                  ("internvl", "system", QWEN_TURN_END)])
def test_caption_mask_finds_a_caption_that_also_occurs_in_the_chat_template(family, caption, after):
    adapter = get_adapter(family)
    _, processor = tiny(family)
    inputs = adapter.build_inputs(processor, images_for(adapter, 1), [caption], "{caption}")
    ids, mask = inputs["input_ids"][0], inputs[CAPTION_MASK][0]
    tok = tokenizer_of(processor)
    assert tok.decode(ids).count(caption) >= 2, "the caption also occurs in the template"
    assert tok.decode(ids[mask]).strip() == caption
    assert tok.decode(ids[mask.nonzero()[-1, 0] + 1 :]) == after, "the user turn's occurrence is the one marked"


@pytest.mark.parametrize("template", ["Describe the image.", "{caption} {caption}", None])
def test_build_inputs_rejects_a_template_without_exactly_one_caption_field(template):
    adapter = get_adapter("llava")
    _, processor = tiny("llava")
    with pytest.raises(ValueError, match="prompt_template must contain the field {caption} exactly once"):
        adapter.build_inputs(processor, [None], ["a dog"], template)


def test_build_inputs_rejects_mismatched_batches_and_images_for_text_models():
    _, processor = tiny("qwen2")
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        get_adapter("qwen2").build_inputs(processor, [None, None], ["a dog"], "{caption}")
    with pytest.raises(ValueError, match="text-only model: pass None"):
        get_adapter("qwen2").build_inputs(processor, images_for(get_adapter("llava"), 1), ["a dog"], "{caption}")


@pytest.mark.parametrize("family", ["qwen2_vl", "internvl"])
def test_build_untrained_is_deterministic_in_the_seed_and_flagged(family):
    adapter = get_adapter(family)
    first, p1 = adapter.build_untrained(seed=3)
    second, p2 = adapter.build_untrained(seed=3)
    other, _ = adapter.build_untrained(seed=4)
    assert is_untrained(first)
    a, b, c = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert tokenizer_of(p1).get_vocab() == tokenizer_of(p2).get_vocab()
    assert type(first).__name__ == adapter.model_class_name


def test_build_untrained_size_overrides_the_text_config():
    model, _ = get_adapter("qwen2_vl").build_untrained(seed=0, num_hidden_layers=6, hidden_size=32)
    assert get_adapter(model).num_layers(model) == 6
    assert model.config.text_config.hidden_size == 32
    with pytest.raises(ValueError, match=r"\['hiden_size'\] not options of the llama text config"):
        get_adapter("llava").build_untrained(seed=0, hiden_size=32)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2"])
def test_load_reads_a_saved_model_with_the_real_from_pretrained(family, tmp_path):
    adapter = get_adapter(family)
    model, processor = tiny(family)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = adapter.load(str(tmp_path), device="cpu")
    assert type(loaded) is type(model) and loaded.dtype == torch.float32 and not loaded.training
    assert is_untrained(loaded)
    images = images_for(adapter, 1)
    inputs = adapter.build_inputs(processor, images, CAPTIONS[:1], TEMPLATE)
    again = adapter.build_inputs(loaded_processor, images, CAPTIONS[:1], TEMPLATE)
    assert torch.equal(inputs["input_ids"], again["input_ids"])
    with torch.no_grad():
        expected = model(**model_inputs(inputs)).logits
        got = loaded(**model_inputs(again)).logits
    torch.testing.assert_close(got, expected)


def test_default_dtype_is_bf16_on_gpu_and_fp32_on_cpu():
    assert default_dtype("cpu") == torch.float32
    assert default_dtype("cuda:0") == torch.bfloat16
