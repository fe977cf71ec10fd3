"""bench/gpu_check.py: its --smoke run (every figure's code path, tiny shapes, CPU) and its fail-fast checks.

The full run needs a GPU (docs/gpu-check.md); these keep the prepared script from rotting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))
import gpu_check  # noqa: E402


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "result.json"
    proc = run_script("--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_smoke_runs_every_figure_without_error(smoke):
    result, stdout = smoke
    assert result["smoke"] is True
    assert set(result["figures"]) == set(gpu_check.FIGURES)
    for name, figure in result["figures"].items():
        assert "error" not in figure, (name, figure.get("error"))
        assert f"[{name}]" in stdout  # printed as it went
    assert "sae_training" in result["left_out"]


def test_smoke_capture_goes_through_the_stage_on_the_real_architecture(smoke):
    capture = smoke[0]["figures"]["capture"]
    assert capture["model"]["class"] == "Qwen2_5_VLForConditionalGeneration"
    assert capture["model"]["untrained"] is True and capture["model"]["attention"] == "sdpa"
    assert capture["model"]["num_hidden_layers"] == 20 and capture["stage_config"]["layers"] == [15, 16, 17, 18, 19]
    # 56 px at patch 14, merge 2: 4 image tokens, plus the chat template and the caption
    assert capture["attended_tokens"] > 4 * capture["stimuli"]
    assert capture["stimuli"] == 4 * capture["stage_config"]["batch_size"]
    assert capture["flops_per_pass"] > 0 and 0 < capture["mfu"]["stage"] < 1
    assert all(v > 0 for v in capture["stimuli_per_s"].values())


def test_smoke_steering_times_every_method_against_plain(smoke):
    steering = smoke[0]["figures"]["steering"]
    assert set(steering["methods"]) == {"plain", "daco", "daco_fast", "actadd", "mop"}
    assert steering["methods"]["plain"]["decode_wall"]["overhead_pct"] == 0
    assert all(m["decode_wall"]["ms"] > 0 for m in steering["methods"].values())


def test_smoke_clip_measures_bare_and_beam(smoke):
    clip = smoke[0]["figures"]["clip"]
    assert set(clip["pairs_per_s"]) == {"bare", "beam"} and min(clip["pairs_per_s"].values()) > 0
    assert clip["beam_wall_s"] > clip["beam_model_load_s"] >= 0


def test_smoke_retrieval_faiss_agrees_with_exact_torch(smoke):
    retrieval = smoke[0]["figures"]["retrieval"]
    methods = retrieval["methods"]
    assert methods["torch_fp32_exact"]["recall_at_k"] == 1.0
    assert methods["faiss_flat_ip"]["recall_at_k"] >= 0.99  # both exact; only float summation order differs


def test_recall_counts_the_overlap_per_query():
    exact = [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert gpu_check.recall_at([[4, 3, 2, 1], [5, 6, 0, 9]], exact, 4) == pytest.approx(0.75)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gets")
def test_full_run_without_a_gpu_fails_fast_saying_what_to_do():
    proc = run_script("--only", "retrieval")
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--smoke" in proc.stderr


def test_unknown_figure_is_an_error_naming_the_choices(capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "capture,sae"])
    assert "capture, steering, retrieval, clip" in capsys.readouterr().err


def _wheel(folder: Path, name: str, source: str) -> Path:
    """A minimal pure-Python wheel of one module ``name`` (a real wheel pip installs)."""
    import base64
    import hashlib
    import zipfile

    files = {f"{name}/__init__.py": source,
             f"{name}-0.1.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
             f"{name}-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                            "Tag: py3-none-any\n"}
    def digest(text: str) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()

    record = [f"{path},sha256={digest(text)},{len(text.encode())}" for path, text in files.items()]
    files[f"{name}-0.1.dist-info/RECORD"] = "\n".join(record + [f"{name}-0.1.dist-info/RECORD,,"]) + "\n"
    path = folder / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for member, text in files.items():
            z.writestr(member, text)
    return path


def test_carried_wheels_are_installed_when_a_module_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    wheels = tmp_path / "whl"
    wheels.mkdir()
    _wheel(wheels, "daco_gpu_check_probe", "VALUE = 42\n")
    _wheel(wheels, "numpy", "")  # installed here already: not reinstalled
    site = tmp_path / "site"
    installed = gpu_check.install_wheels(("daco_gpu_check_probe",), wheels, site)
    assert installed == ["daco_gpu_check_probe-0.1-py3-none-any.whl"]
    import daco_gpu_check_probe

    assert daco_gpu_check_probe.VALUE == 42 and str(site) in os.environ["PYTHONPATH"]
    assert not (site / "numpy").exists()
    sys.modules.pop("daco_gpu_check_probe")


def test_a_missing_module_without_wheels_fails_naming_the_fix(tmp_path):
    with pytest.raises(gpu_check.CheckError, match="make gpu-check-wheels"):
        gpu_check.install_wheels(("daco_no_such_module",), tmp_path, tmp_path / "site")
