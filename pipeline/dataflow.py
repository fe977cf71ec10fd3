"""Running ``daco build`` on Google Cloud Dataflow: option checks and the offline job plan.

:func:`validate` checks a Dataflow launch before anything is submitted (and before any
local work): the Google Cloud options, that every path a remote worker touches is a
``gs://`` URL, that the worker container is named, and that each model stage's GPU type
exists in the chosen region (:data:`GPU_REGIONS`). Every failure is a
:class:`DataflowOptionsError` whose message is one of :data:`MESSAGES`, listed in
dataflow/README.md.

:func:`write_plan` writes what the Dataflow service would receive, without network or
credentials: each Beam job of the build (phase 1, the concepts graph; phase 3, the main
graph) prepared by Beam's ``DataflowRunner.run_pipeline`` itself in its dry-run mode (its
Dataflow graph rewrites, the default Docker environment from ``--sdk_container_image``
with the pipeline-wide resource hints, environments resolved to Docker and merged,
``pack_combiners`` + ``sort_stages``; it stops before submitting) and serialised as the runner
API proto in JSON, next to the pipeline options and a per-transform summary of
environments and accelerator hints. What the plan cannot know offline is data: the
concept list (phase 1's output; the main graph is planned with an empty list, which
changes one ``Create`` payload and nothing else) and the shard listing (the plan takes
the brace expansion of ``--shards``; listing a bucket needs credentials).
"""

from __future__ import annotations

import base64
import os
import sys
from dataclasses import dataclass

DATAFLOW_RUNNERS = {"DataflowRunner", "dataflow", "Dataflow"}
ACCELERATOR_URN = "beam:resources:accelerator:v1"
PLAN_FORMAT = "daco-dataflow-plan/1"
# Options Beam's Dataflow job sets per submission (a default job name from user and time; the
# temp and staging folders with that name and time appended): the plan keeps them as given.
PER_SUBMISSION_OPTIONS = ("job_name", "temp_location", "staging_location")

# Regions offering each GPU type to Compute Engine (so to Dataflow workers), from
# https://cloud.google.com/compute/docs/gpus/gpu-regions-zones. A subset: regions are added
# over time; extend this table (one line) when yours is missing.
GPU_REGIONS: dict[str, tuple[str, ...]] = {
    "nvidia-l4": ("asia-east1", "asia-northeast1", "asia-northeast3", "asia-south1", "asia-southeast1",
                  "europe-west1", "europe-west2", "europe-west3", "europe-west4", "us-central1", "us-east1",
                  "us-east4", "us-west1", "us-west4"),
    "nvidia-tesla-t4": ("asia-east1", "asia-northeast1", "asia-northeast3", "asia-south1", "asia-southeast1",
                        "australia-southeast1", "europe-west1", "europe-west2", "europe-west3", "europe-west4",
                        "northamerica-northeast1", "southamerica-east1", "us-central1", "us-east1", "us-east4",
                        "us-west1", "us-west2", "us-west4"),
    "nvidia-tesla-a100": ("asia-northeast1", "asia-northeast3", "asia-southeast1", "europe-west4", "me-west1",
                          "us-central1", "us-east1", "us-west1", "us-west3", "us-west4"),
    "nvidia-a100-80gb": ("asia-southeast1", "europe-west4", "us-central1", "us-east4", "us-east5", "us-east7"),
    "nvidia-h100-80gb": ("asia-northeast1", "asia-southeast1", "europe-west1", "europe-west4", "us-central1",
                         "us-east4", "us-east5", "us-south1", "us-west1"),
}
# The machine family a hint's ``machine_type`` must belong to for each GPU type.
GPU_MACHINE_FAMILY = {"nvidia-l4": "g2-", "nvidia-tesla-t4": "n1-", "nvidia-tesla-a100": "a2-",
                      "nvidia-a100-80gb": "a2-ultragpu-", "nvidia-h100-80gb": "a3-"}

