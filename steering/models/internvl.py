"""InternVL as transformers implements it natively (``InternVLForConditionalGeneration``, the ``-hf`` checkpoints).

Layout in transformers 5: ``model.model.vision_tower`` is the InternViT (its own
``encoder.layer``), ``model.model.language_model`` the Qwen2 text model whose ``layers``
are the decoder layers. Positions are ordinary 1-D RoPE positions.

Offline build: the model class and configs (InternVL vision + Qwen2 text),
``GotOcr2ImageProcessor`` (InternVL's tiling image processor), ``InternVLVideoProcessor`` and ``InternVLProcessor``
are the real ones; the tokenizer is a byte-level BPE trained on a fixed word list with
Qwen's special tokens plus ``<img>``, ``</img>``, ``<IMG_CONTEXT>`` and ``<video>``
(declared as the tokenizer's ``start_image_token`` etc., as the hub checkpoints do), and
the chat template is Qwen's with ``<IMG_CONTEXT>`` as the image placeholder.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from steering.models import qwen_vl
from steering.models.base import LoadedModel, ModelAdapter, build_offline_tokenizer, tiny_text_config

IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *IMAGE_TOKENS.values())
CHAT_TEMPLATE = qwen_vl.CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>\n")

IMAGE_SIZE = 32
PATCH_SIZE = 8
DOWNSAMPLE_RATIO = 0.5


class InternVLAdapter(ModelAdapter):
    """InternVL (native transformers port): decoder layers at ``model.model.language_model.layers``."""

    family = "internvl"
    model_types = ("internvl",)
    model_class_name = "InternVLForConditionalGeneration"

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self._attr_path(model, "model.language_model.layers")

    def vision_tower(self, model: nn.Module) -> nn.Module:
        return self._attr_path(model, "model.vision_tower")

    def build_untrained(self, seed: int = 0, **size: Any) -> LoadedModel:
        from transformers import AutoConfig, GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

        tokenizer = build_offline_tokenizer(
            SPECIAL_TOKENS, CHAT_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left",
            extra_special_tokens=IMAGE_TOKENS,
        )
        text = tiny_text_config("qwen2", tokenizer, size, nested=True)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=[IMAGE_SIZE, IMAGE_SIZE], patch_size=[PATCH_SIZE, PATCH_SIZE])
        image_seq_length = int((IMAGE_SIZE // PATCH_SIZE) ** 2 * DOWNSAMPLE_RATIO**2)
        config = AutoConfig.for_model(
            self.family, text_config=text, vision_config=vision, downsample_ratio=DOWNSAMPLE_RATIO,
            image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=image_seq_length,
        )
        model = self._seeded(self.model_class_name, config, seed)
        image_processor = GotOcr2ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                crop_to_patches=True, min_patches=1, max_patches=2)
        video_processor = InternVLVideoProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                                      image_seq_length=image_seq_length, chat_template=CHAT_TEMPLATE)
        return LoadedModel(model, processor)
