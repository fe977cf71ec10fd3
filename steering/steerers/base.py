"""The interface every steering method implements, and the registry of methods.

A steerer is a context manager over a Hugging Face model. On entry it registers a
forward hook on each chosen decoder layer of the language model (found through the
model's adapter, :func:`steering.models.get_adapter`); the hook adds
``delta(layer, z)`` to the layer's output hidden state at every position of every
forward call, so it acts on the prompt during prefill and on each generated token
during decoding with the KV cache on. The delta is a function of each position's
activation alone, so padded batches are steered exactly as single prompts (padding
positions are masked out by attention and never influence real ones). On exit the
hooks are removed.

One file per method, each registering its class here with :func:`register`. The class
carries what callers need: :attr:`Steerer.needs_dictionary`, :attr:`Steerer.fitted`,
:meth:`Steerer.build` (from the common :class:`BuildOptions`; a fitted defence also names
its fit options' dataclass, ``fit_config``) and
:meth:`Steerer.before_generation` (per-item work). ``daco steer``, ``daco eval``,
``steering``'s exports and the benchmarks derive their method lists from
:data:`STEERERS`, and ``__init__.py`` imports every module of the package, so adding a
method touches its module and its test.
"""

from __future__ import annotations

import abc
import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from steering.config import Config

DEFAULT_LAYERS: tuple[int, ...] = (15, 16, 17, 18, 19)
"""The layers the DACO paper steers (docs/methods.md §1.3)."""

IndexSets = Sequence[int] | Mapping[int, Sequence[int]]
"""Atom or concept indices: one list for every layer, or a dict layer -> list."""

STEERERS: dict[str, type[Steerer]] = {}


def register(name: str):
    """Class decorator adding a steerer to :data:`STEERERS` under ``name``."""

    def add(cls):
        if name in STEERERS:
            raise ValueError(f"a steerer named {name!r} is already registered ({STEERERS[name].__name__})")
        cls.name = name
        STEERERS[name] = cls
        return cls

    return add


def get_steerer(name: str) -> type[Steerer]:
    """The steerer class registered as ``name`` (see :data:`STEERERS`)."""
    try:
        return STEERERS[name]
    except KeyError:
        raise ValueError(f"unknown steering method {name!r}; choose one of {sorted(STEERERS)}") from None


def parse_layers(spec: str | Iterable[int] | None) -> tuple[int, ...]:
    """Layers from ``"15-19"``, ``"3,5,8-9"`` or a list of ints (None: :data:`DEFAULT_LAYERS`)."""
    if spec is None:
        return DEFAULT_LAYERS
    if not isinstance(spec, str):
        return tuple(sorted({int(i) for i in spec}))
    layers: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"bad layer list {spec!r}: write layers as '15-19' or '3,5,8-9'")
        lo = int(m.group(1))
        layers.update(range(lo, int(m.group(2) or lo) + 1))
    return tuple(sorted(layers))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers, through the model family's adapter."""
    from steering.models import get_adapter

    return get_adapter(model).decoder_layers(model)


def check_layers(model: nn.Module, layers: Iterable[int]) -> tuple[int, ...]:
    """``layers`` sorted, after checking the model has each of them (the adapter's clear error if not)."""
    from steering.models import get_adapter

    return tuple(get_adapter(model).check_layers(model, [int(i) for i in layers]))


def index_sets(indices: IndexSets, layers: Sequence[int], size: Mapping[int, int], what: str) -> dict[int, torch.Tensor]:
    """Per-layer index tensors from one list for all layers or a dict per layer, range-checked.

    ``size[layer]`` is the number of atoms (or concepts) at that layer; ``what`` names
    the argument in errors.
    """
    out = {}
    for layer in layers:
        if isinstance(indices, Mapping):
            if layer not in indices:
                raise ValueError(f"{what} has no entry for layer {layer}; give one for every steered layer {list(layers)}")
            chosen = indices[layer]
        else:
            chosen = indices
        idx = torch.as_tensor(list(chosen), dtype=torch.long)
        bad = idx[(idx < 0) | (idx >= size[layer])]
        if bad.numel():
            raise ValueError(f"{what} at layer {layer}: indices {bad.tolist()[:5]} are outside 0..{size[layer] - 1}")
        if idx.unique().numel() != idx.numel():
            raise ValueError(f"{what} at layer {layer} lists an index more than once")
        out[layer] = idx
    return out


