"""What the model stages' configs share: the ``accelerator`` resource hint and the ``device`` option.

Every stage's options dataclass (``ConceptsConfig``, ``ClipConfig``, ...) is a
:class:`steering.config.Config`: built from its config-file section, overridden from the
command line through :meth:`~steering.config.Config.override`.
"""

from __future__ import annotations


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
