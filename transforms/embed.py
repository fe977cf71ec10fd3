"""CLIP embedding stage: caption-image records -> ``OUT/embeddings/`` (clip-retrieval layout).

Layout written (the one LAION publishes its embeddings in; N is the shard's index,
``00042`` -> 42; one file set per input shard, rows sorted by key)::

    embeddings/img_emb/img_emb_{N}.npy         float16 [rows, D], L2-normalised
    embeddings/text_emb/text_emb_{N}.npy       float16 [rows, D], L2-normalised
    embeddings/metadata/metadata_{N}.parquet   key, caption, url, shard, sha256 (of the image bytes)
    embeddings/embeddings.json                 model (clip_model: clip-retrieval's name), weights, untrained, embed_dim, counts
    deadletter/embed.jsonl                     records whose image or caption could not be prepared

Steps, each counted in namespace ``embed``: ``read`` records; an image that does not
decode or preprocess, or a caption that is not a non-empty string, is dead-lettered
(``deadletter_image``, ``deadletter_caption``); the rest go through Beam's RunInference
with :class:`ClipModelHandler` (one model per worker process or one per GPU, mixed
precision on GPU) and are counted ``embedded``; the writer counts ``written``. Records are
cut into batches fixed by the data alone (:mod:`transforms.batching`: grouped by a hash of
(shard, key), sorted by (shard, key)) before they are prepared, so every byte written is
the same whatever the order and bundling of the input records.

Skipping the stage: :func:`embeddings_exist` tells whether a folder already holds
embeddings in this layout (e.g. LAION's published ``img_emb``/``text_emb``/``metadata``);
the pipeline then reads them with :func:`read_embeddings` instead of computing them.

Models (:class:`ClipConfig`): an open_clip architecture name with a pretrained tag
(looked up in open_clip's cache, downloaded when allowed) or a local checkpoint file.
Without weights, ``allow_untrained`` builds the same architecture with random weights
from ``seed``; every output then says ``untrained: true``. ``daco-tiny-clip`` (shipped in
``transforms/clip_configs/``) is a small architecture for fast offline runs; the
embedded demo uses it (:data:`DEMO_CLIP`).

Concept prompts (:data:`PROMPT_TEMPLATES`, :func:`concept_prompts`, :func:`embed_concepts`):
each concept is written into several templates with its lemma and a short gloss from its
WordNet definition; the normalised text embeddings are averaged and re-normalised
(CLIP's prompt ensembling).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference

from transforms import fileio
from transforms.batching import batch_group, fixed_batches
from transforms.config import DEVICE_PATTERN, StageConfig, on_accelerator, resolve_device, validate_accelerator
from transforms.counters import Reconciliation
from transforms.deadletter import DEAD, WriteDeadLetters, dead_letter
from transforms.progress import ProgressLog

NAMESPACE = "embed"
CONFIG_DIR = Path(__file__).parent / "clip_configs"
PRECISIONS = ("auto", "fp32", "amp_bf16", "amp_fp16")

METADATA_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("caption", pa.string()),
    ("url", pa.string()),
    ("shard", pa.string()),
    ("sha256", pa.string()),
])


class ClipLoadError(RuntimeError):
    """A CLIP model could not be set up as configured (the message says what was looked for and the fix)."""


class EmbeddingsLayoutError(ValueError):
    """A folder is not in clip-retrieval's embeddings layout (the message names the file and the problem)."""


