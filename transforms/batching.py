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
