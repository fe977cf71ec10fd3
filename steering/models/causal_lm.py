"""Text-only decoder LMs (``Qwen2ForCausalLM``, ``LlamaForCausalLM``), used by the steering tests.

Layout: ``model.model.layers`` are the decoder layers; there is no vision tower. The
"processor" is the tokenizer (its chat template renders the prompt); every image passed
to :meth:`~steering.models.base.ModelAdapter.build_inputs` must be None.

Offline build: the model classes and configs are the real ones; the tokenizer is the same
kind of byte-level BPE as the multimodal families', with Qwen's chat template (Qwen2) or
the Vicuna ``USER: ... ASSISTANT:`` template (Llama).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from steering.models import llava, qwen_vl
from steering.models.base import LoadedModel, ModelAdapter, build_offline_tokenizer, tiny_text_config


class _CausalLMAdapter(ModelAdapter):
    """Shared by the text-only families: decoder layers at ``model.model.layers``."""

    processor_class_name = "AutoTokenizer"
    takes_images = False
    _text_model_type: str
    _tokenizer_args: dict

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self._attr_path(model, "model.layers")

    def vision_tower(self, model: nn.Module) -> None:
        return None

    def _encode(self, processor: Any, texts: list[str], images: list | None):
        return processor(text=texts, padding=True, return_tensors="pt", return_offsets_mapping=True)

    def build_untrained(self, seed: int = 0, **size: Any) -> LoadedModel:
        from transformers import AutoConfig

        tokenizer = build_offline_tokenizer(**self._tokenizer_args)
        text = tiny_text_config(self._text_model_type, tokenizer, size)
        config = AutoConfig.for_model(self._text_model_type, **text)
        return LoadedModel(self._seeded(self.model_class_name, config, seed), tokenizer)


class Qwen2Adapter(_CausalLMAdapter):
    """Qwen2 (and Qwen2.5) text models."""

    family = "qwen2"
    model_types = ("qwen2",)
    model_class_name = "Qwen2ForCausalLM"
    _text_model_type = "qwen2"
    _tokenizer_args = dict(special_tokens=qwen_vl.SPECIAL_TOKENS, chat_template=qwen_vl.CHAT_TEMPLATE,
                           eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left")


class LlamaAdapter(_CausalLMAdapter):
    """Llama text models."""

    family = "llama"
    model_types = ("llama",)
    model_class_name = "LlamaForCausalLM"
    _text_model_type = "llama"
    _tokenizer_args = dict(special_tokens=llava.SPECIAL_TOKENS, chat_template=llava.CHAT_TEMPLATE,
                           bos_token="<s>", eos_token="</s>", pad_token="<pad>", add_bos=True,
                           extra_words=("USER", "ASSISTANT"))
