"""CLIP embedding stage: caption-image records -> ``OUT/embeddings/`` in clip-retrieval's
layout (:mod:`transforms.embeddings_layout`) and ``OUT/deadletter/embed.jsonl`` (records
whose image or caption could not be prepared). The model is :mod:`transforms.clip_model`'s.

Steps, each counted in namespace ``embed``: ``read`` records; an image that does not
decode or preprocess, or a caption that is not a non-empty string, is dead-lettered
(``deadletter_image``, ``deadletter_caption``); the rest go through Beam's RunInference
with :class:`ClipModelHandler` (one model per worker process or one per GPU, mixed
precision on GPU) and are counted ``embedded``; the writer counts ``written``. Records are
cut into batches fixed by the data alone (:mod:`transforms.batching`: grouped by a hash of
(shard, key), sorted by (shard, key)) before they are prepared, so every byte written is
the same whatever the order and bundling of the input records.
"""

from __future__ import annotations

import hashlib
import io
import re
from typing import Iterable, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput
from apache_beam.ml.inference.base import KeyedModelHandler, PredictionResult, RunInference

from transforms import fileio
from transforms.batching import FixedBatches, FixedBatchHandler
from transforms.clip_model import ClipConfig, LoadedClip, clip_preprocess, load_clip, resolve_clip_config
from transforms.config import on_accelerator
from transforms.counters import Reconciliation
from transforms.deadletter import DEAD, WriteDeadLetters, dead_letter
from transforms.embeddings_layout import embeddings_record, write_file_set
from transforms.progress import ProgressLog

NAMESPACE = "embed"


class ClipModelHandler(FixedBatchHandler):
    """Beam ModelHandler embedding fixed batches of (preprocessed image, token ids) pairs with CLIP.

    Each example is one whole batch, ``(images [n, 3, H, W], token ids [n, context])``, formed
    upstream from the data alone (see :mod:`transforms.batching`); RunInference passes them
    one at a time and never regroups them. On a GPU the model is shared by the worker's
    processes (one copy per GPU) and runs under autocast. A prediction is
    ``(image embeddings [n, D], text embeddings [n, D])``, float32, L2-normalised."""

    metrics_namespace = "embed_inference"

    def load_model(self) -> LoadedClip:
        return load_clip(self.cfg)

    def run_inference(self, batch: Sequence, model: LoadedClip, inference_args=None) -> Iterable[PredictionResult]:
        return [PredictionResult(example, model.embed_pairs(*example)) for example in batch]

    def get_num_bytes(self, batch: Sequence) -> int:
        # Beam's default pickles the whole batch just to measure it.
        return sum(t.element_size() * t.nelement() for example in batch for t in example)



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


class _WriteShard(beam.DoFn):
    def __init__(self, emb_dir: str):
        self.emb_dir = emb_dir
        self.written = Metrics.counter(NAMESPACE, "written")

    def process(self, element):
        shard, rows = element
        summary = write_file_set(self.emb_dir, shard, list(rows))
        self.written.inc(summary["n"])
        yield summary


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
            | "FixedBatches" >> FixedBatches(cfg.batch_size, lambda r: "/".join(_record_order(r)), _record_order)
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