def per_layer(value: float | Mapping[int, float], layers: Sequence[int], what: str) -> dict[int, float]:
    """One float for every layer, or a dict layer -> float checked to cover ``layers``."""
    if isinstance(value, Mapping):
        missing = [layer for layer in layers if layer not in value]
        if missing:
            raise ValueError(f"{what} has no value for layer(s) {missing}; give one for every steered layer {list(layers)}")
        return {layer: float(value[layer]) for layer in layers}
    return {layer: float(value) for layer in layers}


def disjoint(undesirable: Mapping[int, torch.Tensor], desirable: Mapping[int, torch.Tensor]) -> None:
    """Raise if an index is both undesirable and desirable at some layer."""
    for layer, neg in undesirable.items():
        both = set(neg.tolist()) & set(desirable[layer].tolist())
        if both:
            raise ValueError(f"layer {layer}: indices {sorted(both)[:5]} are both undesirable and desirable")


def dictionary_sets(dictionary, layers, undesirable, desirable):
    """Directions per layer and concept index sets from a :class:`steering.ConceptDictionary`.

    ``undesirable``/``desirable`` are concept ids or row indices (default: the dictionary's
    own polarity labels). Returns ``(directions_by_layer, undesirable_rows, desirable_rows)``.
    """
    vectors = {layer: dictionary.directions(layer) for layer in layers}
    return (vectors,
            _rows(dictionary, dictionary.undesirable() if undesirable is None else undesirable),
            _rows(dictionary, dictionary.desirable() if desirable is None else desirable))


def _rows(dictionary, concepts) -> list[int]:
    concepts = list(concepts)
    names = [c for c in concepts if isinstance(c, str)]
    index = dict(zip(names, dictionary.indices(names)))  # unknown names: an error listing the closest
    return [index[c] if isinstance(c, str) else int(c) for c in concepts]


