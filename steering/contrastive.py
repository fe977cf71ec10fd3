"""Contrastive sets for the published defences (docs/methods.md §4), and their activations.

Four kinds of file, all JSON Lines (one JSON object per line, blank lines ignored):

* prompt files (harmful / harmless): ``{"prompt": "...", "image": "optional/path.png"}``;
  a relative image path is relative to the file's folder;
* response files (refusal / compliant): ``{"response": "..."}``.

:func:`load_prompts` and :func:`load_responses` read a user's files, with errors naming
the file, the line and the field. The small default sets in ``steering/data/`` were
written for this project (short, mild, no third-party benchmark prompt copied in; see
``steering/data/README.md``): :meth:`ContrastiveSets.default`.

:func:`prompt_states` and :func:`response_states` record decoder-layer outputs of a
model over such items (for the refusal direction, MARS and IAR), and
:func:`neutral_images` makes MARS's plain random-colour images.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_FILES = {
    "harmful": DATA_DIR / "harmful_prompts.jsonl",
    "harmless": DATA_DIR / "harmless_prompts.jsonl",
    "refusal": DATA_DIR / "refusal_responses.jsonl",
    "compliant": DATA_DIR / "compliant_responses.jsonl",
}


class PromptItem(NamedTuple):
    """One prompt of a contrastive set: its text and, optionally, an image file."""

    prompt: str
    image: str | None = None


def _records(path: str | Path, field: str, allowed: set[str]) -> list[tuple[int, dict]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; give a JSON Lines file with one {{\"{field}\": ...}} object per line")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object with field {field!r}, got {type(row).__name__}")
        unknown = sorted(set(row) - allowed)
        if unknown:
            raise ValueError(f"{path}:{number}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
        value = row.get(field)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{path}:{number}: field {field!r} must be a non-empty string")
        if value != value.strip():
            raise ValueError(f"{path}:{number}: field {field!r} has leading or trailing whitespace; remove it")
        rows.append((number, row))
    if not rows:
        raise ValueError(f"{path}: no items; write one JSON object per line with the field {field!r}")
    return rows


def load_prompts(path: str | Path) -> list[PromptItem]:
    """Prompt items from a JSONL file of ``{"prompt": str, "image": optional path}`` objects.

    Image paths are resolved against the file's folder and must exist (checked here,
    before any model runs).
    """
    path = Path(path)
    items = []
    for number, row in _records(path, "prompt", {"prompt", "image"}):
        image = row.get("image")
        if image is not None:
            if not isinstance(image, str) or not image:
                raise ValueError(f"{path}:{number}: field 'image' must be a file path (string) or absent")
            resolved = (path.parent / image).resolve()
            if not resolved.is_file():
                raise FileNotFoundError(f"{path}:{number}: image {image!r} not found (looked for {resolved})")
            image = str(resolved)
        items.append(PromptItem(row["prompt"], image))
    return items


def load_responses(path: str | Path) -> list[str]:
    """Responses from a JSONL file of ``{"response": str}`` objects."""
    return [row["response"] for _number, row in _records(path, "response", {"response"})]


@dataclass(frozen=True)
class ContrastiveSets:
    """Harmful and harmless prompts, refusal and compliant responses."""

    harmful: list[PromptItem]
    harmless: list[PromptItem]
    refusal: list[str]
    compliant: list[str]

    @classmethod
    def default(cls) -> ContrastiveSets:
        """The small default sets shipped in ``steering/data/`` (32 prompts and 24 responses of each kind)."""
        return cls.from_files()

    @classmethod
    def with_defaults(cls, **given) -> tuple:
        """The given sets (keywords harmful, harmless, refusal, compliant) in the order given,
        each one left as None replaced by the shipped default of its kind."""
        if any(value is None for value in given.values()):
            default = cls.default()
            given = {kind: getattr(default, kind) if value is None else value for kind, value in given.items()}
        return tuple(given.values())

    @classmethod
    def from_files(cls, harmful: str | Path | None = None, harmless: str | Path | None = None,
                   refusal: str | Path | None = None, compliant: str | Path | None = None) -> ContrastiveSets:
        """The sets from the given files; a file left out is the default set of that kind."""
        given = {"harmful": harmful, "harmless": harmless, "refusal": refusal, "compliant": compliant}
        paths = {kind: Path(p) if p is not None else DEFAULT_FILES[kind] for kind, p in given.items()}
        return cls(load_prompts(paths["harmful"]), load_prompts(paths["harmless"]),
                   load_responses(paths["refusal"]), load_responses(paths["compliant"]))


def neutral_images(n: int, seed: int = 0, size: int = 32) -> list:
    """``n`` plain images, each one uniform random RGB colour (MARS's neutral images), seeded."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    colours = torch.randint(0, 256, (n, 3), generator=g).tolist()
    return [Image.new("RGB", (size, size), tuple(c)) for c in colours]


def open_image(path: str | None):
    """The RGB image at ``path`` (None stays None)."""
    if path is None:
        return None
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


def device_batch(model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The model's inputs (caption mask dropped) on its device, floating tensors in its dtype."""
    from steering.models import model_inputs

    param = next(model.parameters())
    return {k: v.to(param.device, param.dtype if v.is_floating_point() else v.dtype) if isinstance(v, torch.Tensor) else v
            for k, v in model_inputs(inputs).items()}


def _layer_hooks(model: nn.Module, layers: Sequence[int], store: dict[int, torch.Tensor]):
    from steering.steerers.base import decoder_layers

    modules = decoder_layers(model)

    def keep(layer):
        def hook(module, args, output):
            store[layer] = (output[0] if isinstance(output, tuple) else output).detach().float().cpu()
        return hook

    return [modules[layer].register_forward_hook(keep(layer)) for layer in layers]


def _images(items: Sequence[PromptItem], images: Sequence[Any] | None) -> list:
    if images is not None:
        if len(images) != len(items):
            raise ValueError(f"{len(images)} images for {len(items)} prompts; give one image (or None) per prompt")
        return list(images)
    return [open_image(item.image) for item in items]


@torch.no_grad()
def prompt_states(model: nn.Module, processor, items: Sequence[PromptItem], layers: Sequence[int], n_positions: int = 1,
                  images: Sequence[Any] | None = None, batch_size: int = 8) -> dict[int, torch.Tensor]:
    """Outputs of decoder ``layers`` at the last ``n_positions`` tokens of each chat-formatted prompt.

    Each item is one user turn (its image, if any, then its text) plus the generation
    prompt, built by the model's adapter. ``images`` overrides the items' image files
    (e.g. MARS's neutral images). Returns ``{layer: float32 [n_items, n_positions, d]}``
    on the CPU; position ``-1`` (the last column) is the state that produces the first
    generated token. Works with left or right padding.
    """
    from steering.models import get_adapter
    from steering.steerers.base import check_layers

    if not items:
        raise ValueError("prompt_states: no prompts given")
    layers = check_layers(model, layers)
    adapter = get_adapter(model)
    images = _images(items, images)
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        inputs = adapter.build_inputs(processor, images[start:start + batch_size], [item.prompt for item in chunk])
        mask = inputs["attention_mask"].bool()
        if (mask.sum(1) < n_positions).any():
            raise ValueError(f"prompt_states: a prompt has fewer than n_positions={n_positions} tokens")
        positions = torch.arange(mask.shape[1]).expand_as(mask)
        last = torch.where(mask, positions, -1).amax(1)  # last attended position of each row
        index = last[:, None] - torch.arange(n_positions - 1, -1, -1)[None]  # [batch, n_positions], ascending
        store: dict[int, torch.Tensor] = {}
        handles = _layer_hooks(model, layers, store)
        try:
            model(**device_batch(model, inputs), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        rows = torch.arange(len(chunk))[:, None]
        for layer in layers:
            out[layer].append(store[layer][rows, index])
    return {layer: torch.cat(parts) for layer, parts in out.items()}


def post_instruction_positions(model: nn.Module, processor, prompt: str = "Hello") -> int:
    """How many chat-template tokens follow the user's instruction (Arditi et al.'s post-instruction positions).

    Counted on one rendered prompt: the attended tokens after the instruction's last token
    (the adapter's caption mask marks the instruction).
    """
    from steering.models import get_adapter
    from steering.models.base import CAPTION_MASK

    inputs = get_adapter(model).build_inputs(processor, [None], [prompt])
    mask, instruction = inputs["attention_mask"][0].bool(), inputs[CAPTION_MASK][0]
    last_instruction = int(instruction.nonzero().max())
    return int(mask[last_instruction + 1:].sum())


@torch.no_grad()
def response_states(model: nn.Module, processor, queries: Sequence[PromptItem], responses: Sequence[str],
                    layers: Sequence[int], extra_hooks: Mapping[str, nn.Module] | None = None):
    """States at the last token of each (query, response) chat: the user's query then the assistant's response.

    ``queries[i]`` is answered by ``responses[i]``. Returns ``(layer_states, extra)``:
    ``{layer: float32 [n, d]}`` from the decoder layers' outputs and, for each named
    module in ``extra_hooks``, the INPUT of that module at the same token (``{name: [n, ...]}``;
    IAR reads each attention block's ``o_proj`` input, the heads' outputs).
    """
    from steering.steerers.base import check_layers

    if len(queries) != len(responses) or not queries:
        raise ValueError(f"response_states: {len(queries)} queries and {len(responses)} responses; give one response per query")
    layers = check_layers(model, layers)
    tokenizer = getattr(processor, "tokenizer", processor)
    states: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    extra: dict[str, list[torch.Tensor]] = {name: [] for name in (extra_hooks or {})}
    for query, response in zip(queries, responses):
        image = open_image(query.image)
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": query.prompt}]
        messages = [{"role": "user", "content": content},
                    {"role": "assistant", "content": [{"type": "text", "text": response}]}]
        text = processor.apply_chat_template(messages, tokenize=False)
        end = text.rfind(response)
        if end < 0:
            raise ValueError(f"the chat template changed the response {response!r}; strip surrounding whitespace")
        suffix = text[end + len(response):]
        n_suffix = len(tokenizer(suffix, add_special_tokens=False)["input_ids"]) if suffix else 0
        inputs = (processor(text=[text], images=[image], return_tensors="pt") if image is not None
                  else processor(text=[text], return_tensors="pt"))
        position = inputs["input_ids"].shape[1] - 1 - n_suffix  # the response's last token
        store: dict[int, torch.Tensor] = {}
        handles = _layer_hooks(model, layers, store)
        kept: dict[str, torch.Tensor] = {}
        for name, module in (extra_hooks or {}).items():
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, name=name: kept.__setitem__(name, args[0].detach().float().cpu())))
        try:
            model(**device_batch(model, inputs), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        for layer in layers:
            states[layer].append(store[layer][0, position])
        for name in extra:
            extra[name].append(kept[name][0, position])
    return ({layer: torch.stack(v) for layer, v in states.items()},
            {name: torch.stack(v) for name, v in extra.items()})
