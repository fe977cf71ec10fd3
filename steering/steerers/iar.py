"""IAR, internal activation revision, as a steerer (docs/methods.md §4).

Samples ("Multi-Response"): each harmful query is paired with ``responses_per_query``
refusals (positives) and as many compliant answers (negatives), rendered as a chat
(user: query, assistant: response); the activation is taken at the response's last
token. Units are decoder layers (``level="layer"``: the layer's output) or attention
heads (``level="head"``: each head's slice of the input of the attention block's
``o_proj``, i.e. the head's output before the output projection).

For every candidate unit a logistic probe (scikit-learn, L2, ``probe_c``) is trained on
a seeded split by query (``validation_fraction`` of the queries held out) and scored by
held-out accuracy; the top ``k`` units are kept. Each unit's revision vector is, on all
samples, ``theta = mean(pos) - mean(neg)`` (``direction="mms"``) or the weight of a
probe trained on all samples (``"pwd"``); ``theta_hat = theta / |theta|``.

Steering, by default (``level="head"``, the paper's best variant; top ``k`` = 48 heads)
at the positions ITI edits: the LAST position of every forward call, i.e. the prompt's
last token during prefill and each generated token afterwards (``positions="last"``;
batches must be left-padded, as decoder-only generation is). ``positions="all"`` edits
every position of every call instead. Head level adds ``alpha * sigma_h * theta_hat_h``
to the head's slice of the ``o_proj`` input (``sigma_h``: the population std of all
samples' projections on ``theta_hat_h``); layer level adds ``alpha * theta_hat_l`` to
the layer's output.

*Not published* (parameters): ``k`` (default 48 heads as ITI, 1 layer), ``alpha``
(default 15 as ITI), ``responses_per_query`` (2), the probe's regularisation (C=1), the
response's last token as the read-out position. See docs/defences.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from steering.config import Config
from steering.steerers.base import decoder_layers, register
from steering.steerers.fitted import FittedSteerer, load_folder, save_folder

LEVELS = ("head", "layer")
POSITIONS = ("last", "all")
DIRECTIONS = ("mms", "pwd")


def output_projection(layer_module: nn.Module) -> nn.Module:
    """The attention block's output projection (``self_attn.o_proj``) of a decoder layer."""
    attention = getattr(layer_module, "self_attn", None)
    projection = getattr(attention, "o_proj", None)
    if not isinstance(projection, nn.Module):
        raise TypeError(f"{type(layer_module).__name__} has no self_attn.o_proj: head-level IAR needs per-head outputs")
    return projection


def head_dim(model: nn.Module) -> int:
    """Width of one attention head of the language model (from the first decoder layer)."""
    attention = decoder_layers(model)[0].self_attn
    dim = getattr(attention, "head_dim", None)
    if dim is None:
        raise TypeError(f"{type(attention).__name__} has no head_dim")
    return int(dim)