@dataclasses.dataclass
class BuildOptions:
    """The common options every registered steerer is built from (:meth:`Steerer.build`)."""

    model: nn.Module
    """The Hugging Face model to steer."""
    processor: Any = None
    """Its processor or tokenizer (to measure ``norms`` and to fit defences)."""
    layers: Sequence[int] = DEFAULT_LAYERS
    """The decoder layers the dictionary methods steer."""
    dictionary: Any = None
    """The :class:`~steering.dictionary.ConceptDictionary` (methods whose ``needs_dictionary`` is true)."""
    gamma: float = 0.1
    """Strength of the additive dictionary methods (:data:`steering.steerers.from_dictionary.STRENGTH_UNIT`)."""
    norms: Mapping[int, float] | None = None
    """Mean activation norm per steered layer, gamma's unit (None: measured with ``processor``)."""
    sae_dir: str | None = None
    """daco: folder with one trained SAE per layer (``<sae_dir>/layer_<l>/``); None: dictionary-initialised SAEs."""
    k: int = 32
    """daco without ``sae_dir``: TopK k of the dictionary-initialised SAE (capped at the number of concepts)."""
    eta: float = 0.5
    """daco: cosine threshold of the annotation's centroid rule (docs/methods.md §3)."""
    sets: Any = None
    """Fitted defences: the :class:`~steering.contrastive.ContrastiveSets` to fit on (None: the shipped sets)."""
    fit: Config | None = None
    """Fitted defences: the method's ``fit_config`` (e.g. ``IARFitConfig``); None: its defaults."""


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class Steerer(abc.ABC):
    """A steering method: a context manager adding ``delta(layer, z)`` at each steered layer.

    Subclasses implement :meth:`delta` (and :meth:`_to` to move their tensors to the
    model's device and dtype); a method that edits the prompt instead (prompting)
    overrides :meth:`edit_messages`. ``tokens_steered[layer]`` counts the positions
    (prompt and generated, padding included) the hook has changed since entry.
    """

    name: ClassVar[str] = ""
    needs_dictionary: ClassVar[bool] = False
    """Whether :meth:`build` steers with the concept dictionary (callers require ``--dictionary``)."""
    fitted: ClassVar[bool] = False
    """Whether the method is a defence fitted on contrastive sets, with ``fit``, ``save`` and ``load``."""

    @classmethod
    @abc.abstractmethod
    def build(cls, options: BuildOptions) -> Steerer:
        """The method's steerer from the common options (what ``daco steer`` and ``daco eval`` call)."""

    def __init__(self, model: nn.Module | None, layers: Iterable[int]):
        self.model = model
        self.layers = check_layers(model, layers) if model is not None else tuple(sorted(set(layers)))
        self.tokens_steered = {layer: 0 for layer in self.layers}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @abc.abstractmethod
    def delta(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """The change added to the activation ``z`` ([..., d]) at ``layer``, same shape and dtype."""

    def edit_messages(self, messages: list[dict]) -> list[dict]:
        """The chat messages to generate from (unchanged, except for prompt-based methods)."""
        return messages

    def before_generation(self, processor, prompts: Sequence[str], images: Sequence | None = None) -> list[dict] | None:
        """Per-item work before generating on a batch (one image or None per prompt), inside the ``with`` block.

        Every caller (``daco steer``, ``daco eval``) calls it before each generation; methods
        whose steer depends on the item override it (RAS assesses the risk, MARS re-centres
        only items with an image). Returns per-item details to print, or None.
        """
        return None

    def describe(self, detail: dict) -> str:
        """One line for ``daco steer`` to print about an item's :meth:`before_generation` detail."""
        return ", ".join(f"{key} {value}" for key, value in detail.items())

    def _to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move the method's tensors to the model's device and dtype (called on entry)."""

    def __enter__(self) -> Steerer:
        if self._handles:
            raise RuntimeError(f"{type(self).__name__} is already active; exit it before entering again")
        if self.model is None:
            return self
        param = next(self.model.parameters())
        self._to(param.device, param.dtype)
        modules = decoder_layers(self.model)
        self.tokens_steered = {layer: 0 for layer in self.layers}
        self._handles = [modules[layer].register_forward_hook(self._hook(layer)) for layer in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def active(self) -> bool:
        """Whether the hooks are registered (inside the ``with`` block)."""
        return bool(self._handles)

    def _hook(self, layer: int):
        def add_delta(module, args, output):
            hidden = _hidden(output)
            self.tokens_steered[layer] += hidden.shape[:-1].numel()
            steered = hidden + self.delta(layer, hidden)
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        return add_delta


@torch.no_grad()
def record_activations(model: nn.Module, layers: Iterable[int], inputs: Mapping[str, torch.Tensor],
                       pooling: str | None = None) -> dict[int, torch.Tensor]:
    """Output hidden states of decoder ``layers`` for one forward pass over ``inputs``.

    ``pooling=None`` gives every non-padding position as rows [n_tokens, d];
    ``"mean"`` (over each sequence's non-padding positions) or ``"last"`` (its last
    non-padding position) gives one row per sequence [batch, d]. Float32, on the CPU.
    """
    if pooling not in (None, "mean", "last"):
        raise ValueError(f"pooling must be None, 'mean' or 'last', not {pooling!r}")
    layers = check_layers(model, layers)
    modules = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}

    def capture(layer):
        def hook(module, args, output):
            captured[layer] = _hidden(output).detach().float().cpu()
        return hook

    handles = [modules[layer].register_forward_hook(capture(layer)) for layer in layers]
    try:
        model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    first = captured[layers[0]]
    mask = inputs.get("attention_mask")
    mask = torch.ones(first.shape[:2], dtype=torch.bool) if mask is None else mask.bool().cpu()
    out = {}
    for layer, h in captured.items():
        if pooling is None:
            out[layer] = h[mask]
        elif pooling == "mean":
            out[layer] = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        else:
            last = mask.shape[1] - 1 - mask.flip(1).float().argmax(1)  # last True position (any padding side)
            out[layer] = h[torch.arange(h.shape[0]), last]
    return out