MESSAGES = {
    "project": "Dataflow needs --project PROJECT_ID (the Google Cloud project that runs and bills the job)",
    "region": "Dataflow needs --region REGION (where the workers run, e.g. us-central1; for GPU stages one "
              "offering the GPU type, see dataflow/README.md)",
    "temp_location": "Dataflow needs --temp_location gs://BUCKET/tmp (a Cloud Storage folder for temporary "
                     "files); got {value!r}",
    "staging_location": "--staging_location must be a gs:// URL (Dataflow stages the job there); got {value!r}",
    "remote_path": "{option} {value!r} is not a gs:// URL: Dataflow workers cannot read or write a local path. "
                   "Copy the data to Cloud Storage and pass gs://BUCKET/...",
    "shards_required": "Dataflow needs --shards gs://BUCKET/.../{{00000..NNNNN}}.tar: the embedded corpus is "
                       "served from the launching machine, which workers cannot reach",
    "container": "Dataflow needs --sdk_container_image IMAGE: the workers run the image built from "
                 "dataflow/Dockerfile (CUDA torch and daco400k); see dataflow/README.md",
    "gpu_type": "{where}.accelerator names GPU type {gpu!r}, which this tool does not know; known: {known}",
    "gpu_region": "{where}.accelerator asks for {gpu}, which region {region} does not offer; regions with "
                  "{gpu}: {regions}",
    "gpu_machine": "{where}.accelerator puts {gpu} on machine type {machine!r}; {gpu} attaches only to "
                   "{family}* machine types",
    "worker_accelerator": "--dataflow_service_options worker_accelerator=... puts GPUs on every worker; the "
                          "model stages carry accelerator resource hints instead (Dataflow right fitting), "
                          "and Dataflow rejects both together: drop worker_accelerator",
    "flexrs": "--flexrs_goal cannot be combined with accelerator resource hints (Dataflow right fitting "
              "does not support FlexRS); drop --flexrs_goal",
    "streaming": "daco build is a batch pipeline; drop --streaming",
    "local_model": "{option} {value!r} is a local path on this machine; Dataflow workers cannot read it. "
                   "Use a Hugging Face model id / open_clip pretrained tag, or bake the weights into the "
                   "worker image",
    "workers_local": "--workers sets local worker processes; on Dataflow use --max_num_workers N",
    "plan_runner": "--dataflow-plan describes a Dataflow job: add --runner DataflowRunner",
    "plan_weights": "the plan resolves the CLIP weights as the launch does, from the local cache only (no "
                    "network): {detail} (the CLIP is needed even with --embeddings: the main job embeds the "
                    "concepts with it)",
    "plan_gcp": "the Dataflow plan is prepared by Beam's DataflowRunner, which needs apache-beam[gcp]: "
                "pip install 'daco400k[gcp]'",
    "plan_glob": "--shards {value!r}: the offline plan cannot list a bucket (that needs credentials); give "
                 "the shards as a brace range of .tar names, e.g. gs://BUCKET/cc3m/{{00000..00331}}.tar",
}


class DataflowOptionsError(ValueError):
    """A Dataflow launch is missing an option or has inconsistent ones (message: one of MESSAGES)."""

    def __init__(self, key: str, **fields):
        super().__init__(MESSAGES[key].format(**fields))
        self.key = key


def is_dataflow(beam_args: list[str] | None) -> bool:
    """Whether ``beam_args`` select the Dataflow runner."""
    from pipeline.runner import pipeline_options
    from apache_beam.options.pipeline_options import StandardOptions

    return pipeline_options(beam_args).view_as(StandardOptions).runner in DATAFLOW_RUNNERS


def expand_accelerator(value: str) -> str:
    """A bare GPU type ("nvidia-l4") becomes the full hint with count 1 and the driver install."""
    return value if ":" in value else f"type:{value};count:1;install-nvidia-driver"


def parse_accelerator(hint: str) -> dict[str, str]:
    """The fields of an accelerator hint: {"type": ..., "count": ..., "machine_type": ..., flags: ""}."""
    return {k: v for k, _, v in (part.partition(":") for part in hint.split(";") if part)}


def set_accelerator(cfg, hint: str):
    """A copy of the build config with ``--accelerator``'s ``hint`` on both model stages (clip and mllm), validated."""
    import dataclasses

    from pipeline.config import override

    return dataclasses.replace(cfg, clip=override(cfg.clip, {"accelerator": hint}, "clip"),
                               mllm=override(cfg.mllm, {"accelerator": hint}, "mllm"))


@dataclass
class Launch:
    """What a Dataflow launch of ``daco build`` is given (paths as typed, the build config)."""

    out: str
    shards: str | None
    embeddings: str | None
    cfg: object  # pipeline.build.BuildConfig
    beam_args: list[str]


def _remote(option: str, value: str | None) -> None:
    if value is not None and not str(value).startswith("gs://"):
        raise DataflowOptionsError("remote_path", option=option, value=value)


def model_accelerators(cfg) -> dict[str, str]:
    """{"clip": hint, "mllm": hint} for the model stages that carry one."""
    return {name: getattr(cfg, name).accelerator for name in ("clip", "mllm") if getattr(cfg, name).accelerator}


