"""Helpers shared by the benchmarks: timing children, medians, writing results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def run_child(code: str) -> tuple[float, float, str]:
    """Run Python ``code`` in a fresh interpreter: (wall seconds, peak RSS MiB, stdout).

    ``code`` must end with :data:`PRINT_PEAK`, so the child reports its own peak memory."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-3000:]}")
    return wall, _child_peak(proc.stdout), proc.stdout


def _child_peak(stdout: str) -> float:
    for line in stdout.splitlines():
        if line.startswith("PEAK_RSS_MIB="):
            return float(line.split("=", 1)[1])
    raise RuntimeError("benchmark child did not print PEAK_RSS_MIB=")


PRINT_PEAK = (
    "\nimport resource; print('PEAK_RSS_MIB=%.1f' % (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))"
)


def median(values) -> float:
    """Median of a list of numbers."""
    return float(statistics.median(values))


def write_result(name: str, result: dict) -> Path:
    """Write ``bench/results/<name>.json`` with the machine it ran on."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {**result, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                    "platform": platform.platform()}}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return path
