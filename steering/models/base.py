"""The adapter interface: what the pipeline and the steerers need to know about a model family.

One :class:`ModelAdapter` subclass per family (one module each) says

* which real transformers classes the family uses (``model_class_name``,
  ``processor_class_name``), so :meth:`ModelAdapter.load` is the real ``from_pretrained``;
* where the LANGUAGE model's decoder layers live (:meth:`ModelAdapter.decoder_layers`),
  named explicitly, never guessed: the vision tower has layers too;
* how a stimulus (image, caption) becomes model inputs (:meth:`ModelAdapter.build_inputs`):
  the processor's own chat template around a configurable prompt template, batched with
  padding and attention masks, plus a ``caption_mask`` of the caption's token positions;
* how to build a tiny seeded model of the same class offline
  (:meth:`ModelAdapter.build_untrained`), flagged ``untrained``.

How the caption's token positions are found (``caption_mask``): the prompt template is
filled with the caption by plain substitution of its single ``{caption}`` field, the chat
template is rendered to text (``apply_chat_template(tokenize=False)``), and the caption's
character span is located in that text: where the chat template puts the prompt is found
by rendering the same conversation with a sentinel string as the prompt (so a caption
that also occurs elsewhere in the template, e.g. "assistant", is not mistaken), and the
filled prompt must be there verbatim (else a clear error). The processor then expands the image placeholders and
tokenizes with ``return_offsets_mapping`` and ``return_text_replacement_offsets``; the span
is shifted past every placeholder expanded before it (the same correction transformers
applies to its assistant-token masks) and every token whose character offsets overlap
the span is a caption token. Zero-width tokens (padding, BOS) never overlap.
"""

from __future__ import annotations

import dataclasses
import importlib
import numbers
from typing import Any, ClassVar, NamedTuple, Sequence

import torch
from torch import nn

CAPTION_FIELD = "{caption}"
CAPTION_MASK = "caption_mask"
"""Key of the caption-token mask in :meth:`ModelAdapter.build_inputs`'s result; not a model input."""

NON_MODEL_INPUTS = (CAPTION_MASK,)

_PROMPT_SENTINEL = "\ue000daco-prompt\ue000"  # private-use characters: never in a chat template

# A fixed word list the offline tokenizers are trained on (plus the prompt templates'
# words); any other text still tokenizes (byte-level BPE has every byte as a fallback).
_OFFLINE_WORDS = """
a an the of and or in on at to with by for from is are was were be this that these those it
its image picture photo shows describe caption what there here one two three some many small
large big little red green blue yellow black white brown dark bright old new young happy sad
man woman person people child boy girl dog cat bird horse cow fish car bus truck bike train
boat plane street road city house building room table chair bed window door tree flower grass
field sky cloud sun water river sea beach mountain snow food plate cup glass bottle ball game
sitting standing walking running riding playing eating holding looking next near under over
front behind top side group couple pair wearing shirt hat cake pizza phone computer book sign
you helpful assistant user system please answer question tell me about scene object concept
danger fire smoke weapon gun knife blood crime violence accident broken dirty clean safe calm
""".split()


class LoadedModel(NamedTuple):
    """A model and its processor (a tokenizer for text-only models); unpacks as a pair."""

    model: Any
    """The transformers model, in eval mode."""
    processor: Any
    """The processor (or tokenizer) that builds its inputs."""


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def is_untrained(model: Any) -> bool:
    """True when the model was randomly initialised by ``build_untrained`` (its outputs mean nothing)."""
    return bool(getattr(model.config, "untrained", False))


def split_template(prompt_template: str) -> tuple[str, str]:
    """The text before and after the single ``{caption}`` field of a prompt template."""
    if not isinstance(prompt_template, str) or prompt_template.count(CAPTION_FIELD) != 1:
        raise ValueError(
            f"prompt_template must contain the field {CAPTION_FIELD} exactly once, got {prompt_template!r}; "
            "e.g. '{caption}' or 'Describe the image. {caption}'"
        )
    before, after = prompt_template.split(CAPTION_FIELD)
    return before, after


TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512)
"""The offline models' text config unless ``build_untrained(**size)`` says otherwise."""


def tiny_text_config(model_type: str, tokenizer: Any, size: dict, nested: bool = False) -> dict:
    """Text-config arguments of an offline model: :data:`TINY_TEXT`, the tokenizer's ids, ``size`` on top.

    ``nested``: the dict also names its ``model_type`` (a text config inside a multimodal one
    whose text model can be of several types). A key of ``size`` that the ``model_type``
    config does not have is an error naming the valid ones.
    """
    from transformers import CONFIG_MAPPING

    fields = {f.name for f in dataclasses.fields(CONFIG_MAPPING[model_type])}
    unknown = sorted(set(size) - fields)
    if unknown:
        raise ValueError(
            f"build_untrained: {unknown} not options of the {model_type} text config; valid: {', '.join(sorted(fields))}"
        )
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    return {**({"model_type": model_type} if nested else {}), **TINY_TEXT, **ids, **size}


