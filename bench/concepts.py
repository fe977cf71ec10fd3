"""Concept stage: full WordNet -> 15,000 concepts through Beam's local runner versus the
same transform logic called directly in one process.

Each run is a fresh interpreter (so peak memory is its own); the two are interleaved
over rounds and medians are quoted. Prints the pipeline overhead ratio last.

    python bench/concepts.py [--rounds 3] [--max-concepts 15000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PRINT_PEAK, median, run_child, write_result  # noqa: E402

DIRECT = """
import warnings; warnings.filterwarnings("ignore")
from transforms.concepts import ConceptsConfig, select_concepts_direct
rows, counts = select_concepts_direct(ConceptsConfig(max_concepts={n}))
assert len(rows) == {n}
""" + PRINT_PEAK

PIPELINE = """
import logging, tempfile; logging.disable(logging.WARNING)
from pipeline.cli import main
out = tempfile.mkdtemp()
assert main(["concepts", "--out", out, "--max-concepts", "{n}"]) == 0
""" + PRINT_PEAK


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-concepts", type=int, default=15000)
    args = parser.parse_args()
    runs = {"direct": [], "beam": []}
    for round_ in range(args.rounds):
        for name, code in (("direct", DIRECT), ("beam", PIPELINE)):
            wall, peak, _ = run_child(code.format(n=args.max_concepts))
            runs[name].append({"wall_s": wall, "peak_rss_mib": peak})
            print(f"round {round_ + 1}: {name:<6} {wall:6.1f} s  peak {peak:7.0f} MiB", flush=True)
    summary = {
        name: {key: median([r[key] for r in rs]) for key in ("wall_s", "peak_rss_mib")} for name, rs in runs.items()
    }
    ratio_time = summary["beam"]["wall_s"] / summary["direct"]["wall_s"]
    ratio_mem = summary["beam"]["peak_rss_mib"] / summary["direct"]["peak_rss_mib"]
    write_result("concepts", {"max_concepts": args.max_concepts, "rounds": runs, "median": summary,
                              "beam_over_direct_wall": ratio_time, "beam_over_direct_peak_rss": ratio_mem})
    for name, s in summary.items():
        print(f"{name:<6} median wall {s['wall_s']:.1f} s, peak RSS {s['peak_rss_mib']:.0f} MiB")
    print(f"beam/direct peak memory: {ratio_mem:.2f}x")
    print(f"beam/direct wall time (pipeline overhead): {ratio_time:.2f}x")


if __name__ == "__main__":
    main()
