"""Directions stage: pooled MLLM activations -> one direction per (concept, layer) (docs/methods.md §1.4).

``d_{l,c} = mean_{x in X+} z_l(x) - mean_{x in X-} z_l(x)``

Input contract (what the activation stage emits), one element per stimulus and layer::

    ((concept_id: str, layer: int, role: "positive" | "negative"), value)

where ``value`` is the pooled activation, a 1-D float numpy array of length d
(float32 from the model), or ``(stimulus_key: str, vector)`` so that a bad
vector's dead letter names its stimulus.

Steps, each counted in the ``directions`` namespace:

1. check each activation (``read``): malformed elements, roles other than
   positive/negative, vectors that are not 1-D and non-empty, and vectors with
   NaN or inf are dead-lettered (``deadletter_malformed``, ``deadletter_bad_role``,
   ``deadletter_bad_shape``, ``deadletter_non_finite``) and never averaged; the
   rest are ``averaged``;
2. :class:`VectorMean`, a CombineFn per (concept, layer, role, d): float64 sums
   with a float64 compensation term (TwoSum), and counts. Beam lifts it into a
   partial combine before the shuffle, so memory holds one accumulator per key,
   never the vectors: it does not grow with the number of stimuli. Sums are
   exact to ~106 bits, so the float32 direction does not depend on how the work
   was split or ordered (same inputs, same bytes);
3. per (concept, layer) (``concept_layers``): ``direction = mean_pos - mean_neg``
   in float64, stored as float32, with ``n_pos``, ``n_neg`` and ``norm`` (``kept``).
   A concept without positives or without negatives at a layer, with two
   vector lengths, or whose direction overflows float32 is dead-lettered
   (``deadletter_no_positives``, ``deadletter_no_negatives``,
   ``deadletter_dimension_mismatch``, ``deadletter_non_finite_direction``).

Memory is one accumulator per key (16 bytes per dimension), independent of the number of
stimuli; the whole job holds keys x d of them, e.g. 15,000 concepts x 5 layers x 2 roles at
d=3584 is ~8.6 GB in total, which a distributed runner spreads over workers by key
(bench/directions_memory.py measures the local runner).

Dead letters go to ``OUT/deadletter/directions.jsonl``, each with ``concept_id``,
``layer`` and ``role`` fields besides the common ones (stage, source, key, reason).
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from transforms.counters import Reconciliation
from transforms.deadletter import DEAD, WriteDeadLetters, dead_letter
from transforms.progress import ProgressLog

NAMESPACE = "directions"
ROLES = ("positive", "negative")
VECTOR_FAILURES = ("malformed", "bad_role", "bad_shape", "non_finite")
CONCEPT_LAYER_FAILURES = ("no_positives", "no_negatives", "dimension_mismatch", "non_finite_direction")


def _dead(reason: str, concept_id, layer, role, key: str, detail: str = ""):
    """A dead letter of this stage carrying the concept, layer and role as fields of their own."""
    tagged = dead_letter(NAMESPACE, str(concept_id), key, reason, detail)
    tagged.value.update({"concept_id": str(concept_id), "layer": layer, "role": role})
    return tagged


def parse_activation(element) -> tuple[tuple[str, int, str], str | None, object]:
    """Split an input element into ((concept_id, layer, role), stimulus key or None, vector).

    Raises ValueError when the element does not follow the input contract.
    """
    try:
        (concept_id, layer, role), value = element
    except (TypeError, ValueError):
        raise ValueError("expected ((concept_id, layer, role), vector)") from None
    stimulus = None
    if isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError("a tuple value must be (stimulus_key, vector)")
        stimulus, value = str(value[0]), value[1]
    return (str(concept_id), int(layer), str(role)), stimulus, value


class _CheckActivations(beam.DoFn):
    """Valid activations keyed by (concept, layer, role, d); bad ones dead-lettered."""

    def __init__(self):
        self.read = Metrics.counter(NAMESPACE, "read")
        self.averaged = Metrics.counter(NAMESPACE, "averaged")

    def setup(self):
        self.progress = ProgressLog(NAMESPACE, "activations")

    def process(self, element):
        self.read.inc()
        self.progress.update()
        try:
            (concept_id, layer, role), stimulus, value = parse_activation(element)
        except (TypeError, ValueError) as exc:
            yield _dead("malformed", "", None, None, repr(element)[:200], str(exc))
            return
        key = stimulus or f"{concept_id}|{layer}|{role}"
        if role not in ROLES:
            yield _dead("bad_role", concept_id, layer, role, key, f"role must be one of {ROLES}")
            return
        vector = np.asarray(value)
        if vector.ndim != 1 or vector.size == 0 or not np.issubdtype(vector.dtype, np.number):
            yield _dead("bad_shape", concept_id, layer, role, key,
                        f"expected a non-empty 1-D numeric vector, got shape {vector.shape} dtype {vector.dtype}")
            return
        finite = np.isfinite(vector)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            yield _dead("non_finite", concept_id, layer, role, key,
                        f"{bad.size} of {vector.size} values are NaN/inf (first at index {int(bad[0])})")
            return
        self.averaged.inc()
        yield (concept_id, layer, role, int(vector.size)), vector


def _two_sum(a, b):
    """(s, e) with s = fl(a + b) and a + b = s + e exactly (Knuth's TwoSum), elementwise."""
    s = a + b
    b_virtual = s - a
    return s, (a - (s - b_virtual)) + (b - b_virtual)


class VectorMean(beam.CombineFn):
    """Mean of equal-length vectors: a compensated float64 sum and a count.

    The accumulator is ``(hi, lo, count)`` with the exact sum ~= hi + lo
    (float64 arrays, or 0.0 while empty). Output: ``(mean float64 [d], count)``.
    """

    def create_accumulator(self):
        return 0.0, 0.0, 0

    def add_input(self, accumulator, vector):
        hi, lo, count = accumulator
        hi, err = _two_sum(hi, np.asarray(vector, dtype=np.float64))
        return hi, lo + err, count + 1

    def merge_accumulators(self, accumulators):
        hi, lo, count = 0.0, 0.0, 0
        for other_hi, other_lo, other_count in accumulators:
            hi, err = _two_sum(hi, other_hi)
            lo = lo + other_lo + err
            count += other_count
        return hi, lo, count

    def compact(self, accumulator):
        hi, lo, count = accumulator
        total = hi + lo  # renormalise so that |lo| stays within one rounding of hi
        return total, lo - (total - hi), count

    def extract_output(self, accumulator):
        hi, lo, count = accumulator
        return (hi + lo) / count, count


def direction_row(concept_id: str, layer: int, means: list[tuple[str, int, np.ndarray, int]]):
    """The dictionary row of one (concept, layer) from its per-role means, or (reason, detail).

    ``means``: (role, d, mean float64 [d], count) per role and vector length.
    Returns ``(row, None)`` or ``(None, (reason, detail))``.
    """
    dims = sorted({d for _role, d, _mean, _count in means})
    if len(dims) > 1:
        return None, ("dimension_mismatch", f"vectors of lengths {dims} at one layer")
    by_role = {role: (mean, count) for role, _d, mean, count in means}
    if "positive" not in by_role:
        return None, ("no_positives", f"n_pos=0 n_neg={by_role['negative'][1]}")
    if "negative" not in by_role:
        return None, ("no_negatives", f"n_pos={by_role['positive'][1]} n_neg=0")
    (mean_pos, n_pos), (mean_neg, n_neg) = by_role["positive"], by_role["negative"]
    with np.errstate(over="ignore"):
        direction = (mean_pos - mean_neg).astype(np.float32)
    if not np.isfinite(direction).all():
        return None, ("non_finite_direction", "mean_pos - mean_neg overflows float32")
    norm = float(np.linalg.norm(direction.astype(np.float64)))
    return {"concept_id": concept_id, "layer": layer, "direction": direction,
            "n_pos": int(n_pos), "n_neg": int(n_neg), "norm": norm}, None


class _Directions(beam.DoFn):
    def __init__(self):
        self.concept_layers = Metrics.counter(NAMESPACE, "concept_layers")
        self.kept = Metrics.counter(NAMESPACE, "kept")

    def process(self, element):
        (concept_id, layer), means = element
        self.concept_layers.inc()
        row, failure = direction_row(concept_id, layer, sorted(means, key=lambda m: (m[0], m[1])))
        if failure:
            reason, detail = failure
            yield _dead(reason, concept_id, layer, None, f"{concept_id}|{layer}", detail)
        else:
            self.kept.inc()
            yield row


class ComputeDirections(beam.PTransform):
    """Activations (see the module's input contract) -> a PCollection of dictionary rows.

    A row is ``{"concept_id", "layer", "direction": float32 [d], "n_pos", "n_neg", "norm"}``.
    Dead letters are written to ``OUT/deadletter/directions.jsonl``.
    """

    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir

    def expand(self, activations):
        checked = activations | "Check" >> (
            beam.ParDo(_CheckActivations()).with_output_types(tuple[tuple[str, int, str, int], Any])
            .with_outputs(DEAD, main="ok"))
        results = (
            checked["ok"]
            | "MeanPerConceptLayerRole" >> beam.CombinePerKey(VectorMean())
            | "ByConceptLayer" >> beam.MapTuple(lambda key, mean: ((key[0], key[1]), (key[2], key[3], *mean)))
            | "PairRoles" >> beam.GroupByKey()
            | "Direction" >> beam.ParDo(_Directions()).with_outputs(DEAD, main="rows")
        )
        (
            (checked[DEAD], results[DEAD])
            | "AllDeadLetters" >> beam.Flatten()
            | "WriteDeadLetters" >> WriteDeadLetters(self.out_dir, NAMESPACE)
        )
        return results["rows"]


RECONCILIATION = Reconciliation(NAMESPACE, "read", tuple(f"deadletter_{f}" for f in VECTOR_FAILURES) + ("averaged",))
RECONCILIATION_CONCEPT_LAYERS = Reconciliation(
    NAMESPACE, "concept_layers", tuple(f"deadletter_{f}" for f in CONCEPT_LAYER_FAILURES) + ("kept",))
RECONCILIATIONS = [RECONCILIATION, RECONCILIATION_CONCEPT_LAYERS]
