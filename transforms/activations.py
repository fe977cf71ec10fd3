"""Activation stage: stimuli -> pooled MLLM activations per (concept, layer, role) (docs/methods.md §1.3).

Each stimulus (its image and caption, in the model's chat template around
``prompt_template``) runs once through the frozen MLLM, however many concepts use
it; the residual stream after each configured decoder layer is pooled over token
positions (``mean`` / ``caption`` / ``last``, see steering/capture.py), with a
forward that stops after the deepest hooked layer. Model-family specifics live in
the adapters (steering/models/); nothing here branches on a model name.

Beam graph: stimuli rows and shard records are joined by (shard, key) (one element per
distinct image), cut into batches fixed by the data alone (:class:`transforms.batching.FixedBatches`), a
``RunInference`` stage with :class:`MLLMActivationHandler`
(one model per worker process; one per GPU, shared across processes, on GPU
workers) computes the pooled vectors, and each is emitted once per (concept,
role) that uses the stimulus, keyed as the directions stage expects:
``((concept_id, layer, role), (key, vector))``.

Counters (namespace ``activations``): ``stimuli`` (stimulus rows read),
``images`` (distinct images run), ``deadletter_missing_record`` (a stimulus whose
(shard, key) no shard holds), ``duplicate_records`` (extra records under one (shard, key)),
``deadletter_ambiguous_record`` (a stimulus whose (shard, key) holds different records),
``deadletter_too_long`` (a stimulus over ``mllm.max_tokens``), ``deadletter_inference`` (a stimulus whose image the model
failed on, after retrying it alone), ``stimuli_emitted`` (stimulus rows whose
vectors went out) and ``emitted`` (vectors out: one per emitted row and layer).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, PredictionResult, RunInference

from steering.capture import DEFAULT_LAYERS, POOLINGS, capture
from steering.models import default_dtype, get_adapter, is_untrained
from steering.config import Config
from transforms.batching import FixedBatches, FixedBatchHandler
from transforms.config import DEVICE_PATTERN, on_accelerator, resolve_device, validate_accelerator
from transforms.counters import Reconciliation
from transforms.deadletter import DEAD, WriteDeadLetters, dead_letter
from transforms.progress import ProgressLog

NAMESPACE = "activations"


@dataclass
class MLLMConfig(Config):
    """Options of the activation stage (the ``mllm:`` section of a config file).

    Attributes:
        model_id: a Hugging Face model id or local folder (``from_pretrained``); None builds
            the tiny seeded model of ``family`` offline (flagged untrained).
        family: the adapter family/model_type for the untrained model (qwen2_vl, qwen2_5_vl,
            llava, llava_next, internvl); with ``model_id`` the model's own config decides.
        untrained_size: config overrides for the untrained model (e.g. num_hidden_layers).
        layers: decoder layers whose residual stream is pooled (the paper: 15-19).
        pooling: "mean" over attended tokens, "caption" tokens only, or "last" token.
        prompt_template: user text around the caption; must contain ``{caption}`` once.
        batch_size: stimuli per forward (batches are sorted by caption length first).
        device: "auto" (first GPU when present), "cpu", "cuda", "cuda:N".
        seed: seed of the untrained model.
        trust_remote_code: passed to ``from_pretrained`` only when set.
        accelerator: Beam accelerator resource hint put on the RunInference step only
            (e.g. "type:nvidia-l4;count:1;install-nvidia-driver"); None: no hint (local runs).
        max_tokens: the most text tokens (the prompt template with the caption) a stimulus may
            have; a longer one is dead-lettered (``too_long``) instead of run, since a forward's
            cost grows with the square of its length. None: the model's text context, at most
            :data:`DEFAULT_MAX_TOKENS`; a value above the context is an error. Image tokens
            are bounded by the processor's resolution settings.
    """

    model_id: str | None = None
    family: str = "qwen2_vl"
    untrained_size: dict = field(default_factory=dict)
    layers: list[int] = field(default_factory=lambda: list(DEFAULT_LAYERS))
    pooling: str = "mean"
    prompt_template: str = "{caption}"
    batch_size: int = 8
    device: str = "auto"
    seed: int = 0
    trust_remote_code: bool = False
    accelerator: str | None = None
    max_tokens: int | None = None

    def validate(self, where: str) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"{where}.max_tokens must be >= 1 (or null: the model's context), got {self.max_tokens}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"{where}.pooling: {self.pooling!r} is not one of {POOLINGS}")
        if self.batch_size < 1:
            raise ValueError(f"{where}.batch_size must be >= 1, got {self.batch_size}")
        if not self.layers:
            raise ValueError(f"{where}.layers: give at least one decoder layer")
        if self.prompt_template.count("{caption}") != 1:
            raise ValueError(f"{where}.prompt_template must contain {{caption}} exactly once, got {self.prompt_template!r}")
        if not re.fullmatch(DEVICE_PATTERN, self.device):
            raise ValueError(f"{where}.device: {self.device!r} is not auto, cpu, cuda or cuda:N")
        get_adapter(self.model_type_hint())  # unknown family: error listing the supported ones
        validate_accelerator(self.accelerator, where)

    def model_type_hint(self) -> str:
        """The adapter key to use before the model is loaded."""
        return self.family


DEFAULT_MAX_TOKENS = 2048
"""``mllm.max_tokens`` when unset: the model's context, but no more than this (captions are
tens of tokens; one of thousands is an error in the corpus, not a stimulus)."""


def token_cap(cfg: MLLMConfig, model) -> int:
    """The text-token cap of a stimulus for ``model`` (see ``MLLMConfig.max_tokens``); a configured
    cap above the model's context is a ValueError naming the option."""
    text_config = getattr(model.config, "text_config", model.config)
    context = getattr(text_config, "max_position_embeddings", None)
    if cfg.max_tokens is None:
        return min(DEFAULT_MAX_TOKENS, context or DEFAULT_MAX_TOKENS)
    if context and cfg.max_tokens > context:
        raise ValueError(f"mllm.max_tokens: {cfg.max_tokens} is above the model's context of {context} tokens; "
                         f"set it to {context} or lower (or null)")
    return cfg.max_tokens