@dataclass
class ClipConfig(StageConfig):
    """Options of the embedding stage (the ``clip:`` section of a config file).

    Attributes:
        model_name: an open_clip architecture ("ViT-L-14", "ViT-B-32", ...) or one shipped
            in ``transforms/clip_configs/`` ("daco-tiny-clip").
        pretrained: an open_clip pretrained tag of that architecture (e.g.
            "laion2b_s32b_b82k"), or a local checkpoint file; None: no weights.
        allow_untrained: when the weights are unavailable (or ``pretrained`` is None), build
            the architecture with random weights from ``seed`` and mark every output
            ``untrained``; otherwise a missing checkpoint is an error.
        download: try to download a tag that is not in the cache (set False, or
            HF_HUB_OFFLINE=1, to fail fast on machines without network).
        cache_dir: open_clip's download cache (None: its default, ~/.cache/huggingface).
        batch_size: records per model call.
        device: "auto" (a GPU when present), "cpu", "cuda", "cuda:1", ...
        precision: "auto" (fp32 on CPU, amp_bf16 on GPU), "fp32", "amp_bf16", "amp_fp16".
        seed: seed of the random weights of an untrained model.
        accelerator: Beam accelerator resource hint put on the RunInference step only
            (e.g. "type:nvidia-l4;count:1;install-nvidia-driver"); None: no hint (local runs).
    """

    model_name: str = "ViT-L-14"
    pretrained: str | None = "laion2b_s32b_b82k"
    allow_untrained: bool = False
    download: bool = True
    cache_dir: str | None = None
    batch_size: int = 64
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    accelerator: str | None = None

    def validate(self, where: str) -> None:
        if self.batch_size < 1:
            raise ValueError(f"{where}.batch_size must be >= 1, got {self.batch_size}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"{where}.precision: {self.precision!r} is not one of {PRECISIONS}")
        if not re.fullmatch(DEVICE_PATTERN, self.device):
            raise ValueError(f"{where}.device: {self.device!r} is not auto, cpu, cuda or cuda:N")
        validate_accelerator(self.accelerator, where)

    def replace(self, **changes) -> "ClipConfig":
        """A validated copy with ``changes`` applied."""
        return ClipConfig.from_dict({**dataclasses.asdict(self), **changes})


DEMO_CLIP = ClipConfig(model_name="daco-tiny-clip", pretrained=None, allow_untrained=True, batch_size=32, seed=0)
"""The embedded demo's model: the tiny shipped architecture, random weights from seed 0 (untrained)."""


# --------------------------------------------------------------------------- loading


def _open_clip():
    """open_clip with this package's architectures registered."""
    import open_clip

    if str(CONFIG_DIR) not in map(str, open_clip.factory._MODEL_CONFIG_PATHS):
        open_clip.add_model_config(CONFIG_DIR)
    return open_clip


def model_config(cfg: ClipConfig) -> dict:
    """open_clip's architecture config of ``cfg.model_name``; a clear error for an unknown name."""
    open_clip = _open_clip()
    config = open_clip.get_model_config(cfg.model_name)
    if config is None:
        close = difflib.get_close_matches(cfg.model_name, open_clip.list_models(), n=5)
        raise ClipLoadError(
            f"clip.model_name: {cfg.model_name!r} is not an open_clip architecture"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
            + f"; architectures ship in open_clip and in {CONFIG_DIR}"
        )
    return config


def _pretrained_tag_cfg(cfg: ClipConfig) -> dict:
    """open_clip's record of ``cfg.pretrained`` as a tag of the model ({} when it is not a tag)."""
    if not cfg.pretrained:
        return {}
    return _open_clip().get_pretrained_cfg(cfg.model_name, cfg.pretrained)


def _cached_tag_file(tag_cfg: dict, cache_dir: str | None) -> str | None:
    """The checkpoint of a pretrained tag if it is already in the local cache (no network)."""
    from huggingface_hub import try_to_load_from_cache
    from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives

    if tag_cfg.get("hf_hub"):
        repo_id, filename = os.path.split(tag_cfg["hf_hub"])  # as open_clip's download_pretrained
        filename = filename or HF_WEIGHTS_NAME
        for name in (*_get_safe_alternatives(filename), filename):
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    if tag_cfg.get("url"):
        path = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(tag_cfg["url"]))
        if os.path.isfile(path):
            return path
    return None


def _download_allowed(cfg: ClipConfig) -> bool:
    from huggingface_hub import constants

    return cfg.download and not constants.HF_HUB_OFFLINE