def _transformers_class(name: str) -> type:
    return getattr(importlib.import_module("transformers"), name)


class ModelAdapter:
    """What the pipeline and the steerers need to know about one model family.

    Subclasses set the class attributes and implement :meth:`decoder_layers`,
    :meth:`vision_tower` and :meth:`build_untrained`.
    """

    family: ClassVar[str]
    """Short family name, e.g. ``"qwen2_vl"``."""
    model_types: ClassVar[tuple[str, ...]]
    """The ``config.model_type`` values this adapter serves (the registry's keys)."""
    model_class_name: ClassVar[str]
    """The transformers model class, e.g. ``"Qwen2VLForConditionalGeneration"``."""
    processor_class_name: ClassVar[str] = "AutoProcessor"
    """The transformers class whose ``from_pretrained`` loads the processor (or tokenizer)."""
    takes_images: ClassVar[bool] = True
    """False for text-only models: every image given to :meth:`build_inputs` must be None."""

    # -- layers -------------------------------------------------------------------------

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The language model's decoder layers, in order (never the vision tower's)."""
        raise NotImplementedError

    def vision_tower(self, model: nn.Module) -> nn.Module | None:
        """The vision encoder module (None for text-only models)."""
        raise NotImplementedError

    def num_layers(self, model: nn.Module) -> int:
        """How many decoder layers the language model has."""
        return len(self.decoder_layers(model))

    def check_layers(self, model: nn.Module, layers: Sequence[int]) -> list[int]:
        """The requested layers, sorted and de-duplicated; a clear error if one does not exist."""
        layers = list(layers)
        n = self.num_layers(model)
        bad = [l for l in layers if not isinstance(l, numbers.Integral) or isinstance(l, bool) or not 0 <= l < n]
        if not layers or bad:
            raise ValueError(
                f"layers {layers} invalid for {type(model).__name__} ({self.family}): it has {n} decoder "
                f"layers, so valid layers are 0..{n - 1}" + (f"; not there: {bad}" if bad else "; none requested")
                + ". Fix the 'layers' option."
            )
        return sorted({int(l) for l in layers})

    def _attr_path(self, model: nn.Module, path: str) -> nn.Module:
        """``model.<path>``, with an error naming the expected class when the model is not one."""
        obj = model
        for name in path.split("."):
            if not hasattr(obj, name):
                raise TypeError(
                    f"{self.family} adapter expects a {self.model_class_name} (layers at model.{path}); "
                    f"got {type(model).__name__}, which has no '{path}'"
                )
            obj = getattr(obj, name)
        return obj

    # -- inputs -------------------------------------------------------------------------

    def conversation(self, image: Any | None, prompt: str) -> list[dict]:
        """One user turn: the image (if any) first, then the prompt text."""
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
        return [{"role": "user", "content": content}]

    def build_inputs(
        self,
        processor: Any,
        images: Sequence[Any | None],
        texts: Sequence[str],
        prompt_template: str = CAPTION_FIELD,
    ):
        """Model inputs for a batch of (image, caption) stimuli, plus ``caption_mask``.

        Each stimulus is one user turn of the processor's chat template (image first, then
        ``prompt_template`` with ``{caption}`` replaced by the caption) followed by the
        generation prompt. Returns a ``BatchFeature`` of tensors padded to the longest item
        (the processor's padding side), with ``attention_mask`` and ``caption_mask``
        (``[batch, seq]`` bool; see the module docstring for how it is found). Pass
        :func:`model_inputs` of it to the model.
        """
        from transformers import BatchFeature

        before, after = split_template(prompt_template)
        if len(images) != len(texts):
            raise ValueError(f"build_inputs: {len(images)} images but {len(texts)} texts; give one image (or None) per text")
        if not texts:
            raise ValueError("build_inputs: empty batch")
        if not self.takes_images and any(image is not None for image in images):
            raise ValueError(f"{self.family} is a text-only model: pass None for every image")
        rendered, spans = [], []
        for image, caption in zip(images, texts):
            prompt = before + caption + after
            text = self._render(processor, self.conversation(image, prompt))
            start = self._render(processor, self.conversation(image, _PROMPT_SENTINEL)).find(_PROMPT_SENTINEL)
            if start < 0 or text[start : start + len(prompt)] != prompt:
                raise ValueError(
                    f"{self.family}: the chat template changed the prompt text {prompt!r} (e.g. stripped it), "
                    "so the caption's tokens cannot be located; remove leading/trailing whitespace from captions"
                )
            start += len(before)
            rendered.append(text)
            spans.append((start, start + len(caption)))
        present = [image for image in images if image is not None]
        encoded = self._encode(processor, rendered, present or None)
        offsets = encoded.pop("offset_mapping")
        replacements = encoded.pop("text_replacement_offsets", None) or [[] for _ in texts]
        caption_mask = torch.zeros(encoded["input_ids"].shape, dtype=torch.bool)
        for i, (start, end) in enumerate(spans):
            start, end = _shift_past_expansions(start, end, replacements[i])
            token_start, token_end = offsets[i, :, 0], offsets[i, :, 1]
            caption_mask[i] = (token_start < end) & (token_end > start) & encoded["attention_mask"][i].bool()
        data = dict(encoded)
        data[CAPTION_MASK] = caption_mask
        return BatchFeature(data)

    def _render(self, processor: Any, conversation: list[dict]) -> str:
        return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def _encode(self, processor: Any, texts: list[str], images: list | None):
        """Processor call with padding, tensors and the offsets the caption mask needs."""
        return processor(
            text=texts,
            images=images,
            padding=True,
            return_tensors="pt",
            return_offsets_mapping=True,
            return_text_replacement_offsets=True,
        )

    # -- models -------------------------------------------------------------------------

    def load(
        self,
        model_id: str,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        trust_remote_code: bool = False,
    ) -> LoadedModel:
        """The real pretrained model (``*.from_pretrained``) and processor, in eval mode.

        ``dtype`` defaults to bf16 on GPU and fp32 on CPU; ``trust_remote_code`` only when asked.
        """
        dtype = dtype or default_dtype(device)
        model_class = _transformers_class(self.model_class_name)
        processor_class = _transformers_class(self.processor_class_name)
        model = model_class.from_pretrained(model_id, dtype=dtype, trust_remote_code=trust_remote_code)
        processor = processor_class.from_pretrained(model_id, trust_remote_code=trust_remote_code)
        return LoadedModel(model.to(device).eval(), processor)

    def build_untrained(self, seed: int = 0, **size: Any) -> LoadedModel:
        """A tiny randomly initialised model of the family's real class plus an offline processor.

        Deterministic in ``seed``; ``model.config.untrained`` is True. ``size`` overrides
        the tiny text config (e.g. ``num_hidden_layers``, ``hidden_size``).
        """
        raise NotImplementedError

    def _seeded(self, model_class_name: str, config: Any, seed: int) -> nn.Module:
        """``model_class(config)`` with weights drawn from ``seed``, flagged untrained, in eval mode."""
        config.untrained = True
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _transformers_class(model_class_name)(config)
        return model.eval()


def model_inputs(inputs: Any) -> dict:
    """The entries of :meth:`ModelAdapter.build_inputs`'s result that the model's forward takes."""
    return {k: v for k, v in inputs.items() if k not in NON_MODEL_INPUTS}


def _shift_past_expansions(start: int, end: int, replacements: list[dict]) -> tuple[int, int]:
    """A character span of the rendered text, moved to where it is after placeholder expansion."""
    shift_start = shift_end = 0
    for r in replacements:
        gained = (r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0])
        if r["span"][1] <= start:
            shift_start += gained
        if r["span"][1] <= end:
            shift_end += gained
    return start + shift_start, end + shift_end


def build_offline_tokenizer(
    special_tokens: Sequence[str],
    chat_template: str,
    *,
    bos_token: str | None = None,
    eos_token: str,
    pad_token: str,
    add_bos: bool = False,
    padding_side: str = "right",
    extra_special_tokens: dict[str, str] | None = None,
    extra_words: Sequence[str] = (),
):
    """A real fast tokenizer built offline: byte-level BPE trained on a fixed word list.

    ``special_tokens`` (the family's control and image tokens) get the first ids, in the
    order given, then the byte alphabet and the merges. Deterministic: same arguments,
    same vocabulary. Wrapped as ``PreTrainedTokenizerFast`` with the chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = list(_OFFLINE_WORDS) + list(extra_words)
    corpus = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)] + [w.capitalize() for w in words]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    byte_level = processors.ByteLevel(trim_offsets=False)
    if add_bos:
        bos = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A $B",
            special_tokens=[(bos_token, tokenizer.token_to_id(bos_token))],
        )
        tokenizer.post_processor = processors.Sequence([byte_level, bos])
    else:
        tokenizer.post_processor = byte_level
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        padding_side=padding_side,
        chat_template=chat_template,
        extra_special_tokens=extra_special_tokens or {},
        model_max_length=4096,
    )
