"""Dataflow launch: the offline job plan (GPU hints on the model stages only, the worker image)
and the option checks (each failure is one of the messages documented in dataflow/README.md)."""

import json
from pathlib import Path

import pytest

from pipeline import dataflow
from pipeline.build import load_build_config
from pipeline.cli import main as daco
from transforms.activations import MLLMConfig
from transforms.clip_model import ClipConfig

IMAGE = "us-central1-docker.pkg.dev/daco-project/daco/worker:2.77.0-cu124"
HINT = "type:nvidia-l4;count:1;install-nvidia-driver"
GOOD = ["--runner", "DataflowRunner", "--project", "daco-project", "--region", "us-central1",
        "--temp_location", "gs://daco-bucket/tmp", "--sdk_container_image", IMAGE]
PATHS = {"out": "gs://daco-bucket/out", "shards": "gs://daco-bucket/cc3m/{00000..00003}.tar", "embeddings": None}
MODEL_STAGES = ("ComputeEmbeddings/Embed/", "Activations/RunMLLM/")
README = (Path(__file__).resolve().parent.parent / "dataflow" / "README.md").read_text()


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    """`daco build --dataflow-plan` for the default preset with gs:// paths and an L4 on the model stages."""
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    assert daco(["build", "--out", PATHS["out"], "--shards", PATHS["shards"], "--accelerator", "nvidia-l4",
                 "--dataflow-plan", str(path), *GOOD]) == 0
    return json.loads(path.read_text())


def test_plan_puts_the_accelerator_on_every_model_stage_and_nowhere_else(plan):
    main = next(job for job in plan["jobs"] if job["name"] == "main")
    on_gpu = {name for name, t in main["transforms"].items() if t["accelerator"]}
    model = {name for name in main["transforms"] if name.startswith(MODEL_STAGES)}
    assert any(n.startswith(MODEL_STAGES[0]) for n in model) and any(n.startswith(MODEL_STAGES[1]) for n in model)
    assert on_gpu == model
    assert {main["transforms"][n]["accelerator"] for n in on_gpu} == {HINT}
    assert len(main["transforms"]) > len(model) + 20  # the CPU stages are in the plan, without a hint
    concepts = next(job for job in plan["jobs"] if job["name"] == "concepts")
    assert concepts["transforms"] and not any(t["accelerator"] for t in concepts["transforms"].values())


def test_plan_names_the_container_image_and_the_options(plan):
    for job in plan["jobs"]:
        images = {env["container_image"] for env in job["environments"].values()}
        assert images == {IMAGE}
        envs = job["pipeline"]["components"]["environments"]
        assert envs and all(env["urn"] == "beam:env:docker:v1" for env in envs.values())
    options = plan["options"]
    assert options["sdk_container_image"] == IMAGE and options["region"] == "us-central1"
    assert options["temp_location"] == "gs://daco-bucket/tmp" and "use_runner_v2" in options["experiments"]
    assert plan["model_accelerators"] == {"clip": HINT, "mllm": HINT}
    assert plan["build"]["shard_count"] == 4


def _launch(beam_args=GOOD, **changes):
    cfg = dataflow.set_accelerator(load_build_config(None, None), HINT)
    return dataflow.Launch(cfg=cfg, beam_args=list(beam_args), **{**PATHS, **changes})


def _without(option):
    i = GOOD.index(option)
    return GOOD[:i] + GOOD[i + 2:]


CASES = [
    ("project", _launch(_without("--project")), {}),
    ("region", _launch(_without("--region")), {}),
    ("temp_location", _launch(_without("--temp_location")), {"value": None}),
    ("temp_location", _launch([*_without("--temp_location"), "--temp_location", "/tmp/x"]), {"value": "/tmp/x"}),
    ("remote_path", _launch(out="daco-out"), {"option": "--out", "value": "daco-out"}),
    ("remote_path", _launch(shards="/data/cc3m/*.tar"), {"option": "--shards", "value": "/data/cc3m/*.tar"}),
    ("shards_required", _launch(shards=None), {}),
    ("container", _launch(_without("--sdk_container_image")), {}),
    ("gpu_region", _launch([*_without("--region"), "--region", "us-west2"]),
     {"where": "clip", "gpu": "nvidia-l4", "region": "us-west2", "regions": ", ".join(dataflow.GPU_REGIONS["nvidia-l4"])}),
    ("worker_accelerator", _launch([*GOOD, "--dataflow_service_options", f"worker_accelerator={HINT}"]), {}),
]


