"""Running a Beam graph: runner choice, options, counters, and the closing summary.

Locally the graph runs on Beam's FnApiRunner, named explicitly: ``DirectRunner``
may hand a pipeline to the Prism runner, which downloads a binary at run time,
so local runs would neither be offline-safe nor deterministic. ``--runner
local`` (the default), ``DirectRunner`` and ``FnApiRunner`` all mean that.
``--direct_num_workers N --direct_running_mode multi_processing`` runs it with
N worker processes; :func:`local_worker_args` makes those options from ``--workers N|auto``
(``daco build --workers auto``: one worker process per core). Any other ``--runner`` (DataflowRunner, FlinkRunner, ...)
is passed to Beam as given.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from transforms.counters import Reconciliation

LOCAL_RUNNER_NAMES = {None, "local", "DirectRunner", "FnApiRunner"}

#: Runners refused, and why (docs/reliability.md; dataflow/README.md lists the supported ones).
REFUSED_RUNNERS = {
    "DaskRunner": "Beam's Dask runner drops data without an error: output emitted in finish_bundle, "
                  "CombineGlobally/Top.Of results, part of BatchElements/RunInference batches and tagged "
                  "outputs (dead letters) are lost, so a stage can write 0 rows and report success",
}


def quiet_beam_logging() -> None:
    """Keep Beam's import-time warnings (optional GCP clients) off the user's terminal."""
    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger("apache_beam").setLevel(logging.ERROR)


def pipeline_options(beam_args: list[str] | None) -> PipelineOptions:
    """Beam options from command-line style arguments (``--runner``, ``--direct_num_workers``, ...)."""
    return PipelineOptions(list(beam_args or []))


def local_worker_args(workers: str | int | None) -> list[str]:
    """Beam options running the local runner with ``workers`` processes ("auto": one per core);
    [] for None. Anything else than a positive integer or "auto" is a ValueError naming --workers."""
    if workers is None:
        return []
    count = (os.cpu_count() or 1) if str(workers) == "auto" else (int(workers) if str(workers).isdigit() else 0)
    if count < 1:
        raise ValueError(f"--workers {workers!r}: give a number of worker processes >= 1, or 'auto' (one per core)")
    if count == 1:
        return ["--direct_num_workers", "1"]
    return ["--direct_num_workers", str(count), "--direct_running_mode", "multi_processing"]


def _runner_for(options: PipelineOptions):
    name = options.view_as(StandardOptions).runner
    refused = next((why for runner, why in REFUSED_RUNNERS.items()
                    if str(name).split(".")[-1].lower() in (runner.lower(), runner[:-len("Runner")].lower())), None)
    if refused:
        raise SystemExit(f"--runner {name}: not supported: {refused}. Use the local runner (default) or "
                         "DataflowRunner (dataflow/README.md)")
    if name in LOCAL_RUNNER_NAMES:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return FnApiRunner()
    return name


def run_pipeline(build: Callable[[beam.Pipeline], object], beam_args: list[str] | None = None) -> dict[str, int]:
    """Build the graph with ``build(pipeline)``, run it to completion, return its counters.

    Counters come back as ``{"namespace.name": value}``, summed over steps.
    """
    options = pipeline_options(beam_args)
    pipeline = beam.Pipeline(runner=_runner_for(options), options=options)
    build(pipeline)
    result = pipeline.run()
    result.wait_until_finish()
    counters: dict[str, int] = {}
    for counter in result.metrics().query(MetricsFilter())["counters"]:
        key = f"{counter.key.metric.namespace}.{counter.key.metric.name}"
        value = counter.committed if counter.committed is not None else counter.attempted
        counters[key] = counters.get(key, 0) + int(value or 0)
    return counters


def print_summary(title: str, counters: dict[str, int], reconciliations: list[Reconciliation], out=None) -> bool:
    """Print every counter grouped by stage and check each reconciliation; True when all hold."""
    out = out or sys.stdout
    print(f"\n== {title} ==", file=out)
    namespaces = sorted({key.split(".", 1)[0] for key in counters})
    for ns in namespaces:
        print(f"  {ns}", file=out)
        for key in sorted(k for k in counters if k.split(".", 1)[0] == ns):
            print(f"    {key.split('.', 1)[1]:<28} {counters[key]:>12,}", file=out)
    if not counters:
        print("  not reconciled: this runner reports no counters, so nothing could be checked", file=out)
        return True
    ok = True
    for rec in reconciliations:
        good, line = rec.check(counters)
        ok &= good
        print(f"  {'ok  ' if good else 'FAIL'} {line}", file=out)
    return ok
