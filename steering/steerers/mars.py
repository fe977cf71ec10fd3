"""MARS, modality-agnostic refusal steering, as a steerer (docs/methods.md §4; documented reconstruction).

The paper gives no exact equations; this is the reconstruction docs/methods.md documents:

* Direction: the LLM backbone's text-only refusal direction at one layer,
  ``r = mean(harmful) - mean(harmless)`` of the layer's output at the last prompt
  position (the state that produces the first generated token); ``r_hat = r / |r|``.
* Re-centering: images shift activations; ``offset = mean(h(neutral image + harmless
  text)) - mean(h(harmless text))`` at the same layer and position, the neutral images
  plain random colours (:func:`steering.contrastive.neutral_images`, seeded).
* Gate and trust region: ``s = r_hat . (h - offset)`` for an item WITH an image,
  ``s = r_hat . h`` for a text-only item (the offset measures what an image adds). The
  rule is applied per item (per batch row) in one place, :meth:`MARSSteerer.before_generation`,
  which ``daco steer`` and ``daco eval`` both call; a steerer fitted on a text-only
  model (``recenter=False``) never re-centres. ``c_safe`` / ``c_unsafe`` are the mean projections of the
  harmless / harmful text-only activations. The steer adds ``lambda r_hat`` with
  ``lambda = min(strength * relu(s - c_safe), relu(c_unsafe - s))``: nothing when
  ``s <= c_safe`` (the ReLU gate), and never past the unsafe centroid's projection
  (the trust region). ``strength`` is *not published* (default 1.0).
* Layer: on text-only validation data (a seeded ``validation_fraction`` of each set),
  each candidate layer scores ``separability * max(consistency, 0)``: separability is
  the validation items' d' along the training direction
  ``(mean_harmful - mean_harmless) / sqrt((var_harmful + var_harmless) / 2)``,
  consistency the cosine between the directions of the training and validation
  halves. The best layer is kept; the direction and centroids are then taken from all
  items. The scores are in ``report``.
* Applied at the first generated token only: the last prompt position during prefill
  (see :class:`steering.steerers.fitted.GenerationSteps`; left-padded batches).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from steering.config import Config
from steering.steerers.base import decoder_layers, register
from steering.steerers.fitted import FittedSteerer, GenerationSteps, check_width, load_folder, save_folder


def _split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, validation) index lists, each non-empty."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(max(1, round(fraction * n)), n - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


def layer_scores(harmful: torch.Tensor, harmless: torch.Tensor, fraction: float, seed: int) -> dict[str, float]:
    """Separability (validation d' along the training direction) and consistency (train/validation cosine) of one layer."""
    tr_h, va_h = _split(harmful.shape[0], fraction, seed)
    tr_s, va_s = _split(harmless.shape[0], fraction, seed + 1)
    train = harmful[tr_h].mean(0) - harmless[tr_s].mean(0)
    valid = harmful[va_h].mean(0) - harmless[va_s].mean(0)
    unit = train / train.norm().clamp_min(1e-12)
    p_h, p_s = harmful[va_h] @ unit, harmless[va_s] @ unit
    spread = ((p_h.var(unbiased=False) + p_s.var(unbiased=False)) / 2).sqrt().clamp_min(1e-6)
    separability = ((p_h.mean() - p_s.mean()) / spread).item()
    consistency = torch.cosine_similarity(train, valid, dim=0).item()
    return {"separability": separability, "consistency": consistency, "score": separability * max(consistency, 0.0)}


@dataclasses.dataclass
class MARSFitConfig(Config):
    """The options of :meth:`MARSSteerer.fit` (a documented reconstruction: docs/defences.md)."""

    layers: list[int] | None = None
    """Candidate decoder layers (None: all but the first and the last)."""
    validation_fraction: float = 0.5
    """Share of each text-only set held out to score the candidate layers (seeded)."""
    n_images: int = 8
    """Plain random-colour images measuring the re-centering offset (multimodal models)."""
    image_size: int = 32
    """Side of those images in pixels."""
    seed: int = 0
    """Seed of the validation split and of the images."""
    strength: float = 1.0
    """Gain of the gate (not published)."""
    batch_size: int = 8
    """Prompts per forward pass while fitting."""

    def validate(self, where: str) -> None:
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ValueError(f"{where}.layers: {self.layers!r}; give non-negative layer indices, or null for the default")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"{where}.validation_fraction must be in (0, 1), got {self.validation_fraction}")
        for name in ("n_images", "image_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")
        if self.strength < 0:
            raise ValueError(f"{where}.strength must be >= 0, got {self.strength}")