@dataclass
class LoadedMLLM:
    """A loaded model with its processor, adapter and token cap (a class, so Beam can share it by weak reference)."""

    model: Any
    processor: Any
    adapter: Any
    max_tokens: int

    def __iter__(self):
        return iter((self.model, self.processor, self.adapter))


def load_mllm(cfg: MLLMConfig) -> LoadedMLLM:
    """The model, processor and adapter for ``cfg``: ``from_pretrained`` when ``model_id`` is set,
    else the adapter's tiny seeded model (``untrained``)."""
    device = resolve_device(cfg.device)
    if cfg.model_id:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(cfg.model_id, trust_remote_code=cfg.trust_remote_code)
        adapter = get_adapter(config)
        model, processor = adapter.load(cfg.model_id, dtype=default_dtype(device), device=device,
                                        trust_remote_code=cfg.trust_remote_code)
    else:
        adapter = get_adapter(cfg.family)
        model, processor = adapter.build_untrained(cfg.seed, **cfg.untrained_size)
        model = model.to(device=device, dtype=default_dtype(device))  # bf16 on GPU, fp32 on CPU
    adapter.check_layers(model, cfg.layers)
    return LoadedMLLM(model, processor, adapter, token_cap(cfg, model))


def _architecture(cfg: MLLMConfig):
    """(model, adapter) with the real model's structure but no weights (meta tensors): what the
    launcher needs to check layers, without reading a 7B checkpoint on a machine that will not run it."""
    import torch
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.model_id, trust_remote_code=cfg.trust_remote_code)
    adapter = get_adapter(config)
    with torch.device("meta"):
        model = getattr(transformers, adapter.model_class_name)(config)
    adapter.check_layers(model, cfg.layers)
    token_cap(cfg, model)
    return model, adapter


def check_model(cfg: MLLMConfig) -> dict:
    """Check the model in the launcher, so a bad id or a layer the model lacks fails before any
    pipeline work (a pretrained model's config and structure only; an untrained one is built);
    returns what metadata.json records about it."""
    if cfg.model_id:
        model, adapter = _architecture(cfg)
    else:
        model, _processor, adapter = load_mllm(cfg)
    return {
        "model_id": cfg.model_id or f"untrained:{adapter.family}",
        "family": adapter.family,
        "model_class": type(model).__name__,
        "num_layers": adapter.num_layers(model),
        "hidden_size": int(getattr(model.config, "text_config", model.config).hidden_size),
        "untrained": is_untrained(model),
        "layers": sorted(cfg.layers),
        "pooling": cfg.pooling,
        "prompt_template": cfg.prompt_template,
        "seed": cfg.seed,
        "max_tokens": token_cap(cfg, model),
    }


