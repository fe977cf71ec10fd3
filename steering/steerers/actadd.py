"""ActAdd: add a fixed steering vector at every position (docs/methods.md §4).

``h_l <- h_l + c v_l`` where ``v_l`` is either the dictionary combination
``sum_{K+} D_i - sum_{K-} D_i`` (:meth:`ActAddSteerer.from_dictionary`) or the
contrastive-prompt difference ``h_l(p+) - h_l(p-)`` (:meth:`ActAddSteerer.from_prompts`).
The vector does not depend on the activation: every token moves by the same amount,
whether or not it carried the undesirable concepts.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from steering.steerers.base import (DEFAULT_LAYERS, BuildOptions, IndexSets, Steerer, dictionary_sets, disjoint, index_sets,
                                    record_activations, register)


@register("actadd")
class ActAddSteerer(Steerer):
    """Add ``coefficient * vectors_by_layer[layer]`` to the output of each steered layer."""

    needs_dictionary = True

    def __init__(self, model: nn.Module | None, vectors_by_layer: Mapping[int, torch.Tensor], coefficient: float = 1.0):
        if not vectors_by_layer:
            raise ValueError("vectors_by_layer is empty: give a steering vector for each layer to steer")
        super().__init__(model, vectors_by_layer.keys())
        self.coefficient = float(coefficient)
        self.vectors = {}
        for layer, vector in vectors_by_layer.items():
            vector = torch.as_tensor(vector)
            if vector.ndim != 1 or not torch.isfinite(vector).all():
                raise ValueError(f"the steering vector of layer {layer} must be a finite 1-D tensor [d], got shape {tuple(vector.shape)}")
            self.vectors[layer] = vector
        self._added = {layer: self.coefficient * v for layer, v in self.vectors.items()}

    @classmethod
    def build(cls, options: BuildOptions) -> ActAddSteerer:
        """The dictionary's unit directions scaled to gamma's unit (:mod:`steering.steerers.from_dictionary`)."""
        from steering.steerers.from_dictionary import strengths

        strength, dictionary = strengths(options), options.dictionary
        vectors = {layer: dictionary.directions(layer, unit=True) * s for layer, s in strength.items()}
        return cls.from_directions(options.model, vectors, dictionary.undesirable(), dictionary.desirable())

    @classmethod
    def from_directions(cls, model: nn.Module | None, dictionary_by_layer: Mapping[int, torch.Tensor],
                        undesirable: IndexSets, desirable: IndexSets = (), coefficient: float = 1.0) -> ActAddSteerer:
        """``v_l = sum_{K+} D_i - sum_{K-} D_i`` from directions [n_concepts, d] per layer and row indices."""
        layers = sorted(dictionary_by_layer)
        sizes = {layer: d.shape[0] for layer, d in dictionary_by_layer.items()}
        neg = index_sets(undesirable, layers, sizes, "undesirable")
        pos = index_sets(desirable, layers, sizes, "desirable")
        disjoint(neg, pos)
        vectors = {layer: d[pos[layer]].sum(0) - d[neg[layer]].sum(0) for layer, d in dictionary_by_layer.items()}
        return cls(model, vectors, coefficient)

    @classmethod
    def from_dictionary(cls, model: nn.Module | None, dictionary, layers=DEFAULT_LAYERS, undesirable=None,
                        desirable=None, coefficient: float = 1.0) -> ActAddSteerer:
        """From a :class:`steering.ConceptDictionary` (concept sets default to its polarity labels)."""
        vectors, undesirable, desirable = dictionary_sets(dictionary, layers, undesirable, desirable)
        return cls.from_directions(model, vectors, undesirable, desirable, coefficient)

    @classmethod
    def from_prompts(cls, model: nn.Module, processor, positive: str, negative: str, layers=DEFAULT_LAYERS,
                     coefficient: float = 1.0, pooling: str = "mean") -> ActAddSteerer:
        """The contrastive-prompt vector ``v_l = h_l(p+) - h_l(p-)``, each pooled over its tokens.

        Both prompts go through the model's chat template (its adapter's ``build_inputs``);
        ``pooling`` is ``"mean"`` or ``"last"`` (the last token).
        """
        from steering.models import get_adapter, model_inputs

        adapter = get_adapter(model)
        inputs = adapter.build_inputs(processor, [None, None], [positive, negative])
        device = next(model.parameters()).device
        hidden = record_activations(model, layers, {k: v.to(device) for k, v in model_inputs(inputs).items()},
                                    pooling=pooling)
        return cls(model, {layer: h[0] - h[1] for layer, h in hidden.items()}, coefficient)

    def _to(self, device, dtype) -> None:
        self._added = {layer: v.to(device=device, dtype=dtype) for layer, v in self._added.items()}

    def delta(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """``coefficient * v_layer``, broadcast to ``z``'s shape."""
        return self._added[layer].to(device=z.device, dtype=z.dtype).expand_as(z)
