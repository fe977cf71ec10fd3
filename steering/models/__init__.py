"""Model adapters: one per family, found by the model's ``config.model_type``.

    adapter = get_adapter(model)            # or a config, or "qwen2_vl"
    layers = adapter.decoder_layers(model)  # the language model's decoder layers

Families (module: ``model_type`` values):

* ``qwen_vl``: ``qwen2_vl`` (Qwen2-VL), ``qwen2_5_vl`` (Qwen2.5-VL)
* ``llava``: ``llava`` (LLaVA 1.5), ``llava_next`` (LLaVA-NeXT)
* ``internvl``: ``internvl`` (InternVL as transformers implements it natively)
* ``causal_lm``: ``qwen2``, ``llama`` (text-only decoder LMs)

Adding a family touches one module and the ``_ADAPTERS`` line below.
"""

from __future__ import annotations

from typing import Any

from steering.models.base import (
    CAPTION_MASK,
    LoadedModel,
    ModelAdapter,
    default_dtype,
    is_untrained,
    model_inputs,
)
from steering.models.causal_lm import LlamaAdapter, Qwen2Adapter
from steering.models.internvl import InternVLAdapter
from steering.models.llava import LlavaAdapter, LlavaNextAdapter
from steering.models.qwen_vl import Qwen25VLAdapter, Qwen2VLAdapter

_ADAPTERS: tuple[type[ModelAdapter], ...] = (
    Qwen2VLAdapter, Qwen25VLAdapter, LlavaAdapter, LlavaNextAdapter, InternVLAdapter, Qwen2Adapter, LlamaAdapter,
)

REGISTRY: dict[str, type[ModelAdapter]] = {
    model_type: adapter for adapter in _ADAPTERS for model_type in adapter.model_types
}
"""``config.model_type`` (or family name) -> adapter class."""

FAMILIES: tuple[str, ...] = tuple(adapter.family for adapter in _ADAPTERS)


def get_adapter(model_or_config_or_family: Any) -> ModelAdapter:
    """The adapter for a model, its config, or a family / ``model_type`` name.

    Looked up by ``config.model_type`` in :data:`REGISTRY`; an unknown type is an error
    listing the supported ones.
    """
    obj = model_or_config_or_family
    if isinstance(obj, str):
        key = obj
    else:
        config = getattr(obj, "config", obj)
        key = getattr(config, "model_type", None)
        if key is None:
            raise TypeError(f"get_adapter expects a transformers model, config or family name; got {type(obj).__name__}")
    if key not in REGISTRY:
        raise ValueError(f"no model adapter for model_type {key!r}; supported: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[key]()


__all__ = [
    "CAPTION_MASK", "FAMILIES", "LoadedModel", "ModelAdapter", "REGISTRY",
    "default_dtype", "get_adapter", "is_untrained", "model_inputs",
]
