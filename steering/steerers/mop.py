"""MOP / PaCE steering: sparse-code each activation on the concept dictionary (docs/methods.md §2).

For every position: solve ``z ~ D^T c`` over the unit-normalised dictionary (elastic
net, or PaCE's low-rank least squares), then
``z' = z - sum_{K-} c_i D_i + gamma sum_{K+} D_i``; the residual ``z - D^T c`` is kept.
The solve runs once per position per steered layer, which is why MOP is the slowest
method per generated token. It runs in ``solve_dtype`` (float32 by default, float64 on
request) whatever the model's dtype: a bf16 solve is off by about a third and never
reaches its tolerance. Only the delta is cast back to the model's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from steering import sparse_coding
from steering.dictionary import unit_rows
from steering.steerers.base import (DEFAULT_LAYERS, BuildOptions, IndexSets, Steerer, dictionary_sets, disjoint, index_sets, per_layer,
                                    register)

SOLVERS = ("elastic_net", "lstsq")


@register("mop")
class MOPSteerer(Steerer):
    """Steer by removing the undesirable concepts' sparse codes and adding desirable concepts.

    Args:
        model: a Hugging Face model.
        dictionary_by_layer: decoder layer -> concept directions [n_concepts, d] (rows are
            unit-normalised here); the steered layers are its keys.
        undesirable: concept (row) indices K-, one list for all layers or a dict per layer.
        desirable: concept indices K+, likewise.
        gamma: how much of each desirable unit direction to add: one value, or a dict layer ->
            value (``daco steer`` / ``daco eval`` pass γ times the layer's mean activation norm).
        solver: ``"elastic_net"`` (PaCE's objective; ``alpha``, ``tau``) or ``"lstsq"``
            (PaCE's released code: least squares after a rank-``rank`` embedding).
        max_iter, tol: the elastic net's iteration cap and stopping tolerance per solve.
        solve_dtype: the dtype of the dictionary and the solve (float32 or float64), whatever
            the model's dtype.
    """

    needs_dictionary = True

    def __init__(self, model: nn.Module | None, dictionary_by_layer: Mapping[int, torch.Tensor], undesirable: IndexSets,
                 desirable: IndexSets = (), gamma: float | Mapping[int, float] = 0.0, solver: str = "elastic_net", alpha: float = 0.1,
                 tau: float = 0.9, rank: int = 500, max_iter: int = 1000, tol: float = 1e-6,
                 solve_dtype: torch.dtype = torch.float32):
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, not {solver!r}")
        if solve_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"solve_dtype must be torch.float32 or torch.float64, not {solve_dtype}")
        if not dictionary_by_layer:
            raise ValueError("dictionary_by_layer is empty: give the concept directions of each layer to steer")
        super().__init__(model, dictionary_by_layer.keys())
        self.solve_dtype = solve_dtype
        self.dictionary = {layer: unit_rows(torch.as_tensor(d).to(solve_dtype)) for layer, d in dictionary_by_layer.items()}
        sizes = {layer: d.shape[0] for layer, d in self.dictionary.items()}
        undesirable = index_sets(undesirable, self.layers, sizes, "undesirable")
        desirable = index_sets(desirable, self.layers, sizes, "desirable")
        disjoint(undesirable, desirable)
        self.undesirable = {layer: idx.tolist() for layer, idx in undesirable.items()}
        self.desirable = {layer: idx.tolist() for layer, idx in desirable.items()}
        self.gamma = per_layer(gamma, self.layers, "gamma")
        self.solver, self.alpha, self.tau, self.rank = solver, alpha, tau, rank
        self.max_iter, self.tol = max_iter, tol
        self._solvers: dict[int, object] = {}

    @classmethod
    def build(cls, options: BuildOptions) -> MOPSteerer:
        """From ``options.dictionary`` with gamma in its unit (:mod:`steering.steerers.from_dictionary`)."""
        from steering.steerers.from_dictionary import strengths

        return cls.from_dictionary(options.model, options.dictionary, options.layers, gamma=strengths(options))

    @classmethod
    def from_dictionary(cls, model: nn.Module | None, dictionary, layers=DEFAULT_LAYERS, undesirable=None,
                        desirable=None, **kwargs) -> MOPSteerer:
        """From a :class:`steering.ConceptDictionary` (concept sets default to its polarity labels)."""
        vectors, undesirable, desirable = dictionary_sets(dictionary, layers, undesirable, desirable)
        return cls(model, vectors, undesirable, desirable, **kwargs)

    def _to(self, device, dtype) -> None:
        """Move the dictionary to the model's device only: the solve stays in ``solve_dtype``."""
        moved = {layer: d.to(device=device) for layer, d in self.dictionary.items()}
        if any(moved[layer] is not d for layer, d in self.dictionary.items()):
            self.dictionary, self._solvers = moved, {}  # solvers are rebuilt for the new device

    def prepare(self) -> MOPSteerer:
        """Build every layer's solver now (otherwise on the first token), e.g. before timing."""
        for layer in self.layers:
            self._solver(layer)
        return self

    def _solver(self, layer: int):
        """The layer's solver, built once per dictionary (what every solve reuses is precomputed)."""
        if layer not in self._solvers:
            d = self.dictionary[layer]
            self._solvers[layer] = (sparse_coding.ElasticNetSolver(d, self.alpha, self.tau)
                                    if self.solver == "elastic_net" else sparse_coding.LowRankLstsq(d, self.rank))
        return self._solvers[layer]

    def codes(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """The sparse codes c ([..., n_concepts], in ``solve_dtype``) of ``z`` on the layer's unit-normalised dictionary."""
        flat = z.reshape(-1, z.shape[-1]).to(self.dictionary[layer].dtype)
        solver = self._solver(layer)
        c = solver.solve(flat, max_iter=self.max_iter, tol=self.tol) if self.solver == "elastic_net" else solver.solve(flat)
        return c.reshape(*z.shape[:-1], c.shape[-1])

    @torch.no_grad()
    def delta(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """``-sum_{K-} c_i D_i + gamma sum_{K+} D_i`` for ``z`` ([..., d]): solved in ``solve_dtype``, cast to ``z.dtype``."""
        c = self.codes(layer, z)
        delta = sparse_coding.mop_delta(self.dictionary[layer], c, self.undesirable[layer], self.desirable[layer],
                                        self.gamma[layer])
        return delta.to(z.dtype)
