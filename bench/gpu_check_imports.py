"""Check the GPU check's wheel list here: run ``gpu_check.py --smoke`` importing only what the GPU machine would.

Every installed distribution that is neither in the GPU machine's image
(``bench/gpu_machine_packages.txt``) nor among the carried wheels (``--carry``, the
Makefile's ``GPU_CHECK_WHEELS``) is made unimportable, as are the ``google.*`` packages
other than protobuf (a namespace shared by many distributions). An import that the
smoke run needs and the list lacks fails it, naming the module; the distributions that
were asked for and refused are printed last (optional imports, e.g. Beam's GCP extras).

    make gpu-check-imports          # the Makefile's list
    python bench/gpu_check_imports.py --carry "apache-beam==2.77.0 open-clip-torch==3.3.0 ..."
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.metadata
import importlib.util
import re
import runpy
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
MACHINE = BENCH / "gpu_machine_packages.txt"


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


class MachineImports(importlib.abc.MetaPathFinder):
    """Refuses top-level modules whose distributions are all outside ``allowed``."""

    def __init__(self, allowed: set[str]):
        self.allowed = allowed
        self.owners = importlib.metadata.packages_distributions()
        self.refused: set[str] = set()

    def blocked(self, name: str) -> bool:
        top, *rest = name.split(".")
        if top in sys.stdlib_module_names:
            return False
        if top == "google" and rest and rest[0] not in ("protobuf", "_upb"):
            return True
        owners = self.owners.get(top)
        return bool(owners) and not any(normalise(d) in self.allowed for d in owners)

    def find_spec(self, name, path=None, target=None):
        if self.blocked(name):
            self.refused.add(name if name.startswith("google.") else name.split(".")[0])
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU machine nor carried)", name=name)
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--carry", required=True, help="the carried wheels, as pip requirements (NAME==VERSION ...)")
    args = parser.parse_args()
    machine = [line.strip() for line in MACHINE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    carried = [re.split(r"[=<>!~ ]", spec, maxsplit=1)[0] for spec in args.carry.split()]
    finder = MachineImports({normalise(n) for n in machine + carried} | {"daco400k"})
    sys.meta_path.insert(0, finder)
    find_spec = importlib.util.find_spec

    def machine_find_spec(name, package=None):  # absent, as on the machine, rather than an error
        return None if finder.blocked(name) else find_spec(name, package)

    importlib.util.find_spec = machine_find_spec
    sys.argv = [str(BENCH / "gpu_check.py"), "--smoke", "--out", str(BENCH / "results" / "gpu_check_smoke.json")]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exit_:
        status = exit_.code or 0
    else:
        status = 0
    print(f"refused (not needed by the run when it passed): {', '.join(sorted(finder.refused)) or 'none'}")
    print(f"smoke run importing only the GPU machine's packages and {len(carried)} carried wheels: "
          f"{'passed' if status == 0 else f'FAILED (exit status {status})'}")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