def fit_probe(x: torch.Tensor, y: torch.Tensor, c: float = 1.0, seed: int = 0):
    """A scikit-learn logistic-regression probe (L2, lbfgs) on ``x`` [n, d], labels ``y`` (1 = positive)."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x.double().numpy(), y.numpy())


def revision_vector(x: torch.Tensor, y: torch.Tensor, direction: str, c: float = 1.0, seed: int = 0) -> torch.Tensor:
    """``theta``: MMS ``mean(x[y=1]) - mean(x[y=0])`` or PWD (the probe's weight vector), float32 [d]."""
    if direction == "mms":
        return x[y == 1].mean(0) - x[y == 0].mean(0)
    return torch.from_numpy(fit_probe(x, y, c, seed).coef_[0]).float()


@dataclasses.dataclass
class IARFitConfig(Config):
    """The options of :meth:`IARSteerer.fit`; the defaults are the paper's best variant (docs/defences.md)."""

    level: str = "head"
    """``"head"`` (revise attention heads, the paper's best) or ``"layer"`` (revise decoder-layer outputs)."""
    direction: str = "mms"
    """Revision vector: ``"mms"`` (mean of refusals minus mean of compliant answers) or ``"pwd"`` (probe weight)."""
    layers: list[int] | None = None
    """Candidate decoder layers (None: every layer)."""
    k: int | None = None
    """Units kept by held-out probe accuracy (None: 48 heads, ITI's K, or 1 layer; not published)."""
    alpha: float = 15.0
    """Strength of the revision (ITI's 15; not published)."""
    responses_per_query: int = 2
    """Refusal and compliant responses paired with each harmful query (not published)."""
    probe_c: float = 1.0
    """Inverse L2 regularisation of the logistic probes (scikit-learn's C; not published)."""
    validation_fraction: float = 0.3
    """Share of the queries held out to score the probes (seeded split by query)."""
    seed: int = 0
    """Seed of the split and of the probes."""
    positions: str = "last"
    """``"last"`` (ITI's: the last position of every forward call) or ``"all"`` (every position)."""

    def validate(self, where: str) -> None:
        for name, allowed in (("level", LEVELS), ("direction", DIRECTIONS), ("positions", POSITIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{where}.{name}: {getattr(self, name)!r} is not one of {allowed}")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ValueError(f"{where}.layers: {self.layers!r}; give non-negative layer indices, or null for all layers")
        for name in ("k", "responses_per_query"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")
        if not self.probe_c > 0:
            raise ValueError(f"{where}.probe_c must be > 0, got {self.probe_c}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"{where}.validation_fraction must be in (0, 1), got {self.validation_fraction}")

    def units(self) -> int:
        """How many units are kept: ``k``, or by default 48 heads (ITI's K) or 1 layer."""
        return self.k if self.k is not None else (1 if self.level == "layer" else 48)


@register("iar")
class IARSteerer(FittedSteerer):
    """Add a revision vector at chosen layers or attention heads, every token (module docstring).

    Reconstructed / not published: ``k``, ``alpha``, responses per query, the probe's C,
    the read-out at the response's last token, the split by query for probe accuracy.

    Args:
        model: a Hugging Face model (None: only :meth:`delta`).
        vectors: ``{layer: added vector}``: for level "layer" ``alpha * theta_hat_l`` [d];
            for level "head" the ``o_proj`` input addition [n_heads * head_dim], zero
            outside the selected heads' slices (see :meth:`from_units`).
        level: ``"head"`` or ``"layer"``.
        report: the fit's units, probe accuracies and parameters (saved with the steerer).
        positions: ``"last"`` (ITI's: the last position of each forward call) or ``"all"``.
    """

    fit_config = IARFitConfig

    def __init__(self, model: nn.Module | None, vectors: dict[int, torch.Tensor], level: str = "head",
                 report: dict | None = None, positions: str = "last"):
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, not {level!r}")
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, not {positions!r}")
        if not vectors:
            raise ValueError("IARSteerer needs at least one layer's revision vector")
        super().__init__(model, vectors.keys())
        self.level, self.report, self.positions = level, report or {}, positions
        self.vectors = {int(l): torch.as_tensor(v).float() for l, v in vectors.items()}
        if model is not None:
            width = (output_projection(decoder_layers(model)[0]).in_features if level == "head"
                     else model.get_input_embeddings().weight.shape[1])
            bad = {l: tuple(v.shape) for l, v in self.vectors.items() if v.shape != (width,)}
            if bad:
                raise ValueError(f"IAR {level}-level vectors must have width {width} for this model; got {bad}")

    @classmethod
    def from_units(cls, model: nn.Module | None, units: dict, level: str, alpha: float, n_heads: int | None = None,
                   head_width: int | None = None, report: dict | None = None, positions: str = "last") -> IARSteerer:
        """From unit directions: ``{layer: theta_hat}`` (layer level) or ``{(layer, head): (theta_hat, sigma)}`` (head level)."""
        if level == "layer":
            return cls(model, {l: alpha * v / v.norm() for l, v in units.items()}, level, report, positions)
        vectors: dict[int, torch.Tensor] = {}
        for (layer, head), (theta, sigma) in units.items():
            vec = vectors.setdefault(layer, torch.zeros(n_heads * head_width))
            vec[head * head_width:(head + 1) * head_width] = alpha * sigma * theta / theta.norm()
        return cls(model, vectors, level, report, positions)

    def _to(self, device, dtype) -> None:
        self.vectors = {l: v.to(device=device, dtype=dtype) for l, v in self.vectors.items()}

    def delta(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """The layer's vector (layer level: on the layer output; head level: on the ``o_proj`` input) at the
        last position of ``z`` ([..., seq, d]) with ``positions="last"``, at every position with ``"all"``."""
        vector = self.vectors[layer].to(device=z.device, dtype=z.dtype)
        if self.positions == "all" or z.ndim < 2:
            return vector.expand_as(z)
        delta = torch.zeros_like(z)
        delta[..., -1, :] = vector
        return delta

    def __enter__(self) -> IARSteerer:
        if self.level == "layer":
            return super().__enter__()
        if self._handles:
            raise RuntimeError("IARSteerer is already active; exit it before entering again")
        if self.model is not None:
            param = next(self.model.parameters())
            self._to(param.device, param.dtype)
            modules = decoder_layers(self.model)
            self.tokens_steered = {layer: 0 for layer in self.layers}
            self._handles = [output_projection(modules[l]).register_forward_pre_hook(self._head_hook(l))
                             for l in self.layers]
        return self

    def _head_hook(self, layer: int):
        def add(module, args):
            heads = args[0]
            self.tokens_steered[layer] += (heads.shape[:-1].numel() if self.positions == "all"
                                           else heads.shape[:-2].numel())
            return (heads + self.delta(layer, heads), *args[1:])

        return add

    @classmethod
    def fit_sets(cls, sets) -> tuple:
        """IAR fits on the harmful prompts, the refusal responses and the compliant responses."""
        return sets.harmful, sets.refusal, sets.compliant

    @classmethod
    @torch.no_grad()
    def fit(cls, model: nn.Module, processor, harmful=None, refusal: Sequence[str] | None = None,
            compliant: Sequence[str] | None = None, config: IARFitConfig | None = None, **options) -> IARSteerer:
        """Record the samples, probe every candidate unit, keep the top ``k`` (module docstring).

        ``harmful``: :class:`~steering.contrastive.PromptItem` queries (default: the shipped
        set; at least 2); ``refusal`` / ``compliant``: response strings (default: shipped).
        ``config``: the options (None: the defaults, the paper's best variant, head-level
        revision of the top 48 heads).
        ``options``: the config's fields as keywords instead (``k=8``).
        """
        from steering.contrastive import ContrastiveSets, response_states

        config = cls.fit_options(config, options)
        level, direction, seed = config.level, config.direction, config.seed
        responses_per_query = config.responses_per_query
        harmful, refusal, compliant = ContrastiveSets.with_defaults(harmful=harmful, refusal=refusal, compliant=compliant)
        if len(harmful) < 2 or not refusal or not compliant:
            raise ValueError("IAR needs at least 2 harmful queries, one refusal and one compliant response")
        modules = decoder_layers(model)
        layers = list(range(len(modules))) if config.layers is None else sorted(set(config.layers))
        k = config.units()
        queries, responses, labels, groups = [], [], [], []
        for i, query in enumerate(harmful):
            for j in range(responses_per_query):
                for label, pool in ((1, refusal), (0, compliant)):
                    queries.append(query)
                    responses.append(pool[(i * responses_per_query + j) % len(pool)])
                    labels.append(label)
                    groups.append(i)
        y = torch.tensor(labels)
        hooks = {str(l): output_projection(modules[l]) for l in layers} if level == "head" else {}
        states, heads = response_states(model, processor, queries, responses, layers, hooks)
        if level == "layer":
            units = {(l, None): states[l] for l in layers}
        else:
            width = head_dim(model)
            units = {(l, h): heads[str(l)][:, h * width:(h + 1) * width]
                     for l in layers for h in range(heads[str(l)].shape[1] // width)}
        order = torch.randperm(len(harmful), generator=torch.Generator().manual_seed(seed)).tolist()
        held = set(order[:min(max(1, round(config.validation_fraction * len(harmful))), len(harmful) - 1)])
        val = torch.tensor([g in held for g in groups])
        accuracy = {unit: float(fit_probe(x[~val], y[~val], config.probe_c, seed).score(x[val].double().numpy(),
                                                                                        y[val].numpy()))
                    for unit, x in units.items()}
        chosen = sorted(units, key=lambda u: (-accuracy[u], u[0], u[1] or 0))[:k]
        thetas = {unit: revision_vector(units[unit], y, direction, config.probe_c, seed) for unit in chosen}
        report = {"fit_config": dataclasses.asdict(config), "k": k, "n_samples": len(labels),
                  "units": [{"layer": l, "head": h, "accuracy": accuracy[(l, h)]} for l, h in chosen],
                  "accuracy": [{"layer": l, "head": h, "accuracy": a} for (l, h), a in accuracy.items()]}
        if level == "layer":
            return cls.from_units(model, {l: thetas[(l, None)] for l, _ in chosen}, level, config.alpha, report=report,
                                  positions=config.positions)
        sigmas = {u: (units[u] @ (t / t.norm())).std(unbiased=False).item() for u, t in thetas.items()}
        n_heads = heads[str(layers[0])].shape[1] // width
        return cls.from_units(model, {u: (thetas[u], sigmas[u]) for u in chosen}, level, config.alpha, n_heads, width,
                              report | {"sigmas": [sigmas[u] for u in chosen]}, config.positions)

    def save(self, path: str | Path) -> Path:
        """Write the per-layer vectors and the report into the folder ``path``."""
        return save_folder(path, self.name, {f"layer_{l}": v for l, v in self.vectors.items()},
                           {"level": self.level, "layers": list(self.layers), "positions": self.positions,
                            "report": self.report})

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None) -> IARSteerer:
        """The steerer saved in ``path``, on ``model``."""
        tensors, config = load_folder(path, cls.name)
        if "positions" not in config:
            raise ValueError(f"{path}: this IAR steerer predates the positions setting; fit it again")
        return cls(model, {l: tensors[f"layer_{l}"] for l in config["layers"]}, config["level"], config["report"],
                   config["positions"])
