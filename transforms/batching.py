"""Model batches fixed by the data alone, so that outputs do not depend on bundling.

A kernel's result for one example can change, in the last bits, with the other examples
of its batch (padding, and the blocking a BLAS or convolution kernel picks for the batch
size). Batches that RunInference forms from bundles therefore make bytes depend on input
order, worker count and runner. The stages that run a model (embedding, activations)
instead spread their elements over :data:`BATCH_GROUPS` groups by a stable hash of their
key, group them, and cut each group, sorted by a key of the data, into batches
(:func:`fixed_batches`): the same data gives the same batches everywhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from apache_beam.ml.inference.base import ModelHandler

from transforms.config import resolve_device

BATCH_GROUPS = 1024
"""Elements are spread over this many groups by a hash of their key."""


def batch_group(key: str) -> int:
    """The group of an element key: a stable hash (same in every process and run), mod BATCH_GROUPS."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % BATCH_GROUPS


def fixed_batches(group: tuple[int, Iterable[Any]], size: int, order: Callable[[Any], Any]) -> Iterator[tuple]:
    """(group, elements) -> tuples of at most ``size`` elements, cut from the group sorted by ``order``."""
    _group, elements = group
    ordered = sorted(elements, key=order)
    for start in range(0, len(ordered), size):
        yield tuple(ordered[start:start + size])


class FixedBatchHandler(ModelHandler):
    """A RunInference model handler whose examples are whole batches from :func:`fixed_batches`.

    RunInference passes them one at a time and never regroups them; the model is loaded once
    per worker process on a CPU, once per GPU (shared across the worker's processes) on a GPU.
    Subclasses set :attr:`metrics_namespace` and implement ``load_model`` and ``run_inference``."""

    metrics_namespace = ""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def batch_elements_kwargs(self):
        return {"min_batch_size": 1, "max_batch_size": 1}

    def share_model_across_processes(self) -> bool:
        return resolve_device(self.cfg.device) != "cpu"

    def model_copies(self) -> int:
        return 1

    def get_metrics_namespace(self) -> str:
        return self.metrics_namespace
