"""The base of every stage's options dataclass (``ConceptsConfig``, ``ClipConfig``, ...).

A config file has one section per stage; :meth:`StageConfig.from_dict` builds the
stage's dataclass from its section, rejecting unknown keys with the valid ones named,
and runs the stage's own :meth:`StageConfig.validate`.
"""

from __future__ import annotations

import dataclasses
import types
import typing


def type_matches(value, hint) -> bool:
    """Whether a config value (as YAML or JSON gives it) fits a field's annotation: int (not bool),
    float (an int is fine), str, bool, ``list[X]``, ``dict``, ``X | None``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(type_matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(type_matches(v, args[0]) for v in value) if args else \
            isinstance(value, (list, tuple))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) if isinstance(hint, type) else str(hint).replace("typing.", "")


class StageConfig:
    """Mixin for a stage's options dataclass."""

    @classmethod
    def from_dict(cls, data: dict, where: str = "config"):
        """Build from a config section; unknown keys and invalid values name ``where``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{where}: unknown option(s) {unknown}; valid: {sorted(names)}")
        hints = typing.get_type_hints(cls)
        for name, value in data.items():
            if not type_matches(value, hints[name]):
                raise ValueError(f"{where}.{name}: {value!r} is a {type(value).__name__}; expected "
                                 f"{_type_name(hints[name])}")
        cfg = cls(**data)
        cfg.validate(where)
        return cfg

    def validate(self, where: str) -> None:
        """Raise ValueError naming ``where`` and the option when a value is invalid."""

def validate_accelerator(value: str | None, where: str) -> None:
    """Check a model stage's ``accelerator`` option: None (no hint), or a Beam accelerator
    resource hint such as ``"type:nvidia-l4;count:1;install-nvidia-driver"``."""
    if value is None:
        return
    parts = dict(part.partition(":")[::2] for part in str(value).split(";") if part)
    if not parts.get("type") or not str(parts.get("count", "")).isdigit() or int(parts["count"]) < 1:
        raise ValueError(f"{where}.accelerator: {value!r} is not a Beam accelerator hint; write "
                         "'type:GPU_TYPE;count:N;install-nvidia-driver' (e.g. type:nvidia-l4;count:1;"
                         "install-nvidia-driver), or leave it null to run on the worker's CPU")


def on_accelerator(transform, accelerator: str | None):
    """``transform`` with Beam's ``accelerator`` resource hint when one is configured (runners
    that place work by hints, e.g. Dataflow, then run it on GPU workers); unchanged otherwise."""
    return transform.with_resource_hints(accelerator=accelerator) if accelerator else transform


DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
"""The values a stage's ``device`` option takes."""


def resolve_device(device: str) -> str:
    """The torch device a worker runs on ("auto": the first GPU when present, else the CPU)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