def validate(launch: Launch) -> None:
    """Raise :class:`DataflowOptionsError` for the first missing or inconsistent option."""
    from apache_beam.options.pipeline_options import (DebugOptions, GoogleCloudOptions, StandardOptions,
                                                      WorkerOptions)

    from pipeline.runner import pipeline_options

    options = pipeline_options(launch.beam_args)
    gcp = options.view_as(GoogleCloudOptions)
    if not gcp.project:
        raise DataflowOptionsError("project")
    if not gcp.region:
        raise DataflowOptionsError("region")
    if not (gcp.temp_location or "").startswith("gs://"):
        raise DataflowOptionsError("temp_location", value=gcp.temp_location)
    if gcp.staging_location and not gcp.staging_location.startswith("gs://"):
        raise DataflowOptionsError("staging_location", value=gcp.staging_location)
    if options.view_as(StandardOptions).streaming:
        raise DataflowOptionsError("streaming")
    _remote("--out", launch.out)
    if launch.shards is None:
        raise DataflowOptionsError("shards_required")
    _remote("--shards", launch.shards)
    _remote("--embeddings", launch.embeddings)
    if not options.view_as(WorkerOptions).sdk_container_image:
        raise DataflowOptionsError("container")
    cfg = launch.cfg
    if cfg.mllm.model_id and os.path.exists(cfg.mllm.model_id):
        raise DataflowOptionsError("local_model", option="mllm.model_id", value=cfg.mllm.model_id)
    if cfg.clip.pretrained and os.path.exists(cfg.clip.pretrained):
        raise DataflowOptionsError("local_model", option="clip.pretrained", value=cfg.clip.pretrained)
    hints = model_accelerators(cfg)
    for where, hint in hints.items():
        fields = parse_accelerator(hint)
        gpu = fields.get("type", "")
        if gpu not in GPU_REGIONS:
            raise DataflowOptionsError("gpu_type", where=where, gpu=gpu, known=", ".join(sorted(GPU_REGIONS)))
        if gcp.region not in GPU_REGIONS[gpu]:
            raise DataflowOptionsError("gpu_region", where=where, gpu=gpu, region=gcp.region,
                                       regions=", ".join(GPU_REGIONS[gpu]))
        machine = fields.get("machine_type")
        if machine and not machine.startswith(GPU_MACHINE_FAMILY[gpu]):
            raise DataflowOptionsError("gpu_machine", where=where, gpu=gpu, machine=machine,
                                       family=GPU_MACHINE_FAMILY[gpu])
    if hints:
        service = options.view_as(GoogleCloudOptions).dataflow_service_options or []
        experiments = options.view_as(DebugOptions).experiments or []
        if any(o.startswith("worker_accelerator") for o in [*service, *experiments]):
            raise DataflowOptionsError("worker_accelerator")
        if gcp.flexrs_goal:
            raise DataflowOptionsError("flexrs")


# ------------------------------------------------------------------------------------ plan


def _hint_values(hints) -> dict[str, str]:
    """Resource hints of an environment, {urn: readable value}."""
    out = {}
    for urn, value in hints.items():
        try:
            out[urn] = value.decode("utf-8")
        except UnicodeDecodeError:
            out[urn] = base64.b64encode(value).decode("ascii")
    return out


def prepare_proto(pipeline, options):
    """The runner API proto Dataflow would receive for ``pipeline``: Beam's own
    ``DataflowRunner.run_pipeline`` prepares it (Dataflow graph rewrites, Docker environments
    with the resource hints, ``pack_combiners`` + ``sort_stages``) and, with ``--dry_run=True``
    in ``options`` (:func:`_job` sets it), returns before any client is made or anything is
    staged or submitted; its result carries the prepared job."""
    from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner

    try:
        return DataflowRunner().run_pipeline(pipeline, options).job.proto_pipeline
    except ImportError as exc:  # Beam's "Google Cloud Dataflow runner not available"
        raise DataflowOptionsError("plan_gcp") from exc


def summarise(proto) -> dict:
    """Per environment: its container image and hints; per leaf transform: environment and accelerator."""
    from apache_beam.portability.api import beam_runner_api_pb2

    envs = {}
    for env_id, env in proto.components.environments.items():
        payload = beam_runner_api_pb2.DockerPayload.FromString(env.payload) if env.payload else None
        envs[env_id] = {"urn": env.urn, "container_image": payload.container_image if payload else None,
                        "resource_hints": _hint_values(env.resource_hints)}
    transforms = {}
    for transform in proto.components.transforms.values():
        if transform.subtransforms or not transform.environment_id:
            continue
        hints = envs[transform.environment_id]["resource_hints"]
        transforms[transform.unique_name] = {"environment": transform.environment_id,
                                             "accelerator": hints.get(ACCELERATOR_URN)}
    return {"environments": envs, "transforms": dict(sorted(transforms.items()))}


