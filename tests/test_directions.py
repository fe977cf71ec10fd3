"""The directions stage on the real Beam runner: difference of means, dead letters, split independence."""

import json
import random

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import planted_activations
from pipeline.runner import run_pipeline
from transforms.directions import RECONCILIATIONS, ComputeDirections, VectorMean
from transforms.write import WriteDictionary

NAN_KEY = "planted0.n.01/positive/15/nan"
INF_KEY = "planted1.n.01/negative/16/inf"


def _bad_elements(d):
    nan = np.full(d, 1.0, np.float32)
    nan[3] = np.nan
    inf = np.full(d, -2.0, np.float32)
    inf[0] = np.inf
    return [
        (("planted0.n.01", 15, "positive"), (NAN_KEY, nan)),                 # dead-lettered, not averaged
        (("planted1.n.01", 16, "negative"), (INF_KEY, inf)),
        (("lonely.n.01", 15, "positive"), np.ones(d, np.float32)),           # no negatives
        (("planted2.n.01", 15, "neutral"), np.ones(d, np.float32)),          # not a role
        (("planted2.n.01", 15, "positive"), np.ones((2, d), np.float32)),    # not 1-D
        ("not an activation",),                                               # malformed
    ]


def _run(out, elements, beam_args=None, reshuffle=False):
    def build(p):
        pcoll = p | beam.Create(elements)
        if reshuffle:
            pcoll = pcoll | beam.Reshuffle()
        pcoll | ComputeDirections(str(out)) | WriteDictionary(str(out))

    return run_pipeline(build, beam_args)


@pytest.fixture(scope="module")
def planted():
    elements, reference = planted_activations(d=16)
    return elements + _bad_elements(16), reference


@pytest.fixture(scope="module")
def first_run(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("directions")
    counters = _run(out, planted[0])
    return out, counters


def _rows(out):
    rows = {}
    for path in sorted((out / "dictionary").glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            rows[(row["concept_id"], row["layer"])] = row
    return rows


def test_directions_equal_the_float64_mean_difference(planted, first_run):
    out, _counters = first_run
    rows = _rows(out)
    assert set(rows) == set(planted[1])
    for key, (exact, n_pos, n_neg) in planted[1].items():
        row = rows[key]
        direction = np.asarray(row["direction"], np.float32)
        # the exact (fsum) reference, rounded to float32: equal to the last bit
        np.testing.assert_array_equal(direction, exact.astype(np.float32), err_msg=str(key))
        # numpy's float64 mean difference over the same (finite) vectors
        vecs = {role: np.stack([v for (c, l, r), (_k, v) in planted[0][:-6] if (c, l, r) == (*key, role)]).astype(np.float64)
                for role in ("positive", "negative")}
        np.testing.assert_allclose(direction, vecs["positive"].mean(0) - vecs["negative"].mean(0), rtol=1e-6, atol=1e-6)
        assert (row["n_pos"], row["n_neg"]) == (n_pos, n_neg)
        assert row["norm"] == pytest.approx(float(np.linalg.norm(direction.astype(np.float64))), rel=1e-6)


def test_bad_activations_are_dead_lettered_counted_and_not_averaged(planted, first_run):
    out, counters = first_run
    good = len(planted[0]) - 6
    assert counters["directions.read"] == good + 6
    assert counters["directions.averaged"] == good + 1  # + the lonely positive
    assert counters["directions.deadletter_non_finite"] == 2
    assert counters["directions.deadletter_bad_role"] == 1
    assert counters["directions.deadletter_bad_shape"] == 1
    assert counters["directions.deadletter_malformed"] == 1
    assert counters["directions.deadletter_no_negatives"] == 1
    assert counters["directions.kept"] == len(planted[1])
    for rec in RECONCILIATIONS:
        ok, line = rec.check(counters)
        assert ok, line
    letters = [json.loads(line) for line in (out / "deadletter" / "directions.jsonl").read_text().splitlines()]
    by_reason = {}
    for letter in letters:
        assert letter["stage"] == "directions"
        by_reason.setdefault(letter["reason"], []).append(letter)
    nan = next(r for r in by_reason["non_finite"] if r["key"] == NAN_KEY)
    assert (nan["concept_id"], nan["layer"], nan["role"]) == ("planted0.n.01", 15, "positive")
    assert "NaN/inf" in nan["detail"]
    assert {r["key"] for r in by_reason["non_finite"]} == {NAN_KEY, INF_KEY}
    assert by_reason["no_negatives"][0]["concept_id"] == "lonely.n.01"
    # the NaN vector's concept keeps its direction from the finite vectors only (checked exactly above)
    assert ("planted0.n.01", 15) in _rows(out) and ("lonely.n.01", 15) not in _rows(out)


def test_same_bytes_however_the_work_is_split_and_stale_layers_are_removed(planted, first_run, tmp_path):
    out, _counters = first_run
    shuffled = list(planted[0])
    random.Random(7).shuffle(shuffled)
    (tmp_path / "dictionary").mkdir()
    (tmp_path / "dictionary" / "layer_099.parquet").write_bytes(b"stale: from an earlier run with other layers")
    _run(tmp_path, shuffled, ["--direct_num_workers=2", "--direct_running_mode=multi_threading"], reshuffle=True)
    names = sorted(p.name for p in (out / "dictionary").glob("*.parquet"))
    assert names == ["layer_015.parquet", "layer_016.parquet"]
    assert names == sorted(p.name for p in (tmp_path / "dictionary").glob("*.parquet"))
    for name in names:
        assert (out / "dictionary" / name).read_bytes() == (tmp_path / "dictionary" / name).read_bytes(), name
    assert (out / "deadletter" / "directions.jsonl").read_bytes() == (tmp_path / "deadletter" / "directions.jsonl").read_bytes()


def test_vector_mean_is_exact_where_a_plain_float64_sum_depends_on_order():
    vectors = [np.array([1e20, 1.0, 3.0]), np.array([1.0, 1e-20, -1e16]), np.array([-1e20, -1.0, 1e16])]
    assert (1e20 + 1.0) - 1e20 != (1e20 - 1e20) + 1.0  # a plain float64 sum would differ
    fn = VectorMean()
    outputs = set()
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        acc = fn.create_accumulator()
        for i in order:
            acc = fn.add_input(acc, vectors[i])
        outputs.add(fn.extract_output(acc)[0].tobytes())
        # the same inputs split over two partial accumulators, merged (compacted like Beam does)
        left = fn.compact(fn.add_input(fn.create_accumulator(), vectors[order[0]]))
        right = fn.add_input(fn.add_input(fn.create_accumulator(), vectors[order[1]]), vectors[order[2]])
        mean, count = fn.extract_output(fn.merge_accumulators([right, left]))
        outputs.add(mean.tobytes())
        assert count == 3
    assert len(outputs) == 1
    np.testing.assert_array_equal(np.frombuffer(outputs.pop()), np.array([1.0, 1e-20, 3.0]) / 3)
