"""What the fitted defences (refusal direction, MARS, IAR, RAS) share.

* :class:`FittedSteerer`, their base class: registered with ``fitted`` true, built by
  fitting on the contrastive sets (:meth:`FittedSteerer.build`). ``fit`` takes the model,
  its processor, the sets and one config object, the class's :attr:`FittedSteerer.fit_config`
  (``RefusalFitConfig``, ``MARSFitConfig``, ``IARFitConfig``, ``RASFitConfig``, each beside its
  steerer, a :class:`steering.config.Config` whose defaults are the faithful method); the
  fitted steerer's report records it as ``fit_config``.
* A saved steerer is a folder with ``steerer.safetensors`` (its tensors) and
  ``steerer.json`` (method name, format version, every parameter and the fit report):
  :func:`save_folder` / :func:`load_folder`. Extraction runs once; ``load(dir, model)``
  rebuilds the steerer without touching the contrastive data.
* :class:`GenerationSteps` tells hooks which positions of the current forward call
  produce the n-th generated token (MARS steers only the first, RAS the first N).
* :func:`final_norm` finds the language model's final norm (RAS steers after it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from steering.config import Config
from steering.steerers.base import BuildOptions, Steerer

TENSORS_FILENAME = "steerer.safetensors"
CONFIG_FILENAME = "steerer.json"
FORMAT_VERSION = 1


class FittedSteerer(Steerer):
    """A defence fitted on contrastive sets (``fit``), saved to a folder (``save``) and loaded back (``load``)."""

    fitted = True
    fit_config: ClassVar[type[Config]]
    """The dataclass of ``fit``'s options; its defaults are the faithful method."""

    @classmethod
    def fit_sets(cls, sets) -> tuple:
        """The contrastive sets ``fit`` takes after (model, processor): the harmful and harmless prompts."""
        return sets.harmful, sets.harmless

    @classmethod
    def build(cls, options: BuildOptions) -> FittedSteerer:
        """Fit on ``options.sets`` (None: the shipped sets) with ``options.fit`` (None: the defaults)."""
        sets = cls.fit_sets(options.sets) if options.sets is not None else ()
        return cls.fit(options.model, options.processor, *sets, config=options.fit)

    @classmethod
    def fit_options(cls, config: Config | Mapping[str, Any] | None,
                    options: Mapping[str, Any] | None = None) -> Config:
        """The fit options: ``config`` checked as this method's :attr:`fit_config` (types and values),
        or one built from a mapping of its fields, given as ``config`` or as keyword ``options``
        (``fit(model, tok, layers=[3])``; unknown names are errors listing the valid ones);
        neither: the defaults."""
        if isinstance(config, Mapping):
            config, options = None, {**config, **(options or {})}
        if options:
            if config is not None:
                raise TypeError(f"{cls.__name__}.fit takes a {cls.fit_config.__name__} or keyword options, not both")
            return cls.fit_config.from_dict(dict(options), f"{cls.__name__}.fit")
        if config is None:
            return cls.fit_config()
        if not isinstance(config, cls.fit_config):
            raise TypeError(f"{cls.__name__}.fit takes a {cls.fit_config.__name__}, not a {type(config).__name__}")
        return config.checked(cls.fit_config.__name__)


def save_folder(path: str | Path, method: str, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Path:
    """Write ``tensors`` (safetensors) and ``config`` (JSON, with the method name and format version) into ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(path / TENSORS_FILENAME),
              metadata={"method": method})
    document = {"method": method, "format_version": FORMAT_VERSION, **config}
    (path / CONFIG_FILENAME).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return path


def load_folder(path: str | Path, method: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, config)`` from a folder written by :func:`save_folder` for ``method``; clear errors otherwise."""
    path = Path(path)
    for p in (path / CONFIG_FILENAME, path / TENSORS_FILENAME):
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing: a saved steerer folder holds {CONFIG_FILENAME} and {TENSORS_FILENAME}")
    config = json.loads((path / CONFIG_FILENAME).read_text())
    if config.get("method") != method:
        raise ValueError(f"{path / CONFIG_FILENAME}: this folder holds a {config.get('method')!r} steerer, not {method!r}")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path / CONFIG_FILENAME}: format_version {config.get('format_version')!r} is not supported "
                         f"(expected {FORMAT_VERSION}); fit the steerer again")
    return load_file(str(path / TENSORS_FILENAME)), config


