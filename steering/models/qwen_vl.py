"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``).

Layout in transformers 5: ``model.model.visual`` is the vision tower (its own ``blocks``),
``model.model.language_model`` the Qwen2 text model whose ``layers`` are the decoder layers.

Position ids (M-RoPE): the processor returns ``image_grid_thw`` and ``mm_token_type_ids``;
the model's own forward turns them, with ``input_ids`` and ``attention_mask``, into 3-D
position ids (``get_rope_index``: text tokens count up, image tokens get temporal/height/
width positions; left padding is handled by the attention mask). Capture passes the
processor's output unchanged to that forward, so the rotary embedding is exactly the
model's; only the forward is stopped early.

Offline build: the model classes, configs, ``Qwen2VLImageProcessor``, ``Qwen2VLVideoProcessor`` and the
``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` are the real ones; the tokenizer is a
byte-level BPE trained on a fixed word list with Qwen's special tokens, and the chat
template is a compact equivalent of Qwen's (system turn, ``<|vision_start|><|image_pad|>
<|vision_end|>`` per image, ``<|im_start|>assistant`` generation prompt).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from steering.models.base import LoadedModel, ModelAdapter, build_offline_tokenizer, tiny_text_config

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PATCH_SIZE = 8
MERGE_SIZE = 2


def mrope_section(head_dim: int) -> list[int]:
    """Temporal/height/width split of the rotary half-dimension in Qwen's proportions (64 -> 16, 24, 24)."""
    half = head_dim // 2
    height = width = (half - half // 4) // 2
    return [half - height - width, height, width]


class Qwen2VLAdapter(ModelAdapter):
    """Qwen2-VL: decoder layers at ``model.model.language_model.layers``."""

    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    model_class_name = "Qwen2VLForConditionalGeneration"
    offline_processor_class_name = "Qwen2VLProcessor"

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self._attr_path(model, "model.language_model.layers")

    def vision_tower(self, model: nn.Module) -> nn.Module:
        return self._attr_path(model, "model.visual")

    def _vision_config(self, text_hidden: int) -> dict:
        return dict(depth=2, embed_dim=32, hidden_size=text_hidden, num_heads=2, mlp_ratio=2,
                    patch_size=PATCH_SIZE, spatial_merge_size=MERGE_SIZE, temporal_patch_size=2)

    def build_untrained(self, seed: int = 0, **size: Any) -> LoadedModel:
        import transformers
        from transformers import AutoConfig, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        tokenizer = build_offline_tokenizer(
            SPECIAL_TOKENS, CHAT_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left"
        )
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        text = tiny_text_config(f"{self.family}_text", tokenizer, size)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1_000_000.0,
                                   "mrope_section": mrope_section(text["hidden_size"] // text["num_attention_heads"])}
        config = AutoConfig.for_model(
            self.family, text_config=text, vision_config=self._vision_config(text["hidden_size"]),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        )
        model = self._seeded(self.model_class_name, config, seed)
        image_processor = Qwen2VLImageProcessor(
            patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=2,
            size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32},
        )
        video_processor = Qwen2VLVideoProcessor(patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=2)
        processor_class = getattr(transformers, self.offline_processor_class_name)
        processor = processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=video_processor, chat_template=CHAT_TEMPLATE)
        return LoadedModel(model, processor)


class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: same layout as Qwen2-VL (``model.model.language_model.layers``), windowed vision tower."""

    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    model_class_name = "Qwen2_5_VLForConditionalGeneration"
    offline_processor_class_name = "Qwen2_5_VLProcessor"

    def _vision_config(self, text_hidden: int) -> dict:
        return dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text_hidden,
                    patch_size=PATCH_SIZE, spatial_merge_size=MERGE_SIZE, temporal_patch_size=2,
                    window_size=2 * PATCH_SIZE * MERGE_SIZE, fullatt_block_indexes=[1])
