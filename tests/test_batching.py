"""Model batches fixed by the data (transforms/batching.py): the number of groups follows the data size."""

import random

import apache_beam as beam

from pipeline.runner import run_pipeline
from transforms.batching import BATCH_GROUPS, FixedBatches, n_groups


def test_group_count_follows_the_number_of_elements():
    assert n_groups(10, 16) == 1                      # a small input: one group, not ten batches of one
    assert n_groups(2_000, 16) == 2_000 // (16 * 4)   # each group holds about four full batches
    assert n_groups(10**7, 16) == BATCH_GROUPS        # a large one: capped, for the runner to parallelise


def _batches(elements, size, tmp_path, name):
    out = tmp_path / name

    def build(p):
        (p | beam.Create(elements) | FixedBatches(size, str, lambda e: e)
         | beam.Map(lambda b: ",".join(map(str, b))) | beam.io.WriteToText(str(out)))

    run_pipeline(build, [])
    return sorted(line for f in tmp_path.glob(f"{name}*") for line in f.read_text().split("\n") if line)


def test_batches_are_the_same_in_any_order_and_nearly_all_full(tmp_path):
    elements = list(range(300))
    shuffled = random.Random(0).sample(elements, len(elements))
    first, second = _batches(elements, 8, tmp_path, "a"), _batches(shuffled, 8, tmp_path, "b")
    assert first == second
    sizes = [len(b.split(",")) for b in first]
    assert sum(sizes) == 300 and max(sizes) == 8
    assert sum(s < 8 for s in sizes) <= n_groups(300, 8) == 9  # at most one part-filled batch per group