def text_tokens(processor, prompt_template: str, caption: str) -> int | None:
    """Tokens of the prompt template with ``caption`` in it (the processor's tokenizer, no special
    tokens); None for a model whose processor has no tokenizer (nothing to cap)."""
    from steering.models.base import split_template

    before, after = split_template(prompt_template)
    tokenizer = getattr(processor, "tokenizer", processor)
    if not callable(tokenizer):
        return None
    return len(tokenizer(before + caption + after, add_special_tokens=False)["input_ids"])


def pooled_activations(model, processor, adapter, cfg: MLLMConfig, stimuli: Sequence[tuple[bytes, str]],
                       max_tokens: int | None = None) -> list[dict]:
    """Pooled vectors ``{layer: float32 array}`` for (image bytes, caption) stimuli, in input order.

    A stimulus with more than ``max_tokens`` text tokens (:func:`text_tokens`) is not run: it
    gets ``{"error": message, "reason": "too_long"}``. The others are sorted by caption length
    and run ``batch_size`` at a time (less padding); a batch that fails is retried one stimulus
    at a time, and a stimulus that still fails gets ``{"error": message}`` instead of vectors.
    """
    from PIL import Image

    def run(indices: list[int]) -> list[dict]:
        images = []
        for i in indices:
            with Image.open(io.BytesIO(stimuli[i][0])) as img:
                images.append(img.convert("RGB"))
        inputs = adapter.build_inputs(processor, images, [stimuli[i][1] for i in indices], cfg.prompt_template)
        inputs = inputs.to(model.device)
        pooled = capture(model, adapter, inputs, cfg.layers, cfg.pooling)
        return [{layer: pooled[layer][j].float().cpu().numpy() for layer in pooled} for j in range(len(indices))]

    results: list[dict | None] = [None] * len(stimuli)
    if max_tokens is not None:
        for i, (_image, caption) in enumerate(stimuli):
            n = text_tokens(processor, cfg.prompt_template, caption)
            if n is not None and n > max_tokens:
                results[i] = {"error": f"{n:,} text tokens (caption of {len(caption):,} characters), above the "
                                       f"cap mllm.max_tokens={max_tokens}", "reason": "too_long"}
    order = sorted((i for i in range(len(stimuli)) if results[i] is None), key=lambda i: (len(stimuli[i][1]), i))
    for start in range(0, len(order), cfg.batch_size):
        chunk = order[start:start + cfg.batch_size]
        try:
            for i, out in zip(chunk, run(chunk)):
                results[i] = out
        except Exception:  # noqa: BLE001 - find the stimulus at fault: retry one by one
            for i in chunk:
                try:
                    results[i] = run([i])[0]
                except Exception as exc:  # noqa: BLE001 - this stimulus's failure, dead-lettered
                    results[i] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    return results


class MLLMActivationHandler(FixedBatchHandler):
    """Beam ModelHandler: a fixed batch of (image bytes, caption) -> {layer: pooled vector} per stimulus, with a frozen MLLM."""

    metrics_namespace = "activations_inference"

    def load_model(self):
        return load_mllm(self.cfg)

    def run_inference(self, batch: Sequence, model, inference_args=None) -> Iterable[PredictionResult]:
        # each example is one fixed batch (see fixed_batches): a tuple of (image bytes, caption)
        return [PredictionResult(example, pooled_activations(*model, self.cfg, list(example), model.max_tokens))
                for example in batch]


def _by_caption_length(element) -> tuple[int, tuple[str, str]]:
    """Batch order of a stimulus image: caption length (less padding), then (shard, key)."""
    (key, _uses), (_image, caption) = element
    return len(caption), key


def _split_batch(chunk: tuple) -> tuple[tuple, tuple]:
    """A fixed batch -> ((key, uses) per image, (image bytes, caption) per image)."""
    return tuple(e[0] for e in chunk), tuple(e[1] for e in chunk)


def _unbatch(element):
    keys, result = element
    for key, vectors in zip(keys, result.inference):
        yield key, PredictionResult(None, vectors)


