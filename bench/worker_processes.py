"""Local runner, one worker versus one worker process per core, on a CPU-bound stage.

Default stage: the directions stage (``ComputeDirections``) over 800,000 activations of
d = 3584 made inside the pipeline from seeds (``bench/directions_memory.py``'s child): the
vector generation and the lifted partial combine are CPU-bound and split by bundle, and
little data crosses processes (partial sums), so worker processes
(``--direct_num_workers N --direct_running_mode multi_processing``, what
``daco build --workers N`` passes) can use every core. ``--stage concepts`` measures the
concept selection over WordNet instead, which does not gain: each worker loads WordNet and
every synset crosses a process boundary (measured 0.67x on an idle 2-core machine).

Each run is a fresh interpreter; the two settings are interleaved over ``--rounds`` and
medians are quoted. The machine is shared, so the load average is recorded with every run.

    .venv/bin/python bench/worker_processes.py [--rounds 3] [--workers auto] [--stage directions|concepts]

Writes bench/results/multiprocess.json; prints the speed-up last.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PRINT_PEAK, median, run_child, write_result  # noqa: E402

CHILDREN = {
    "directions": """
import sys; sys.path.insert(0, "bench")
from directions_memory import child
from pipeline.runner import local_worker_args
child(800_000, 3584, 400, local_worker_args({workers!r}))
""",
    "concepts": """
import logging, tempfile; logging.disable(logging.WARNING)
from pipeline.cli import main
from pipeline.runner import local_worker_args
out = tempfile.mkdtemp()
assert main(["concepts", "--out", out, "--max-concepts", "15000", *local_worker_args({workers!r})]) == 0
""",
}
STAGES = {"directions": "ComputeDirections, 800,000 activations of d=3584 generated from seeds, 400 concepts",
          "concepts": "daco concepts (WordNet -> 15,000 concepts)"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", default="auto", help="worker processes of the parallel run (auto: one per core)")
    parser.add_argument("--stage", choices=sorted(CHILDREN), default="directions")
    args = parser.parse_args(argv)
    from pipeline.runner import local_worker_args

    parallel = int(local_worker_args(args.workers)[1]) if args.workers != "1" else 1
    settings = {"1 worker": 1, f"{parallel} workers": parallel}
    runs = {name: [] for name in settings}
    for round_ in range(args.rounds):
        order = list(settings) if round_ % 2 == 0 else list(reversed(settings))
        for name in order:
            load_before = os.getloadavg()[0]
            wall, peak, _ = run_child(CHILDREN[args.stage].format(workers=settings[name]) + PRINT_PEAK)
            runs[name].append({"wall_s": wall, "peak_rss_mib": peak, "load_1min_before": load_before,
                               "load_1min_after": os.getloadavg()[0]})
            print(f"round {round_ + 1}: {name:<10} {wall:6.1f} s  peak {peak:6.0f} MiB  "
                  f"load {load_before:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)
    walls = {name: median([r["wall_s"] for r in rs]) for name, rs in runs.items()}
    one, many = walls["1 worker"], walls[f"{parallel} workers"]
    speedup = one / many
    write_result("multiprocess" if args.stage == "directions" else f"multiprocess_{args.stage}", {
        "stage": STAGES[args.stage],
        "workers": parallel, "rounds": runs, "median_wall_s": walls, "speedup": speedup, "goal": ">= 1.6",
        "note": "shared machine: see load_1min_before/after of each run"})
    for name, wall in walls.items():
        print(f"{name:<10} median wall {wall:.1f} s")
    print(f"local runner, {parallel} worker processes vs 1 on the {args.stage} stage: {speedup:.2f}x speed-up "
          f"({one:.1f} s -> {many:.1f} s, median of {args.rounds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