def check_width(path_or_name: Any, tensor: torch.Tensor, model: nn.Module | None, what: str) -> None:
    """Raise if ``tensor``'s last dimension is not the model's hidden size."""
    if model is None:
        return
    hidden = model.get_input_embeddings().weight.shape[1]
    if tensor.shape[-1] != hidden:
        raise ValueError(f"{path_or_name}: {what} has width {tensor.shape[-1]} but the model's hidden size is {hidden}; "
                         "load a steerer fitted on this model")


def final_norm(model: nn.Module) -> nn.Module:
    """The language model's final norm: the ``norm`` of the module that holds the decoder layers."""
    from steering.steerers.base import decoder_layers

    layers = decoder_layers(model)
    for module in model.modules():
        if getattr(module, "layers", None) is layers and isinstance(getattr(module, "norm", None), nn.Module):
            return module.norm
    raise TypeError(f"{type(model).__name__}: no final norm next to its decoder layers (expected a 'norm' module)")


def _cache_in(args: tuple, kwargs: dict) -> Any:
    """The KV cache among a call's arguments, found by what it is (has ``get_seq_length``), not by
    the keyword ``generate`` happens to pass it under (``past_key_values=``, ``cache=``, ...)."""
    for value in (*args, *kwargs.values()):
        if callable(getattr(value, "get_seq_length", None)):
            return value
    return None


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer is called on: its first [batch, seq, d] tensor argument."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.ndim == 3:
            return value
    raise TypeError("a decoder layer was called without a [batch, seq, hidden] tensor; cannot track generation steps")


class GenerationSteps:
    """Tracks which positions of each forward call produce which generated token.

    It reads what the first decoder layer actually computes on, whatever names ``generate``
    gives its keyword arguments: the hidden states' length L (the positions of this call)
    and the KV cache's length before the call (``get_seq_length()`` of the cache object among
    the layer's arguments, found by type). A call that starts an empty cache is the prefill
    of a new prompt of length P; afterwards, absolute position ``p`` produces generated
    token ``p - (P - 1)`` (0 = the first generated token: the prompt's last position).
    :meth:`steps` gives that index for every column of the current call. Batches must be
    left-padded (as decoder-only generation is), so the last column is every row's last
    prompt token; a right-padded prefill is an error (checked on the model's
    ``attention_mask`` input when it has one). Without a KV cache every call is taken as a
    new prompt (only its last position is step 0).
    """

    def __init__(self):
        self.prompt_length = 0
        self.start = 0
        self.length = 0
        self._right_padded = False

    def attach(self, model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        """Register the tracking pre-hooks on ``model``; remove the returned handles to stop."""
        from steering.steerers.base import decoder_layers

        return [model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True),
                decoder_layers(model)[0].register_forward_pre_hook(self._layer_pre_hook, with_kwargs=True)]

    def _model_pre_hook(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self._right_padded = isinstance(mask, torch.Tensor) and mask.ndim == 2 and not bool(mask[:, -1].all())

    def _layer_pre_hook(self, module, args, kwargs):
        length = _hidden_in(args, kwargs).shape[1]
        cache = _cache_in(args, kwargs)
        start = int(cache.get_seq_length()) if cache is not None else 0
        if start == 0:
            if self._right_padded:
                raise ValueError("a right-padded batch: the last position is padding for some rows, so the first "
                                 "generated token's position is not the last column; pad on the left "
                                 "(tokenizer.padding_side = 'left'), as decoder-only generation needs")
            self.prompt_length = length
        self.start, self.length = start, length

    def steps(self, device: torch.device | None = None) -> torch.Tensor:
        """Generated-token index of each column of the current call ([seq]; negative inside the prompt)."""
        return torch.arange(self.start, self.start + self.length, device=device) - (self.prompt_length - 1)