def find_weights(cfg: ClipConfig) -> tuple[str | None, str]:
    """(checkpoint file or None, what was looked for). A tag is looked up in open_clip's cache
    first and downloaded only when ``cfg.download``; a path must be an existing file."""
    if not cfg.pretrained:
        return None, "no pretrained weights configured (clip.pretrained is empty)"
    tag_cfg = _pretrained_tag_cfg(cfg)
    if not tag_cfg:
        if os.path.isfile(cfg.pretrained):
            return cfg.pretrained, f"checkpoint file {cfg.pretrained}"
        tags = _open_clip().list_pretrained_tags_by_model(cfg.model_name)
        raise ClipLoadError(
            f"clip.pretrained: {cfg.pretrained!r} is neither a pretrained tag of {cfg.model_name} "
            f"(its tags: {tags or 'none'}) nor an existing checkpoint file"
        )
    source = tag_cfg.get("hf_hub") or tag_cfg.get("url")
    looked = f"open_clip tag {cfg.model_name}/{cfg.pretrained} ({source}) in the cache"
    found = _cached_tag_file(tag_cfg, cfg.cache_dir)
    if found or not _download_allowed(cfg):
        return found, looked + ("" if _download_allowed(cfg) else "; download disabled")
    from open_clip.pretrained import download_pretrained

    try:
        return download_pretrained(tag_cfg, cache_dir=cfg.cache_dir) or None, looked + " and online"
    except Exception as exc:  # noqa: BLE001 - any download failure means "not available"
        return None, f"{looked} and online ({type(exc).__name__}: {str(exc)[:200]})"


def resolve_clip_config(cfg: ClipConfig) -> ClipConfig:
    """The config every worker loads: unchanged when the weights are found; ``pretrained=None``
    (random weights from ``seed``) when they are not and ``allow_untrained``; otherwise a
    :class:`ClipLoadError` saying what was looked for and how to fix it.

    Resolving once, before the pipeline runs, means all workers load the same weights and
    the error comes before any work."""
    model_config(cfg)
    if not cfg.pretrained and not cfg.allow_untrained:
        raise ClipLoadError(f"clip.pretrained is empty for {cfg.model_name}: set a pretrained tag or checkpoint "
                            "file (clip.pretrained in a build config, --clip-pretrained with daco embed), or allow random "
                            "weights (clip.allow_untrained: true in a build config, --clip-allow-untrained with daco embed)")
    checkpoint, looked = find_weights(cfg)
    if checkpoint:
        return cfg
    if cfg.allow_untrained:
        if cfg.pretrained:
            warnings.warn(f"CLIP weights not found ({looked}); using {cfg.model_name} with random weights "
                          f"(seed {cfg.seed}), marked untrained", stacklevel=2)
        return cfg.replace(pretrained=None)
    raise ClipLoadError(
        f"CLIP weights not found: looked for {looked}. Fix: run once with network so open_clip caches "
        f"them (python -c \"import open_clip; open_clip.create_model_and_transforms('{cfg.model_name}', "
        f"pretrained='{cfg.pretrained}')\"), or set clip.pretrained to a local checkpoint file "
        f"(in a build config; --clip-pretrained with daco embed), or allow random weights for offline tests with "
        f"clip.allow_untrained: true (in a build config; --clip-allow-untrained with daco embed; outputs are then "
        f"marked untrained)"
    )


def preprocess_config(cfg: ClipConfig) -> dict:
    """Image preprocessing (open_clip's PreprocessCfg fields) of the model and its pretrained tag."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    pp = merge_preprocess_dict(PreprocessCfg(), _pretrained_tag_cfg(cfg))
    pp["size"] = model_config(cfg)["vision_cfg"]["image_size"]
    return pp


def clip_preprocess(cfg: ClipConfig):
    """(image preprocess, tokenizer) of a model, without building the model."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    open_clip = _open_clip()
    preprocess = image_transform_v2(PreprocessCfg(**preprocess_config(cfg)), is_train=False)
    return preprocess, open_clip.get_tokenizer(cfg.model_name)


