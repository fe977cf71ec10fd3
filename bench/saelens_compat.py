"""SAELens reads the folders that ``steering.SAE.save`` writes, and we read SAELens's.

1. Our TopK SAE (dictionary-initialised, with free atoms and non-zero biases) and our
   ReLU SAE are saved with ``SAE.save``; inside SAELens's own virtual environment
   ``sae_lens.SAE.load_from_disk`` loads each folder and encodes/decodes the same
   inputs. We compare with our ``encode``/``decode``.
2. The other way: SAELens builds a TopK training SAE (``rescale_acts_by_decoder_norm``,
   SAELens's training default) with random weights, saves it with
   ``save_inference_model``, encodes/decodes; ``steering.SAE.load`` reads the folder
   and we compare.

SAELens gets its own environment, ``bench/.venvs/saelens`` (gitignored; created here
on first use with ``pip install sae-lens``, about 6 GB, then reused).

    .venv/bin/python bench/saelens_compat.py           # check (creates the venv if needed)
    .venv/bin/python bench/saelens_compat.py --setup   # only create the venv

Prints the max abs difference last; writes bench/results/saelens_compat.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
from common import write_result

from steering.sae import SAE

VENV = BENCH / ".venvs" / "saelens"
SAELENS_PACKAGES = ["sae-lens"]


def ensure_saelens_venv() -> Path:
    """bench/.venvs/saelens with sae-lens installed (created once, then reused); returns its python."""
    python = VENV / "bin" / "python"
    probe = [str(python), "-c", "import sae_lens"]
    if python.exists() and subprocess.run(probe, check=False, capture_output=True).returncode == 0:
        return python
    print(f"creating {VENV} (pip install {' '.join(SAELENS_PACKAGES)}; a few minutes, ~6 GB) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *SAELENS_PACKAGES], check=True)
    subprocess.run(probe, check=True)
    return python


def run_in_saelens(python: Path, code: str, *args: str) -> str:
    """Run ``code`` with SAELens's interpreter; returns stdout (raises with stderr on failure)."""
    proc = subprocess.run([str(python), "-c", code, *args], check=False, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"SAELens child failed:\n{proc.stderr[-4000:]}")
    return proc.stdout


SAELENS_CHILD = r"""
import json, sys, numpy as np, torch
import sae_lens
from sae_lens import SAE
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
work = sys.argv[1]
x = torch.from_numpy(np.load(work + "/x.npy", allow_pickle=False))
classes = {}
def run(sae, folder):
    with torch.no_grad():
        codes = sae.encode(x)
        np.save(folder + "/saelens_codes.npy", codes.numpy())
        np.save(folder + "/saelens_recon.npy", sae.decode(codes).numpy())
for name in sys.argv[2:]:  # our folders: load them with SAELens
    sae = SAE.load_from_disk(work + "/" + name, device="cpu")
    run(sae, work + "/" + name)
    classes[name] = type(sae).__name__
# SAELens's own TopK training SAE (decoder-norm rescaling on), saved for inference
torch.manual_seed(0)
sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=96, k=6, rescale_acts_by_decoder_norm=True))
with torch.no_grad():
    for p in sae.parameters():
        p.copy_(torch.randn_like(p) * 0.3)
run(sae, work + "/theirs_topk")
sae.save_inference_model(work + "/theirs_topk")
print(json.dumps({"version": sae_lens.__version__, "classes": classes}))
"""


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def check(python: Path) -> tuple[str, dict]:
    """Run both directions in one SAELens child; returns (sae_lens version, per-case max abs differences)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=gen)
    ours = {
        "ours_topk": SAE.from_dictionary(torch.randn(40, 32, generator=gen), k=6, n_extra=24,
                                         concept_ids=[f"concept{i}.n.01" for i in range(40)]),
        "ours_relu": SAE.from_dictionary(torch.randn(40, 32, generator=gen), activation="relu", n_extra=8),
    }
    work = Path(tempfile.mkdtemp(prefix="saelens_compat_"))
    try:
        np.save(work / "x.npy", x.numpy())
        (work / "theirs_topk").mkdir()
        for name, sae in ours.items():
            with torch.no_grad():
                sae.b_enc.copy_(torch.randn(sae.d_sae, generator=gen) * 0.1)
                sae.b_dec.copy_(torch.randn(sae.d_in, generator=gen) * 0.1)
            sae.save(work / name)
        child = json.loads(run_in_saelens(python, SAELENS_CHILD, str(work), *ours).strip().splitlines()[-1])
        results = {}
        for name in [*ours, "theirs_topk"]:
            sae = ours.get(name) or SAE.load(work / name)
            with torch.no_grad():
                codes = sae.encode(x)
                recon = sae.decode(codes)
            results[name] = {"encode": max_diff(codes, np.load(work / name / "saelens_codes.npy")),
                             "decode": max_diff(recon, np.load(work / name / "saelens_recon.npy"))}
            if name in child["classes"]:
                results[name]["saelens_class"] = child["classes"][name]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return child["version"], results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setup", action="store_true", help="only create bench/.venvs/saelens")
    parser.add_argument("--json", help="write the result here instead of bench/results/saelens_compat.json")
    args = parser.parse_args()
    python = ensure_saelens_venv()
    if args.setup:
        print(f"SAELens environment ready: {python}")
        return
    version, results = check(python)
    worst = max(v for case in results.values() for k, v in case.items() if k in ("encode", "decode"))
    for name, case in results.items():
        print(f"{name:12s} encode max|diff| {case['encode']:.3g}  decode max|diff| {case['decode']:.3g}"
              + (f"  (loaded as sae_lens {case['saelens_class']})" if "saelens_class" in case else ""))
    result = {"sae_lens_version": version, "cases": results, "max_abs_diff": worst}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    else:
        write_result("saelens_compat", result)
    print(f"sae_lens {version}: max abs difference over encode/decode, both directions: {worst:.3g}")


if __name__ == "__main__":
    main()
