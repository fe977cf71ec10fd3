"""Activation capture: pooled residual-stream outputs of chosen decoder layers, from a stopped forward.

    adapter = get_adapter(model)
    inputs = adapter.build_inputs(processor, images, captions, "{caption}")
    pooled = capture(model, adapter, inputs, layers=[15, 16, 17, 18, 19], pooling="mean")
    # {15: Tensor[batch, hidden] float32, ...}

What is captured: the output of decoder layer ``l`` (``adapter.decoder_layers(model)[l]``),
i.e. the residual stream after layer ``l``, before any final norm. In transformers'
``output_hidden_states=True`` numbering that is ``hidden_states[l + 1]`` (index 0 is the
embeddings), except for the model's last layer, whose ``hidden_states[-1]`` is replaced
by the output of the final norm.

Pooling over token positions, computed inside the hook so a ``[batch, seq, hidden]``
tensor is never kept: ``"mean"`` over attended tokens (image, template and caption
tokens), ``"caption"`` over the caption's tokens only (``caption_mask`` from
``build_inputs``), ``"last"`` the last attended token. Padding (left or right) is never
pooled. Pooling accumulates in float32 whatever the model's dtype.

The stopped forward: the model's own ``forward`` runs (vision tower, merging the image
features, its own position ids, including Qwen2-VL's 3-D M-RoPE positions computed from
``image_grid_thw``/``mm_token_type_ids``/``attention_mask``, and its attention masks), and
the hook on the deepest requested layer raises a private exception once that layer's
output is pooled; the exception is caught here. No later layer, no final norm, no LM head
and no logits run. ``use_cache=False`` so no KV cache is built.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from steering.models.base import CAPTION_MASK, ModelAdapter, model_inputs

POOLINGS = ("mean", "caption", "last")
DEFAULT_LAYERS = (15, 16, 17, 18, 19)


class _StopForward(Exception):
    """Raised by the deepest hook to end the forward pass; never escapes this module."""


def _layer_output(output: Any) -> torch.Tensor:
    """The hidden states a decoder layer returned (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _model_batch(model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The model's inputs from a ``build_inputs`` batch, on its device (floating ones in its dtype)."""
    parameter = next(model.parameters())
    batch = {}
    for key, value in model_inputs(inputs).items():
        if isinstance(value, torch.Tensor):
            dtype = parameter.dtype if value.is_floating_point() else value.dtype
            value = value.to(parameter.device, dtype)
        batch[key] = value
    return batch


def _run_stopped(model: nn.Module, inputs: Mapping[str, Any], stop_layer: str) -> None:
    """``model(**inputs)`` under inference mode, expecting a hook to stop it with :class:`_StopForward`."""
    try:
        with torch.inference_mode():
            model(**_model_batch(model, inputs), use_cache=False)
    except _StopForward:
        return
    raise RuntimeError(f"{type(model).__name__}'s forward finished without reaching {stop_layer}")


def forward_until(model: nn.Module, adapter: ModelAdapter, inputs: Mapping[str, Any], layer: int) -> None:
    """Run the model's forward on a ``build_inputs`` batch and stop right after decoder layer ``layer``.

    The bare stopped forward (one stop hook, no pooling, nothing returned):
    :class:`ActivationCapture` does the same plus pooling; the capture benchmark times both.
    """
    (layer,) = adapter.check_layers(model, [layer])

    def stop(module, args, output):
        raise _StopForward

    handle = adapter.decoder_layers(model)[layer].register_forward_hook(stop)
    try:
        _run_stopped(model, inputs, f"decoder layer {layer}")
    finally:
        handle.remove()


def pooling_weights(attention_mask: torch.Tensor, pooling: str, caption_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[batch, seq]`` float32 weights summing to 1 per row: which token positions a pooling averages.

    Raises ValueError for an unknown pooling, a missing caption mask, or a row with no
    token to pool (empty input, or a caption truncated away).
    """
    attended = attention_mask.bool()
    if pooling == "mean":
        selected = attended
    elif pooling == "caption":
        if caption_mask is None:
            raise ValueError("pooling='caption' needs the caption_mask that ModelAdapter.build_inputs returns")
        selected = attended & caption_mask.bool()
    elif pooling == "last":
        positions = torch.arange(attended.shape[1], device=attended.device).expand_as(attended)
        last = torch.where(attended, positions, -1).amax(dim=1)
        selected = positions == last[:, None]
    else:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    counts = selected.sum(dim=1, keepdim=True)
    if (counts == 0).any():
        empty = (counts[:, 0] == 0).nonzero()[:, 0].tolist()
        raise ValueError(f"pooling={pooling!r}: batch items {empty} have no token to pool (empty input or caption)")
    return selected.float() / counts


class LayerHooks:
    """Context manager: a forward hook on each chosen decoder layer that keeps what :meth:`keep`
    makes of the layer's output, the deepest one stopping the forward (the base of
    :class:`ActivationCapture` and ``steering.token_activations.TokenCapture``).
    Layers are checked on construction; hooks are removed on exit."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, layers: Sequence[int]):
        self.model = model
        self.adapter = adapter
        self.layers = adapter.check_layers(model, layers)
        self._kept: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def keep(self, hidden: torch.Tensor) -> torch.Tensor:
        """What to keep of a hooked layer's output hidden states [batch, seq, hidden]."""
        raise NotImplementedError

    def __enter__(self):
        decoder_layers = self.adapter.decoder_layers(self.model)
        for index in self.layers:
            self._handles.append(decoder_layers[index].register_forward_hook(self._hook(index, index == self.layers[-1])))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, index: int, stop: bool):
        def hook(module, args, output):
            self._kept[index] = self.keep(_layer_output(output))
            if stop:
                raise _StopForward

        return hook

    def _forward(self, inputs: Mapping[str, Any]) -> dict[int, torch.Tensor]:
        """One stopped forward; what :meth:`keep` made of each hooked layer's output."""
        if not self._handles:
            raise RuntimeError(f"{type(self).__name__}.run must be called inside its 'with' block")
        self._kept = {}
        _run_stopped(self.model, inputs, f"decoder layer {self.layers[-1]}")
        kept, self._kept = self._kept, {}
        missing = [layer for layer in self.layers if layer not in kept]
        if missing:
            raise RuntimeError(f"layers {missing} of {type(self.model).__name__} did not run before the stop layer")
        return kept


class ActivationCapture(LayerHooks):
    """Context manager: pooling hooks on chosen decoder layers, the deepest one stopping the forward.

    ``with ActivationCapture(model, adapter, layers, pooling) as cap: cap.run(inputs)``
    returns ``{layer: Tensor[batch, hidden]}`` (float32, on the model's device) and may be
    called for several batches; hooks are removed on exit. Layers are checked on entry.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter, layers: Sequence[int] = DEFAULT_LAYERS,
                 pooling: str = "mean"):
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        super().__init__(model, adapter, layers)
        self.pooling = pooling
        self._weights: torch.Tensor | None = None

    def keep(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bs,bsd->bd", self._weights.to(hidden.device), hidden.float())

    def run(self, inputs: Mapping[str, Any]) -> dict[int, torch.Tensor]:
        """One stopped forward over a batch from ``build_inputs``; the pooled captures per layer."""
        self._weights = pooling_weights(inputs["attention_mask"], self.pooling, inputs.get(CAPTION_MASK))
        try:
            return self._forward(inputs)
        finally:
            self._weights = None


def capture(model: nn.Module, adapter: ModelAdapter, inputs: Mapping[str, Any],
            layers: Sequence[int] = DEFAULT_LAYERS, pooling: str = "mean") -> dict[int, torch.Tensor]:
    """Pooled outputs of ``layers`` for one batch from ``adapter.build_inputs``, from a stopped forward.

    Returns ``{layer: Tensor[batch, hidden]}`` in float32 on the model's device.
    """
    with ActivationCapture(model, adapter, layers, pooling) as cap:
        return cap.run(inputs)