def brace_listing(pattern: str | list[str]) -> list[str]:
    """The plan's shard listing (``list_shards`` of the main graph): the brace expansion of the
    pattern, sorted, instead of a bucket listing (which needs credentials); a glob or a
    non-.tar name is a :class:`DataflowOptionsError`."""
    from braceexpand import braceexpand

    from transforms import shards

    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    found = sorted({p for given in patterns for p in braceexpand(given)})
    bad = [p for p in found if shards._GLOB_CHARS.search(p) or not p.endswith(".tar")]
    if bad:
        raise DataflowOptionsError("plan_glob", value=bad[0])
    return found


def _offline_clip(clip):
    """The CLIP config the plan builds its graph with: the weights are resolved from the local
    cache only (no network); when they are missing and random weights are allowed, the graph
    gets the resolved config (no weights to look up), as the launch's workers would."""
    from transforms import clip_model

    try:
        resolved = clip_model.resolve_clip_config(clip.replace(download=False))
    except clip_model.ClipLoadError as exc:
        raise DataflowOptionsError("plan_weights", detail=str(exc)) from None
    return clip if resolved.pretrained else resolved.replace(download=clip.download)


def _job(name: str, build, beam_args: list[str]) -> tuple[dict, object]:
    """One planned job (summary + proto as JSON) and the options as DataflowRunner leaves them."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import GoogleCloudOptions
    from google.protobuf import json_format

    from pipeline.runner import pipeline_options

    options = pipeline_options([*beam_args, "--dry_run=True"])  # Beam's option checks then stay offline
    pipeline = beam.Pipeline(runner="DataflowRunner", options=options)
    build(pipeline)
    gcp = options.view_as(GoogleCloudOptions)
    given = {option: getattr(gcp, option) for option in PER_SUBMISSION_OPTIONS}
    proto = prepare_proto(pipeline, options)
    for option, value in given.items():  # the plan records what was given, not one submission's names
        setattr(gcp, option, value)
    return {"name": name, **summarise(proto),
            "pipeline": json_format.MessageToDict(proto, preserving_proto_field_name=True)}, options


def plan(launch: Launch) -> dict:
    """The plan of a validated launch: the options and both Beam jobs (see the module docstring)."""
    import functools

    import dataclasses

    from pipeline import build
    from transforms import fileio

    validate(launch)
    cfg, out = launch.cfg, launch.out
    shards_paths = brace_listing(launch.shards)
    concepts_job, _ = _job("concepts", functools.partial(build.concepts_graph, out=out, cfg=cfg.concepts),
                           launch.beam_args)
    main = functools.partial(
        build.main_graph, out=out, shards_pattern=launch.shards,
        emb_dir=launch.embeddings or fileio.join(out, "embeddings"), compute_embeddings=not launch.embeddings,
        concepts_path=fileio.join(out, "concepts.parquet"), concept_ids=[],
        cfg=dataclasses.replace(cfg, clip=_offline_clip(cfg.clip)), list_shards=brace_listing)
    main_job, options = _job("main", main, launch.beam_args)
    return {
        "format": PLAN_FORMAT,
        "runner": "DataflowRunner",
        "options": {k: v for k, v in options.get_all_options(drop_default=True, retain_unknown_options=True).items()
                    if k != "dry_run"},
        "model_accelerators": model_accelerators(cfg),
        "build": {"out": out, "shards": launch.shards, "shard_count": len(shards_paths),
                  "embeddings": launch.embeddings, "config_source": cfg.source},
        "phases": {
            "1": "job 'concepts' (on Dataflow): WordNet -> OUT/concepts.parquet",
            "2": "skipped: --shards is required on Dataflow",
            "3": "job 'main' (on Dataflow): shards -> embeddings, concepts -> OUT/concept_embeddings.npy; "
                 "-> retrieval -> activations -> directions",
        },
        "not_known_offline": {
            "concept_ids": "phase 1's output; the main job is planned with an empty concept list (one Create "
                           "payload of RetrieveStimuli differs, the graph does not)",
            "shard_listing": "the brace expansion of --shards; the launch lists the bucket",
        },
        "jobs": [concepts_job, main_job],
    }


def write_plan(launch: Launch, path: str) -> dict:
    """Validate, build the plan and write it as JSON to ``path`` (only when complete); returns it."""
    from transforms import fileio

    doc = plan(launch)
    fileio.write_json_atomic(path, doc)
    return doc


def print_plan_summary(doc: dict, path: str, out=None) -> None:
    """One line per job: transforms, environments, and which transforms carry an accelerator."""
    out = out or sys.stdout
    for job in doc["jobs"]:
        on_gpu = sorted(name for name, t in job["transforms"].items() if t["accelerator"])
        images = sorted({e["container_image"] for e in job["environments"].values() if e["container_image"]})
        print(f"job {job['name']}: {len(job['transforms'])} transforms, image {', '.join(images)}; "
              f"on an accelerator: {', '.join(on_gpu) or 'none'}", file=out)
    print(f"Dataflow plan written to {path} (nothing was submitted)", file=out)
