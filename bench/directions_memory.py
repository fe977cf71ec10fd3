"""Peak memory of the directions stage at 400,000 versus 40,000 activations (goal: ratio <= 1.2).

Each run is its own subprocess (``--child``) that builds ComputeDirections on the local
runner (FnApiRunner) over synthetic activations: the input is a handful of
(concept, first stimulus, count) chunk descriptors, and a DoFn makes each stimulus's
pooled vector from a seed, so the input itself takes no memory. ``concepts``
concepts (half of each concept's stimuli positive, half negative) at one layer. The
child reports its own peak RSS (``getrusage(RUSAGE_SELF)``) and its RSS after imports;
the parent interleaves the two sizes over ``--rounds`` rounds and takes medians.

    .venv/bin/python bench/directions_memory.py            # d=3584 (the issue's), 1 round
    .venv/bin/python bench/directions_memory.py --quick    # d=512, a quick look

Writes bench/results/directions_memory.json; the ratio is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "directions_memory.json"
SMALL, LARGE = 40_000, 400_000
CHUNK = 500  # stimuli generated per DoFn call


def _rss_now() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """Peak resident set of this process and of any child it waited for, in bytes (Linux: ru_maxrss in KiB)."""
    return 1024 * max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def child(n: int, dim: int, concepts: int, beam_args: list[str] | None = None) -> dict:
    """One measured run: ComputeDirections over ``n`` synthetic activations of dimension ``dim``."""
    import apache_beam as beam
    import numpy as np

    from pipeline.runner import quiet_beam_logging, run_pipeline
    from transforms.directions import ComputeDirections

    quiet_beam_logging()
    per_concept = n // concepts

    def chunks():
        for c in range(concepts):
            for start in range(0, per_concept, CHUNK):
                yield c, start, min(CHUNK, per_concept - start)

    def activations(chunk):
        c, start, count = chunk
        rng = np.random.default_rng([c, start])
        block = rng.standard_normal((count, dim), dtype=np.float32)
        for i in range(count):
            role = "positive" if (start + i) % 2 == 0 else "negative"
            yield (f"concept{c:04d}.n.01", 15, role), (f"{c}/{start + i}", block[i])

    rss_after_imports = _rss_now()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        counters = run_pipeline(lambda p: (
            p | beam.Create(list(chunks())) | beam.FlatMap(activations) | ComputeDirections(out)
            | beam.combiners.Count.Globally()), beam_args)
    seconds = time.perf_counter() - started
    assert counters["directions.averaged"] == n and counters["directions.kept"] == concepts, counters
    return {"n": n, "dim": dim, "concepts": concepts, "seconds": seconds,
            "peak_rss_bytes": _peak_rss(), "rss_after_imports_bytes": rss_after_imports}


def _measure(n: int, dim: int, concepts: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(n), "--dim", str(dim), "--concepts", str(concepts)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child run n={n} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  n={n:>7,} d={dim}: peak RSS {result['peak_rss_bytes'] / 2**20:,.0f} MiB "
          f"(after imports {result['rss_after_imports_bytes'] / 2**20:,.0f} MiB), {result['seconds']:.1f} s", flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=3584, help="activation dimension (default 3584, Qwen2.5-VL-7B)")
    parser.add_argument("--quick", action="store_true", help="d=512 instead of the default, for a quick look")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; medians are reported")
    parser.add_argument("--concepts", type=int, default=100, help="concepts the activations are spread over")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dim = 512 if args.quick else args.dim
    if args.child is not None:
        print(json.dumps(child(args.child, dim, args.concepts)))
        return 0

    runs = {SMALL: [], LARGE: []}
    for r in range(args.rounds):
        for n in ((SMALL, LARGE) if r % 2 == 0 else (LARGE, SMALL)):
            runs[n].append(_measure(n, dim, args.concepts))
    peak = {n: statistics.median(x["peak_rss_bytes"] for x in rs) for n, rs in runs.items()}
    base = {n: statistics.median(x["rss_after_imports_bytes"] for x in rs) for n, rs in runs.items()}
    ratio = peak[LARGE] / peak[SMALL]
    growth = (peak[LARGE] - base[LARGE]) / max(peak[SMALL] - base[SMALL], 1)
    result = {
        "benchmark": "directions_memory", "dim": dim, "concepts": args.concepts, "rounds": args.rounds,
        "runner": "FnApiRunner (local, 1 worker)", "cpus": os.cpu_count(),
        "peak_rss_mib": {str(n): peak[n] / 2**20 for n in peak},
        "pipeline_rss_mib": {str(n): (peak[n] - base[n]) / 2**20 for n in peak},
        "seconds": {str(n): statistics.median(x["seconds"] for x in rs) for n, rs in runs.items()},
        "runs": runs, "peak_ratio": ratio, "pipeline_growth_ratio": growth, "goal": "peak_ratio <= 1.2",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"pipeline memory above imports: {growth:.2f}x ({(peak[SMALL] - base[SMALL]) / 2**20:,.0f} -> "
          f"{(peak[LARGE] - base[LARGE]) / 2**20:,.0f} MiB)")
    print(f"directions stage peak RSS, {LARGE:,} vs {SMALL:,} activations (d={dim}): {ratio:.3f}x "
          f"({peak[SMALL] / 2**20:,.0f} -> {peak[LARGE] / 2**20:,.0f} MiB; goal <= 1.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