class _JoinStimuli(beam.DoFn):
    """((shard, key), {records, uses}) -> ((shard, key), uses), (image, caption) once per distinct image.

    Keys are joined with their shard: separate img2dataset runs reuse keys. Several records of
    one (shard, key) (a shard written twice) are counted ``duplicate_records``; one is kept when
    they hold the same image and caption, else the stimuli using them are dead-lettered
    (``ambiguous_record``), never mixed."""

    def __init__(self):
        self.images = Metrics.counter(NAMESPACE, "images")
        self.duplicates = Metrics.counter(NAMESPACE, "duplicate_records")

    def process(self, element):
        (shard, key), grouped = element
        uses = sorted(set(grouped["uses"]))
        records = list(grouped["records"])
        if not uses:
            return
        if not records:
            for concept_id, role in uses:
                yield dead_letter(NAMESPACE, shard, key, "missing_record",
                                  f"stimulus of {concept_id} ({role}) names a key that shard {shard!r} does not hold")
            return
        if len(records) > 1:
            self.duplicates.inc(len(records) - 1)
            if len({(r["jpg"], r["caption"]) for r in records}) > 1:
                for concept_id, role in uses:
                    yield dead_letter(NAMESPACE, shard, key, "ambiguous_record",
                                      f"stimulus of {concept_id} ({role}): shard {shard!r} holds {len(records)} "
                                      "different records with this key")
                return
        record = records[0]
        self.images.inc()
        yield ((shard, key), tuple(uses)), (record["jpg"], record["caption"])


class _EmitVectors(beam.DoFn):
    """One ((concept_id, layer, role), (key, vector)) per use of the stimulus and layer."""

    def __init__(self):
        self.emitted = Metrics.counter(NAMESPACE, "emitted")
        self.kept = Metrics.counter(NAMESPACE, "stimuli_emitted")

    def setup(self):
        self.progress = ProgressLog(NAMESPACE, "images")

    def process(self, element):
        ((shard, key), uses), result = element
        self.progress.update()
        vectors = result.inference
        if "error" in vectors:
            reason = vectors.get("reason", "inference")
            for concept_id, role in uses:
                yield dead_letter(NAMESPACE, shard, key, reason, f"{concept_id} ({role}): {vectors['error']}")
            return
        for concept_id, role in uses:
            self.kept.inc()
            for layer, vector in sorted(vectors.items()):
                self.emitted.inc()
                yield (concept_id, int(layer), role), (key, vector)


class ComputeActivations(beam.PTransform):
    """``{"records": shard records, "stimuli": stimulus rows}`` -> activation elements for
    :class:`transforms.directions.ComputeDirections`; dead letters to OUT/deadletter/activations.jsonl."""

    def __init__(self, out_dir: str, cfg: MLLMConfig):
        super().__init__()
        self.out_dir = out_dir
        self.cfg = cfg

    def expand(self, inputs):
        stimuli_count = Metrics.counter(NAMESPACE, "stimuli")

        def use(row):
            stimuli_count.inc()
            return (row.get("shard", ""), row["key"]), (row["concept_id"], row["role"])

        uses = inputs["stimuli"] | "KeyStimuli" >> beam.Map(use)
        records = inputs["records"] | "KeyRecords" >> beam.Map(lambda r: ((r["shard"], r["key"]), r))
        joined = (
            {"records": records, "uses": uses}
            | "JoinByShardKey" >> beam.CoGroupByKey()
            | "OnePerImage" >> beam.ParDo(_JoinStimuli()).with_outputs(DEAD, main="images")
        )
        handler = KeyedModelHandler(MLLMActivationHandler(self.cfg))
        vectors = (
            joined.images
            | "FixedBatches" >> FixedBatches(4 * self.cfg.batch_size, lambda e: "/".join(e[0][0]), _by_caption_length)
            | "SplitBatches" >> beam.Map(_split_batch)
            | "RunMLLM" >> on_accelerator(RunInference(handler), self.cfg.accelerator)
            | "Unbatch" >> beam.FlatMap(_unbatch)
            | "EmitVectors" >> beam.ParDo(_EmitVectors()).with_outputs(DEAD, main="vectors")
        )
        (
            (joined[DEAD], vectors[DEAD])
            | "DeadLetters" >> beam.Flatten()
            | "WriteDeadLetters" >> WriteDeadLetters(self.out_dir, NAMESPACE)
        )
        return vectors.vectors


RECONCILIATION = Reconciliation(NAMESPACE, "stimuli", ("deadletter_missing_record", "deadletter_ambiguous_record",
                                                       "deadletter_too_long", "deadletter_inference", "stimuli_emitted"))
"""Every stimulus row is dead-lettered (no image, two different images under its (shard, key),
over the token cap, the model failed on it) or emitted (once per layer)."""
