"""LLaVA 1.5 and LLaVA-NeXT (``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``).

Layout in transformers 5: ``model.model.vision_tower`` is the CLIP vision model (its own
``encoder.layers``), ``model.model.language_model`` the Llama (or other) text model whose
``layers`` are the decoder layers. Positions are ordinary 1-D RoPE positions computed by
the text model from the attention mask.

Offline build: the model classes and configs (CLIP vision + Llama text), ``CLIPImageProcessor``
/ ``LlavaNextImageProcessor`` and ``LlavaProcessor`` / ``LlavaNextProcessor`` are the real
ones; the tokenizer is a byte-level BPE trained on a fixed word list with Llama's
``<s>``/``</s>``/``<unk>``/``<pad>`` and ``<image>``, adding ``<s>`` like Llama's; the chat
template is llava-hf's ``USER: <image>\\n... ASSISTANT:`` format.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from steering.models.base import LoadedModel, ModelAdapter, build_offline_tokenizer, tiny_text_config

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

IMAGE_SIZE = 32
PATCH_SIZE = 8


class LlavaAdapter(ModelAdapter):
    """LLaVA 1.5: decoder layers at ``model.model.language_model.layers``."""

    family = "llava"
    model_types = ("llava",)
    model_class_name = "LlavaForConditionalGeneration"

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self._attr_path(model, "model.language_model.layers")

    def vision_tower(self, model: nn.Module) -> nn.Module:
        return self._attr_path(model, "model.vision_tower")

    def _config_extras(self) -> dict:
        return {"image_seq_length": (IMAGE_SIZE // PATCH_SIZE) ** 2}

    def _image_processor(self):
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})

    def _processor(self, image_processor: Any, tokenizer: Any):
        from transformers import LlavaProcessor

        return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=CHAT_TEMPLATE)

    def build_untrained(self, seed: int = 0, **size: Any) -> LoadedModel:
        from transformers import AutoConfig

        tokenizer = build_offline_tokenizer(
            SPECIAL_TOKENS, CHAT_TEMPLATE, bos_token="<s>", eos_token="</s>", pad_token="<pad>", add_bos=True,
            extra_words=("USER", "ASSISTANT"),
        )
        text = tiny_text_config("llama", tokenizer, size, nested=True)
        vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32)
        config = AutoConfig.for_model(
            self.family, text_config=text, vision_config=vision,
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"), **self._config_extras(),
        )
        model = self._seeded(self.model_class_name, config, seed)
        return LoadedModel(model, self._processor(self._image_processor(), tokenizer))


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT: same layout as LLaVA 1.5 (``model.model.language_model.layers``), any-resolution tiles."""

    family = "llava_next"
    model_types = ("llava_next",)
    model_class_name = "LlavaNextForConditionalGeneration"

    _PINPOINTS = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE]]

    def _config_extras(self) -> dict:
        return {"image_grid_pinpoints": self._PINPOINTS}

    def _image_processor(self):
        from transformers import LlavaNextImageProcessor

        return LlavaNextImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                       image_grid_pinpoints=self._PINPOINTS)

    def _processor(self, image_processor: Any, tokenizer: Any):
        from transformers import LlavaNextProcessor

        return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                  chat_template=CHAT_TEMPLATE)
