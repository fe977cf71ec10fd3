"""Counter bookkeeping shared by the stages: what must add up at the end of a run.

Each stage counts what it read, kept, skipped and dead-lettered with Beam
metrics in its own namespace, and declares a :class:`Reconciliation` saying
which counters must sum to which; the run's summary checks them all.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Reconciliation:
    """``total`` must equal the sum of ``parts``: counter names within ``namespace``, or
    ``other_stage.name`` for a counter of another stage (cross-stage checks)."""

    namespace: str
    total: str
    parts: tuple[str, ...]

    def check(self, counters: dict[str, int]) -> tuple[bool, str]:
        """(ok, one-line explanation)."""
        get = lambda name: counters.get(name if "." in name else f"{self.namespace}.{name}", 0)  # noqa: E731
        lhs, rhs = get(self.total), sum(get(p) for p in self.parts)
        sign = "=" if lhs == rhs else "!="
        return lhs == rhs, f"{self.namespace}: {self.total} {lhs:,} {sign} " + " + ".join(self.parts) + f" = {rhs:,}"