def resolve_precision(cfg: ClipConfig, device: str) -> str:
    """fp32 on CPU, bf16 autocast on GPU unless the config says otherwise."""
    if cfg.precision != "auto":
        return cfg.precision
    return "fp32" if device == "cpu" else "amp_bf16"


@dataclass
class LoadedClip:
    """A CLIP model ready to embed: the model, its preprocess and tokenizer, and provenance."""

    model: Any
    preprocess: Any
    tokenizer: Any
    untrained: bool
    embed_dim: int
    device: str
    precision: str
    cfg: ClipConfig

    def _autocast(self):
        import contextlib

        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "amp_bf16" else torch.float16
        return torch.autocast(device_type=self.device.split(":")[0], dtype=dtype)

    def encode_images(self, images) -> np.ndarray:
        """L2-normalised float32 embeddings of a batch of preprocessed images [B, 3, H, W]."""
        import torch
        import torch.nn.functional as F

        with torch.inference_mode(), self._autocast():
            out = self.model.encode_image(images.to(self.device))
        return F.normalize(out.float(), dim=-1).cpu().numpy()

    def encode_texts(self, tokens) -> np.ndarray:
        """L2-normalised float32 embeddings of a batch of token ids [B, context_length]."""
        import torch
        import torch.nn.functional as F

        with torch.inference_mode(), self._autocast():
            out = self.model.encode_text(tokens.to(self.device))
        return F.normalize(out.float(), dim=-1).cpu().numpy()

    def embed_pairs(self, images, tokens) -> tuple[np.ndarray, np.ndarray]:
        """(image, text) embeddings of a batch of pairs; one call, so that a model shared
        across processes is reached once per batch."""
        return self.encode_images(images), self.encode_texts(tokens)