@pytest.mark.parametrize("key,launch,fields", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_options_fail_with_the_documented_message(key, launch, fields):
    with pytest.raises(dataflow.DataflowOptionsError) as err:
        dataflow.validate(launch)
    assert err.value.key == key
    assert str(err.value) == dataflow.MESSAGES[key].format(**fields)


def test_every_message_is_documented():
    for key, template in dataflow.MESSAGES.items():
        assert template.replace("{{", "{").replace("}}", "}") in README, key


def test_unknown_gpu_and_wrong_machine_family_are_refused():
    cfg = dataflow.set_accelerator(load_build_config(None, None), "type:nvidia-l40;count:1")
    with pytest.raises(dataflow.DataflowOptionsError, match="GPU type 'nvidia-l40'"):
        dataflow.validate(dataflow.Launch(cfg=cfg, beam_args=GOOD, **PATHS))
    cfg = dataflow.set_accelerator(cfg, f"{HINT};machine_type:n1-standard-8")
    with pytest.raises(dataflow.DataflowOptionsError, match="only to g2-"):
        dataflow.validate(dataflow.Launch(cfg=cfg, beam_args=GOOD, **PATHS))


def test_an_incomplete_plan_is_never_written(tmp_path, capsys):
    path = tmp_path / "plan.json"
    with pytest.raises(SystemExit, match="Dataflow needs --temp_location"):
        daco(["build", "--out", PATHS["out"], "--shards", PATHS["shards"], "--dataflow-plan", str(path),
              *_without("--temp_location")])
    with pytest.raises(SystemExit, match="add --runner DataflowRunner"):
        daco(["build", "--out", PATHS["out"], "--dataflow-plan", str(path)])
    assert not path.exists()


def test_accelerator_is_a_model_stage_option_checked_where_it_is_read():
    assert ClipConfig().accelerator is None and MLLMConfig().accelerator is None
    assert ClipConfig.from_dict({"accelerator": HINT}).accelerator == HINT
    with pytest.raises(ValueError, match="mllm.accelerator"):
        MLLMConfig.from_dict({"accelerator": "nvidia-l4"}, "mllm")
    assert dataflow.expand_accelerator("nvidia-tesla-t4") == "type:nvidia-tesla-t4;count:1;install-nvidia-driver"
    for preset in ("cc3m-qwen2.5-vl-7b", "laion-llava-1.5-7b"):
        cfg = load_build_config(None, preset)
        assert cfg.clip.accelerator == cfg.mllm.accelerator == HINT, preset


def test_plan_lists_shards_by_brace_expansion_passed_to_the_graph_not_patched_in():
    """The plan's shard listing is an argument of the main graph (no module attribute swapped),
    so transforms.shards.match_shards is the same function during and after planning."""
    from transforms import shards

    listing = shards.match_shards
    assert dataflow.brace_listing("gs://b/cc3m/{00001..00003}.tar") == [f"gs://b/cc3m/0000{i}.tar" for i in (1, 2, 3)]
    with pytest.raises(dataflow.DataflowOptionsError) as err:
        dataflow.brace_listing("gs://b/cc3m/*.tar")
    assert err.value.key == "plan_glob"
    records = shards.ReadShards("gs://b/{00000..00001}.tar", "gs://b/out", dataflow.brace_listing)
    assert records.paths == ["gs://b/00000.tar", "gs://b/00001.tar"] and shards.match_shards is listing


def test_the_locked_beam_is_within_pyproject_bound():
    """The plan is Beam's DataflowRunner dry run; pyproject bounds Beam to the versions it was
    checked with, and the lock's Beam (the one these tests run) must be inside that bound."""
    import tomllib

    import apache_beam
    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parent.parent
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    beam = next(Requirement(d) for d in deps if Requirement(d).name == "apache-beam")
    locked = next(line.split("==")[1].split()[0] for line in (root / "requirements.lock").read_text().splitlines()
                  if line.startswith("apache-beam=="))
    assert apache_beam.__version__ == locked and beam.specifier.contains(locked), (beam, locked)
