"""Model batches fixed by the data alone, so that outputs do not depend on bundling.

A kernel's result for one example can change, in the last bits, with the other examples
of its batch (padding, and the blocking a BLAS or convolution kernel picks for the batch
size). Batches that RunInference forms from bundles therefore make bytes depend on input
order, worker count and runner. The stages that run a model (embedding, activations)
instead spread their elements over groups by a stable hash of their key, group them, and
cut each group, sorted by a key of the data, into batches (:class:`FixedBatches`): the same
data gives the same batches everywhere. The number of groups is a function of the number of
elements (:func:`n_groups`): enough for every group to fill :data:`BATCHES_PER_GROUP` batches,
at most :data:`BATCH_GROUPS`; so 2,000 pairs are not scattered into 1,000 part-filled batches,
and 400,000 spread over 1,024 groups for the runner to parallelise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import apache_beam as beam
from apache_beam.ml.inference.base import ModelHandler

from transforms.config import resolve_device

BATCH_GROUPS = 1024
"""At most this many groups (the unit of parallelism of the model stages)."""
BATCHES_PER_GROUP = 4
"""Groups are made few enough for each to hold about this many full batches."""


def n_groups(n_elements: int, size: int) -> int:
    """How many groups ``n_elements`` elements are spread over, for batches of ``size``."""
    return max(1, min(BATCH_GROUPS, n_elements // (size * BATCHES_PER_GROUP)))


def batch_group(key: str, groups: int) -> int:
    """The group of an element key: a stable hash (same in every process and run), mod ``groups``."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % groups


def fixed_batches(group: tuple[int, Iterable[Any]], size: int, order: Callable[[Any], Any]) -> Iterator[tuple]:
    """(group, elements) -> tuples of at most ``size`` elements, cut from the group sorted by ``order``."""
    _group, elements = group
    ordered = sorted(elements, key=order)
    for start in range(0, len(ordered), size):
        yield tuple(ordered[start:start + size])


class FixedBatches(beam.PTransform):
    """Elements -> tuples of at most ``size`` elements, fixed by the data alone (module docstring):
    counted, spread over :func:`n_groups` groups by :func:`batch_group` of ``key(element)``,
    grouped, each group cut by :func:`fixed_batches` in ``order``."""

    def __init__(self, size: int, key: Callable[[Any], str], order: Callable[[Any], Any]):
        super().__init__()
        self.size, self.key, self.order = size, key, order

    def expand(self, elements):
        size, key = self.size, self.key
        count = elements | "Count" >> beam.combiners.Count.Globally()
        return (
            elements
            | "AssignGroup" >> beam.Map(lambda e, n: (batch_group(key(e), n_groups(n, size)), e),
                                        beam.pvalue.AsSingleton(count))
            | "Group" >> beam.GroupByKey()
            | "Cut" >> beam.FlatMap(fixed_batches, size, self.order)
        )


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
