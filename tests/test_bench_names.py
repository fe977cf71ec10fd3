"""The benchmarks put bench/ on sys.path (to import each other), and so does tests/test_gpu_check.py:
a bench script named like an installed module would shadow it for the whole test session
(bench/multiprocess.py once hid the `multiprocess` package that `datasets` imports)."""

from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_no_bench_script_shadows_an_installed_module():
    elsewhere = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
    shadowing = sorted(script.name for script in BENCH.glob("*.py")
                       if script.stem in sys.builtin_module_names
                       or importlib.machinery.PathFinder.find_spec(script.stem, elsewhere) is not None)
    assert not shadowing, f"bench scripts named like installed modules (rename them): {shadowing}"
