"""Model loading and greedy generation shared by ``daco steer`` and ``daco eval``.

:func:`load_model` loads a pretrained model through its family's adapter, or builds a
tiny seeded untrained one (``untrained:FAMILY``) sized to the dictionary and the steered
layers. :func:`generate` answers one (image, prompt) greedily, optionally inside a
steerer: the steerer edits the chat messages, then its per-item step
(:meth:`~steering.steerers.Steerer.before_generation`: RAS's risk, MARS's re-centering
rule) runs inside the ``with`` block and the timed region.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

UNTRAINED_PREFIX = "untrained:"
"""A model spec ``untrained:FAMILY`` builds a tiny randomly initialised model of that family."""


class LoadedModel(NamedTuple):
    """A model ready to generate: the model (eval mode, on its device), its processor, adapter and display name."""

    model: Any
    processor: Any
    adapter: Any
    name: str


class Generation(NamedTuple):
    """One greedy response: its text, generated token count, seconds, and the steerer's per-item details."""

    text: str
    new_tokens: int
    seconds: float
    details: list[dict] | None


def load_model(spec: str, d: int | None = None, layers: Sequence[int] = (), seed: int = 0, device: str = "cpu",
               images: bool = False) -> LoadedModel:
    """The pretrained model ``spec`` (id or folder), or ``untrained:FAMILY`` sized to hidden size ``d`` and ``layers``.

    Raises ValueError when the family is unknown, ``images`` are asked of a text-only
    family (checked before the model is built), the hidden size is not ``d``, or the
    model lacks one of ``layers``.
    """
    from steering.models import get_adapter

    if spec.startswith(UNTRAINED_PREFIX):
        adapter = get_adapter(spec[len(UNTRAINED_PREFIX):])
        _check_images(adapter, images)
        size = ({"hidden_size": d} if d is not None else {}) | (
            {"num_hidden_layers": max(layers) + 1} if layers else {})
        model, processor = adapter.build_untrained(seed=seed, **size)
        name = (f"untrained {adapter.family} (seed {seed}, hidden {model.get_input_embeddings().weight.shape[1]}, "
                f"{len(adapter.decoder_layers(model))} layers)")
    else:
        from transformers import AutoConfig

        adapter = get_adapter(AutoConfig.from_pretrained(spec))
        _check_images(adapter, images)
        model, processor = adapter.load(spec, device=device)
        name = spec
    hidden = model.get_input_embeddings().weight.shape[1]
    if d is not None and hidden != d:
        raise ValueError(f"the dictionary has d={d} but {name} has hidden size {hidden}; "
                         "use the dictionary built from this model")
    if layers:
        adapter.check_layers(model, list(layers))
    return LoadedModel(model.to(device).eval(), processor, adapter, name)


def _check_images(adapter, images: bool) -> None:
    if images and not adapter.takes_images:
        raise ValueError(f"{adapter.family} is a text-only model family; drop the image")


def generate(model, processor, prompt: str, image=None, steerer=None, max_new_tokens: int = 64,
             seed: int = 0) -> Generation:
    """Greedy response to one (RGB image or None, prompt), steered inside ``steerer`` when given.

    The steerer's per-item step runs inside the timed region; its details (e.g. RAS's
    risk) come back in :attr:`Generation.details`.
    """
    import torch

    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}]
    if steerer is not None:
        messages = steerer.edit_messages(messages)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    kwargs = {"images": [image]} if image is not None else {}
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in processor(text=[text], return_tensors="pt", **kwargs).items()}
    torch.manual_seed(seed)
    details = None
    start = time.perf_counter()
    with torch.no_grad(), (steerer if steerer is not None else contextlib.nullcontext()):
        if steerer is not None:
            details = steerer.before_generation(processor, [prompt], [image])
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    new = out[0, inputs["input_ids"].shape[1]:]
    tokenizer = getattr(processor, "tokenizer", processor)
    return Generation(tokenizer.decode(new, skip_special_tokens=True).strip(), int(new.numel()), seconds, details)