def load_clip(cfg: ClipConfig) -> LoadedClip:
    """Load a CLIP model with open_clip (see :func:`resolve_clip_config` for where weights come
    from). Random weights are drawn on the CPU from ``cfg.seed`` without touching the global
    torch RNG, so the same seed gives the same model on every worker."""
    import torch

    cfg = resolve_clip_config(cfg)
    open_clip = _open_clip()
    checkpoint = find_weights(cfg)[0] if cfg.pretrained else None
    pp = preprocess_config(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model, _, preprocess = open_clip.create_model_and_transforms(
            cfg.model_name, pretrained=checkpoint, device="cpu", precision="fp32",
            image_mean=pp["mean"], image_std=pp["std"], image_interpolation=pp["interpolation"],
            image_resize_mode=pp["resize_mode"], pretrained_text=False, pretrained_image=False,
        )
    device = resolve_device(cfg.device)
    model = model.to(device).eval()
    return LoadedClip(
        model=model, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(cfg.model_name),
        untrained=checkpoint is None, embed_dim=int(model_config(cfg)["embed_dim"]), device=device,
        precision=resolve_precision(cfg, device), cfg=cfg,
    )


# --------------------------------------------------------------------------- RunInference


class ClipModelHandler(ModelHandler):
    """Beam ModelHandler embedding fixed batches of (preprocessed image, token ids) pairs with CLIP.

    Each example is one whole batch, ``(images [n, 3, H, W], token ids [n, context])``, formed
    upstream from the data alone (see :mod:`transforms.batching`); RunInference passes them
    one at a time and never regroups them. On a GPU the model is shared by the worker's
    processes (one copy per GPU) and runs under autocast. A prediction is
    ``(image embeddings [n, D], text embeddings [n, D])``, float32, L2-normalised."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.cfg = cfg

    def load_model(self) -> LoadedClip:
        return load_clip(self.cfg)

    def run_inference(self, batch: Sequence, model: LoadedClip, inference_args=None) -> Iterable[PredictionResult]:
        return [PredictionResult(example, model.embed_pairs(*example)) for example in batch]

    def get_num_bytes(self, batch: Sequence) -> int:
        # Beam's default pickles the whole batch just to measure it.
        return sum(t.element_size() * t.nelement() for example in batch for t in example)

    def batch_elements_kwargs(self):
        # the batches are formed upstream from the data alone; RunInference must not regroup them
        return {"min_batch_size": 1, "max_batch_size": 1}

    def share_model_across_processes(self) -> bool:
        return resolve_device(self.cfg.device) != "cpu"

    def model_copies(self) -> int:
        return 1

    def get_metrics_namespace(self) -> str:
        return "embed_inference"


def _record_order(record) -> tuple[str, str]:
    return str(record.get("shard", "")), str(record.get("key", ""))


class _Prepare(beam.DoFn):
    """A fixed batch of records -> (metadata per record, (image tensors, token ids)) for its
    good records; bad images and captions are dead-lettered."""

    def __init__(self, cfg: ClipConfig):
        self.cfg = cfg
        self.read = Metrics.counter(NAMESPACE, "read")

    def setup(self):
        self.preprocess, self.tokenizer = clip_preprocess(self.cfg)
        self.progress = ProgressLog(NAMESPACE, "records")

    def process(self, batch):
        import torch

        metas, pixels, tokens = [], [], []
        for record in batch:
            prepared = self._prepare(record)
            if isinstance(prepared, TaggedOutput):
                yield prepared
            else:
                metas.append(prepared[0])
                pixels.append(prepared[1])
                tokens.append(prepared[2])
        if metas:
            yield tuple(metas), (torch.stack(pixels), torch.stack(tokens))

    def _prepare(self, record):
        from PIL import Image

        self.read.inc()
        self.progress.update()
        shard, key, caption = record.get("shard", ""), record.get("key", ""), record.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            return dead_letter(NAMESPACE, shard, key, "caption", f"caption is {caption!r}, not a non-empty string")
        try:
            with Image.open(io.BytesIO(record["jpg"])) as img:
                pixels = self.preprocess(img.convert("RGB"))
        except Exception as exc:  # noqa: BLE001 - any decode/preprocess failure is this record's
            detail = re.sub(r"<[^<>]* at 0x[0-9a-f]+>", "<image bytes>", f"{type(exc).__name__}: {exc}")
            return dead_letter(NAMESPACE, shard, key, "image", detail)  # no addresses: same bytes each run
        sha256 = record.get("sha256") or hashlib.sha256(record["jpg"]).hexdigest()
        return (shard, key, caption, record.get("url") or "", sha256), pixels, self.tokenizer([caption])[0]


def _to_rows(element):
    """(metadata per record, PredictionResult of their batch) -> (shard, row) per record, float16 embeddings."""
    metas, result = element
    img, txt = result.inference
    Metrics.counter(NAMESPACE, "embedded").inc(len(metas))
    for i, (shard, key, caption, url, sha256) in enumerate(metas):
        yield shard, (key, caption, url, sha256, img[i].astype(np.float16), txt[i].astype(np.float16))


def shard_index(shard: str) -> int:
    """N of ``img_emb_{N}.npy`` for a shard name ("00042" -> 42)."""
    try:
        return int(shard)
    except ValueError:
        raise ValueError(f"embed: shard name {shard!r} is not a number; shards must be named NNNNN.tar") from None


def shard_paths(emb_dir: str, n: int) -> dict[str, str]:
    """The three files of file set ``n`` in an embeddings folder."""
    return {
        "img": fileio.join(emb_dir, "img_emb", f"img_emb_{n}.npy"),
        "txt": fileio.join(emb_dir, "text_emb", f"text_emb_{n}.npy"),
        "metadata": fileio.join(emb_dir, "metadata", f"metadata_{n}.parquet"),
    }


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_file_set(emb_dir: str, shard: str, rows: list[tuple]) -> dict:
    """Write one shard's embeddings and metadata (rows sorted by key); returns a summary."""
    rows = sorted(rows, key=lambda r: (r[0], r[3]))
    paths = shard_paths(emb_dir, shard_index(shard))
    fileio.write_bytes_atomic(paths["img"], _npy_bytes(np.stack([r[4] for r in rows])))
    fileio.write_bytes_atomic(paths["txt"], _npy_bytes(np.stack([r[5] for r in rows])))
    table = pa.table({
        "key": [r[0] for r in rows], "caption": [r[1] for r in rows], "url": [r[2] for r in rows],
        "shard": [shard] * len(rows), "sha256": [r[3] for r in rows],
    }, schema=METADATA_SCHEMA)
    fileio.write_parquet_atomic(paths["metadata"], table)
    return {"shard": shard, "index": shard_index(shard), "n": len(rows), "paths": sorted(paths.values())}


class _WriteShard(beam.DoFn):
    def __init__(self, emb_dir: str):
        self.emb_dir = emb_dir
        self.written = Metrics.counter(NAMESPACE, "written")

    def process(self, element):
        shard, rows = element
        summary = write_file_set(self.emb_dir, shard, list(rows))
        self.written.inc(summary["n"])
        yield summary


def weights_label(resolved: ClipConfig) -> str:
    """How ``embeddings.json`` names the weights of a resolved config: the tag or checkpoint
    file, or "random (seed N)" for an untrained model."""
    return resolved.pretrained or f"random (seed {resolved.seed})"


def clip_retrieval_name(cfg: ClipConfig, resolved: ClipConfig) -> str:
    """The model as clip-retrieval's ``back --clip_model`` names it: ``open_clip:ARCH/TAG`` (e.g.
    ``open_clip:ViT-L-14/laion2b_s32b_b82k``); a local checkpoint or random weights have no tag,
    so only ``open_clip:ARCH``."""
    tag = cfg.pretrained if cfg.pretrained and resolved.pretrained and "/" not in cfg.pretrained else None
    return f"open_clip:{cfg.model_name}" + (f"/{tag}" if tag else "")


def embeddings_record(cfg: ClipConfig, resolved: ClipConfig, shards: list[dict]) -> dict:
    """The content of ``embeddings.json``: which model made the embeddings, and what they hold."""
    import open_clip

    return {
        "layout": "clip-retrieval",
        "clip_model": clip_retrieval_name(cfg, resolved),
        "model_name": cfg.model_name,
        "pretrained": cfg.pretrained,
        "weights": weights_label(resolved),
        "untrained": resolved.pretrained is None,
        "embed_dim": int(model_config(cfg)["embed_dim"]),
        "seed": cfg.seed,
        "precision": cfg.precision,
        "open_clip_version": open_clip.__version__,
        "dtype": "float16",
        "normalised": True,
        "n": sum(s["n"] for s in shards),
        "shards": [{k: s[k] for k in ("shard", "index", "n")} for s in sorted(shards, key=lambda s: s["index"])],
    }


class ComputeEmbeddings(beam.PTransform):
    """Records (``ReadShards``' dicts) -> ``OUT/embeddings/`` and ``OUT/deadletter/embed.jsonl``.

    Returns a PCollection of the written paths (use it as a side input to run after the
    embeddings exist). The weights are resolved when the graph is built, so a missing
    checkpoint fails before any work and every worker loads the same model."""

    def __init__(self, out_dir: str, cfg: ClipConfig):
        super().__init__()
        self.out_dir = out_dir
        self.emb_dir = fileio.join(out_dir, "embeddings")
        self.cfg = cfg

    def expand(self, records):
        cfg = self.cfg
        resolved = resolve_clip_config(cfg)
        prepared = (
            records
            | "BatchGroup" >> beam.Map(lambda r: (batch_group("/".join(_record_order(r))), r))
            | "GroupForBatches" >> beam.GroupByKey()
            | "FixedBatches" >> beam.FlatMap(fixed_batches, cfg.batch_size, _record_order)
            | "Prepare" >> beam.ParDo(_Prepare(resolved)).with_outputs(DEAD, main="ok")
        )
        summaries = (
            prepared.ok
            | "Embed" >> on_accelerator(RunInference(KeyedModelHandler(ClipModelHandler(resolved))), cfg.accelerator)
            | "ToRows" >> beam.FlatMap(_to_rows)
            | "ByShard" >> beam.GroupByKey()
            | "WriteShards" >> beam.ParDo(_WriteShard(self.emb_dir))
        )
        json_path = fileio.join(self.emb_dir, "embeddings.json")
        written_json = (
            summaries
            | "AllShards" >> beam.combiners.ToList()
            | "WriteRecord" >> beam.Map(
                lambda shards: fileio.write_json_atomic(json_path, embeddings_record(cfg, resolved, shards)) or json_path)
        )
        dead = prepared[DEAD] | "WriteDeadLetters" >> WriteDeadLetters(self.out_dir, NAMESPACE)
        shard_files = summaries | "Paths" >> beam.FlatMap(lambda s: s["paths"])
        return (shard_files, written_json, dead) | "AllPaths" >> beam.Flatten()


RECONCILIATION = Reconciliation(NAMESPACE, "read", ("embedded", "deadletter_image", "deadletter_caption"))
WRITE_RECONCILIATION = Reconciliation(NAMESPACE, "embedded", ("written",))


# --------------------------------------------------------------------------- reading


def _file_sets(emb_dir: str) -> list[int]:
    """Indices N of ``img_emb/img_emb_{N}.npy`` in a folder, ascending."""
    pattern = fileio.join(emb_dir, "img_emb", "img_emb_*.npy")
    try:
        matches = FileSystems.match([pattern])[0].metadata_list
    except Exception:  # noqa: BLE001 - a missing folder matches nothing
        return []
    found = []
    for meta in matches:
        m = re.fullmatch(r"img_emb_(\d+)\.npy", FileSystems.split(meta.path)[1])
        if m:
            found.append(int(m.group(1)))
    return sorted(found)


def embeddings_exist(emb_dir: str) -> bool:
    """True when ``emb_dir`` holds embeddings in clip-retrieval's layout (at least one
    ``img_emb/img_emb_N.npy`` with its ``text_emb`` and ``metadata`` files), e.g. LAION's
    published embeddings; the pipeline then reads them instead of computing them.
    Validity is checked by :func:`read_embeddings`."""
    sets = _file_sets(emb_dir)
    return bool(sets) and all(FileSystems.exists(p) for n in sets for p in shard_paths(emb_dir, n).values())


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(fileio.read_bytes(path)), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - say which file
        raise EmbeddingsLayoutError(f"{path}: not a readable .npy array ({type(exc).__name__}: {exc})") from None


def read_embeddings(emb_dir: str) -> tuple[np.ndarray, np.ndarray, pa.Table]:
    """(image embeddings, text embeddings, metadata) of a clip-retrieval layout folder, the
    file sets concatenated in order of N. Arrays keep their stored float dtype (float16 here,
    as LAION's). Metadata must have ``key`` and ``caption``; missing ``url``/``shard``/``sha256``
    columns are added as nulls. A malformed folder raises :class:`EmbeddingsLayoutError`."""
    sets = _file_sets(emb_dir)
    if not sets:
        raise EmbeddingsLayoutError(
            f"{emb_dir}: no img_emb/img_emb_N.npy files; expected clip-retrieval's layout "
            "(img_emb/, text_emb/, metadata/) as written by `daco embed` or published by LAION")
    imgs, txts, tables, dim = [], [], [], None
    for n in sets:
        paths = shard_paths(emb_dir, n)
        for role in ("txt", "metadata"):
            if not FileSystems.exists(paths[role]):
                raise EmbeddingsLayoutError(f"{paths[role]}: missing (it pairs with {paths['img']})")
        img, txt = _load_npy(paths["img"]), _load_npy(paths["txt"])
        for path, arr in ((paths["img"], img), (paths["txt"], txt)):
            if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
                raise EmbeddingsLayoutError(
                    f"{path}: expected a 2-D float array [rows, dim], got {arr.dtype} with shape {arr.shape}")
            dim = arr.shape[1] if dim is None else dim
            if arr.shape[1] != dim:
                raise EmbeddingsLayoutError(f"{path}: dimension {arr.shape[1]} differs from the folder's {dim}")
        try:
            table = fileio.read_parquet(paths["metadata"])
        except Exception as exc:  # noqa: BLE001 - say which file
            raise EmbeddingsLayoutError(f"{paths['metadata']}: not a readable parquet file ({exc})") from None
        missing = {"key", "caption"} - set(table.column_names)
        if missing:
            raise EmbeddingsLayoutError(f"{paths['metadata']}: missing column(s) {sorted(missing)}")
        if not (len(img) == len(txt) == table.num_rows):
            raise EmbeddingsLayoutError(
                f"file set {n} of {emb_dir}: row counts differ (img_emb {len(img)}, text_emb {len(txt)}, "
                f"metadata {table.num_rows}); each row of the three files must be the same record")
        for name in METADATA_SCHEMA.names:
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
        tables.append(table.select(METADATA_SCHEMA.names).cast(METADATA_SCHEMA))
        imgs.append(img)
        txts.append(txt)
    return np.concatenate(imgs), np.concatenate(txts), pa.concat_tables(tables)


# --------------------------------------------------------------------------- concept prompts

PROMPT_TEMPLATES = (
    "a photo of {article} {lemma}, {gloss}.",
    "a photo of {article} {lemma}.",
    "a close-up photo of the {lemma}, {gloss}.",
    "an image showing {article} {lemma}: {gloss}.",
    "a picture of the {lemma}.",
    "{lemma}, {gloss}.",
)
"""Concept prompts. ``{lemma}`` is the concept's label, ``{article}`` "a"/"an", ``{gloss}`` a short
gloss: the WordNet definition up to its first ';', without parentheses, at most
:data:`GLOSS_WORDS` words. The gloss tells CLIP which sense is meant (bank the river side
vs. bank the institution); the template without it keeps the plain name in the ensemble.
Templates are applied in this order; for a concept without a definition the ones using
``{gloss}`` are left out."""

GLOSS_WORDS = 12


def short_gloss(definition: str | None) -> str:
    """The disambiguating gloss of a WordNet definition (see :data:`PROMPT_TEMPLATES`)."""
    text = re.sub(r"\([^)]*\)", "", (definition or "").split(";")[0])
    return " ".join(text.split()[:GLOSS_WORDS]).strip(" ,.:")


def concept_prompts(concept_row: dict) -> list[str]:
    """The prompts of one concept (a ``concepts.parquet`` row: ``lemma``, ``definition``)."""
    lemma = " ".join(str(concept_row["lemma"]).replace("_", " ").split())
    gloss = short_gloss(concept_row.get("definition"))
    article = "an" if lemma[:1].lower() in "aeiou" else "a"
    return [t.format(article=article, lemma=lemma, gloss=gloss)
            for t in PROMPT_TEMPLATES if gloss or "{gloss}" not in t]


def embed_concepts(concepts: pa.Table, loaded: LoadedClip) -> np.ndarray:
    """[n_concepts, D] float32 text embeddings, one per row of ``concepts`` in order: each
    prompt's embedding L2-normalised, averaged over the concept's prompts, re-normalised."""
    prompts = [concept_prompts(row) for row in concepts.select(["lemma", "definition"]).to_pylist()]
    flat = [p for ps in prompts for p in ps]
    step = loaded.cfg.batch_size
    if not flat:
        return np.zeros((0, loaded.embed_dim), dtype=np.float32)
    per_prompt = np.concatenate([
        loaded.encode_texts(loaded.tokenizer(flat[i:i + step])) for i in range(0, len(flat), step)
    ])
    out = np.empty((len(prompts), per_prompt.shape[1]), dtype=np.float32)
    start = 0
    for i, ps in enumerate(prompts):
        mean = per_prompt[start:start + len(ps)].astype(np.float64).mean(axis=0)
        out[i] = mean / np.linalg.norm(mean)
        start += len(ps)
    return out