@register("mars")
class MARSSteerer(FittedSteerer):
    """Gated, trust-region refusal steering at one layer, first generated token only (module docstring).

    Reconstructed (MARS publishes no equations): the gate ``relu(s - c_safe)`` scaled by
    ``strength``, the cap ``c_unsafe - s``, the layer score ``separability * consistency``,
    the offset from plain random-colour images with the harmless texts.

    Args:
        model: a Hugging Face model (None: only :meth:`delta`, on every position given).
        direction: the refusal direction [d] (normalised here).
        layer: the steered decoder layer.
        offset: the multimodal-minus-text re-centering offset [d].
        safe_centroid, unsafe_centroid: projections ``c_safe < c_unsafe`` on ``r_hat``.
        strength: gain of the gate (*not published*).
        recenter: whether the fit measured an offset (a multimodal model); items with an image
            are then re-centred (see :meth:`before_generation`).
        report: the fit's layer scores (saved with the steerer).
    """

    fit_config = MARSFitConfig

    def __init__(self, model: nn.Module | None, direction: torch.Tensor, layer: int, offset: torch.Tensor,
                 safe_centroid: float, unsafe_centroid: float, strength: float = 1.0, recenter: bool = True,
                 report: dict | None = None):
        direction, offset = torch.as_tensor(direction).float(), torch.as_tensor(offset).float()
        if direction.ndim != 1 or direction.norm() == 0 or offset.shape != direction.shape:
            raise ValueError(f"direction must be a non-zero [d] tensor and offset [d] too; got {tuple(direction.shape)} "
                             f"and {tuple(offset.shape)}")
        if not safe_centroid < unsafe_centroid:
            raise ValueError(f"the harmless centroid's projection ({safe_centroid:.4g}) must be below the unsafe "
                             f"centroid's ({unsafe_centroid:.4g}): the direction does not separate the sets")
        if strength < 0:
            raise ValueError(f"strength must be >= 0, not {strength}")
        check_width("MARSSteerer", direction, model, "the direction")
        super().__init__(model, (layer,))
        self.layer = int(layer)
        self.unit, self.offset = direction / direction.norm(), offset
        self.safe_centroid, self.unsafe_centroid = float(safe_centroid), float(unsafe_centroid)
        self.strength, self.recenter, self.report = float(strength), bool(recenter), report or {}
        self._steps = GenerationSteps()
        self.with_image: torch.Tensor | None = None  # per batch row, set by before_generation

    def before_generation(self, processor, prompts: Sequence[str], images: Sequence | None = None) -> None:
        """The re-centering rule, per item: subtract the offset for each prompt that has an image, never otherwise."""
        images = list(images) if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts; give one image (or None) per prompt")
        self.set_images([image is not None for image in images])

    def set_images(self, with_image: Sequence[bool]) -> None:
        """Which rows of the next batch carry an image (and are re-centred when the fit measured an offset)."""
        self.with_image = torch.as_tensor(list(with_image), dtype=torch.bool)

    def _to(self, device, dtype) -> None:
        self.unit, self.offset = self.unit.to(device=device, dtype=dtype), self.offset.to(device=device, dtype=dtype)

    def projection(self, z: torch.Tensor) -> torch.Tensor:
        """``s = r_hat . (z - offset)`` on rows with an image, ``r_hat . z`` on the others; shape ``z.shape[:-1]``.

        ``z`` is [batch, ..., d] with one row per item given to :meth:`before_generation`;
        without a model and without :meth:`set_images`, every row counts as having an image.
        """
        unit = self.unit.to(device=z.device, dtype=z.dtype)
        if not self.recenter:
            return z @ unit
        if self.with_image is None:
            if self.model is not None:
                raise RuntimeError("MARSSteerer: call before_generation(processor, prompts, images) before generating, "
                                   "so that only items with an image are re-centred")
            rows = torch.ones(z.shape[:1] if z.ndim > 1 else (), dtype=z.dtype, device=z.device)
        else:
            if z.ndim < 2 or self.with_image.numel() != z.shape[0]:
                raise ValueError(f"MARSSteerer: {self.with_image.numel()} items were prepared but the batch has "
                                 f"{z.shape[0] if z.ndim > 1 else 1} rows")
            rows = self.with_image.to(device=z.device, dtype=z.dtype)
        shift = rows.reshape(*rows.shape, *([1] * (z.ndim - 1 - rows.ndim))) * (self.offset.to(z.device, z.dtype) @ unit)
        return z @ unit - shift

    def amount(self, z: torch.Tensor) -> torch.Tensor:
        """``lambda = min(strength * relu(s - c_safe), relu(c_unsafe - s))`` per position."""
        s = self.projection(z)
        return torch.minimum(self.strength * torch.relu(s - self.safe_centroid), torch.relu(self.unsafe_centroid - s))

    def delta(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """``lambda r_hat`` at the position producing the first generated token (every position without a model)."""
        added = self.amount(z)[..., None] * self.unit.to(device=z.device, dtype=z.dtype)
        if self.model is not None and z.ndim == 3:
            added = added * (self._steps.steps(z.device) == 0)[None, :, None]
        return added

    def __enter__(self) -> MARSSteerer:
        super().__enter__()
        if self.model is not None:
            self._handles.extend(self._steps.attach(self.model))
        return self

    @classmethod
    @torch.no_grad()
    def fit(cls, model: nn.Module, processor, harmful=None, harmless=None,
            config: MARSFitConfig | None = None, **options) -> MARSSteerer:
        """Choose the layer, extract the direction, centroids and re-centering offset (module docstring).

        ``harmful`` / ``harmless``: text-only :class:`~steering.contrastive.PromptItem` lists
        (default: the shipped sets), at least 2 each. ``config``: the options (None: the
        defaults). For a text-only model the offset is zero and ``recenter`` False.
        ``options``: the config's fields as keywords instead (``layers=[3]``).
        """
        from steering.contrastive import ContrastiveSets, neutral_images, prompt_states
        from steering.models import get_adapter

        config = cls.fit_options(config, options)
        batch_size, seed, n_images = config.batch_size, config.seed, config.n_images
        harmful, harmless = ContrastiveSets.with_defaults(harmful=harmful, harmless=harmless)
        if len(harmful) < 2 or len(harmless) < 2:
            raise ValueError("MARS needs at least 2 harmful and 2 harmless prompts (training and validation halves)")
        if any(item.image for item in (*harmful, *harmless)):
            raise ValueError("MARS fits its direction on text-only prompts; drop the images from the prompt files")
        n_layers = len(decoder_layers(model))
        layers = list(config.layers) if config.layers is not None else list(range(1, n_layers - 1)) or list(range(n_layers))
        text_h = {l: s[:, -1] for l, s in prompt_states(model, processor, harmful, layers, batch_size=batch_size).items()}
        text_s = {l: s[:, -1] for l, s in prompt_states(model, processor, harmless, layers, batch_size=batch_size).items()}
        scores = {l: layer_scores(text_h[l], text_s[l], config.validation_fraction, seed) for l in layers}
        layer = max(layers, key=lambda l: (scores[l]["score"], -l))
        direction = text_h[layer].mean(0) - text_s[layer].mean(0)
        unit = direction / direction.norm()
        safe, unsafe = (text_s[layer] @ unit).mean().item(), (text_h[layer] @ unit).mean().item()
        multimodal = get_adapter(model).takes_images
        if multimodal:
            images = neutral_images(n_images, seed, config.image_size)
            paired = [images[i % n_images] for i in range(len(harmless))]
            with_images = prompt_states(model, processor, harmless, [layer], images=paired, batch_size=batch_size)[layer][:, -1]
            offset = with_images.mean(0) - text_s[layer].mean(0)
        else:
            offset = torch.zeros_like(direction)
        report = {"fit_config": dataclasses.asdict(config), "layer_scores": {str(l): v for l, v in scores.items()},
                  "n_images": n_images if multimodal else 0}
        return cls(model, direction, layer, offset, safe, unsafe, config.strength, multimodal, report)

    def save(self, path: str | Path) -> Path:
        """Write the direction, offset and parameters into the folder ``path``."""
        return save_folder(path, self.name, {"direction": self.unit, "offset": self.offset},
                           {"layer": self.layer, "safe_centroid": self.safe_centroid,
                            "unsafe_centroid": self.unsafe_centroid, "strength": self.strength,
                            "recenter": self.recenter, "report": self.report})

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None, strength: float | None = None,
             recenter: bool | None = None) -> MARSSteerer:
        """The steerer saved in ``path``, on ``model``; ``strength`` / ``recenter`` override the saved ones."""
        tensors, c = load_folder(path, cls.name)
        check_width(path, tensors["direction"], model, "the saved direction")
        return cls(model, tensors["direction"], c["layer"], tensors["offset"], c["safe_centroid"], c["unsafe_centroid"],
                   c["strength"] if strength is None else strength, c["recenter"] if recenter is None else recenter,
                   c["report"])
