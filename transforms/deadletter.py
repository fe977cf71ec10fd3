"""Dead letters: every input a stage could not process, with the reason, as data.

A DoFn that meets a bad record yields ``dead_letter(...)`` to the tagged output
``DEAD`` instead of raising, and counts it; :class:`WriteDeadLetters` writes
them to ``OUT/deadletter/<stage>.jsonl`` (one JSON object a line, sorted, so
reruns give the same bytes). Nothing is dropped silently and no worker dies on
one bad record.
"""

from __future__ import annotations

import json

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms import fileio

DEAD = "deadletter"  # tag of the dead-letter output of a multi-output DoFn


def dead_letter(stage: str, source: str, key: str, reason: str, detail: str = "") -> beam.pvalue.TaggedOutput:
    """A dead-letter record for ``stage`` (``source``: the file or shard; ``key``: the record),
    tagged for the ``DEAD`` output and counted as ``<stage>.deadletter_<reason>``."""
    Metrics.counter(stage, f"deadletter_{reason}").inc()
    record = {"stage": stage, "source": source, "key": key, "reason": reason, "detail": detail[:2000]}
    return beam.pvalue.TaggedOutput(DEAD, record)


def _write(records, path):
    lines = sorted(json.dumps(r, sort_keys=True, ensure_ascii=False) for r in records)
    fileio.write_bytes_atomic(path, ("\n".join(lines) + ("\n" if lines else "")).encode())
    yield path


class WriteDeadLetters(beam.PTransform):
    """Write a PCollection of dead-letter records to ``OUT/deadletter/<stage>.jsonl`` (always
    written, empty when nothing failed, so a reader can tell "none" from "not run")."""

    def __init__(self, out_dir: str, stage: str):
        super().__init__()
        self.path = fileio.join(out_dir, "deadletter", f"{stage}.jsonl")

    def expand(self, records):
        return (
            records
            | "Gather" >> beam.combiners.ToList()
            | "Write" >> beam.FlatMap(_write, self.path)
        )
