"""SAE training: ``steering.train_sae`` versus SAELens's own trainer on the same activations.

Both train a TopK SAE of the same width and k, with Adam at the same learning rate and
batch size, for the same number of activations, from the same ``.npy`` file on disk:

* ours: ``train_sae(SAE.random(...), path)`` (AuxK dead-latent loss, unit decoder rows,
  sparse decoding through ``embedding_bag``), in a fresh ``.venv`` interpreter;
* SAELens: ``TopKTrainingSAE`` + ``SAETrainer(...).fit()`` with its defaults otherwise
  (AuxK, decoder-norm rescaling, gradient clipping; constant learning rate, a dead-latent
  window of 20 steps like ours, wandb off), in a fresh interpreter
  of SAELens's own environment ``bench/.venvs/saelens`` (created on first use, see
  bench/saelens_compat.py), fed an iterator over the same file's batches.

Each side's throughput is timed inside its child around the training loop only
(activations / s; data reading included, process start and imports excluded). Both
trained SAEs are saved to disk and evaluated by the same code (``steering.SAE.load`` +
``evaluate_sae``) on held-out activations, so FVU is measured identically. Runs are
interleaved (ours, SAELens, ours, ...) over ``--rounds``; figures are medians.

The activations are planted: sparse non-negative combinations of ``4 x d_in`` random
unit feature directions with Zipf-like frequencies, a mean offset and Gaussian noise.

    .venv/bin/python bench/sae_train.py            # d_in 256, d_sae 2048, k 32, 2 rounds (a few minutes)
    .venv/bin/python bench/sae_train.py --full     # d_in 512, d_sae 4096, 3 rounds

Prints the FVU of both, then the throughput ratio (ours / SAELens, goal >= 1.0) last;
writes bench/results/sae_train.json.
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

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))
from common import median, write_result
from saelens_compat import ensure_saelens_venv


def planted_activations(n: int, d: int, n_features: int, support: int, seed: int) -> np.ndarray:
    """[n, d] float32: sparse combinations of planted unit features + offset + noise."""
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n_features, d)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    freq = 1.0 / (np.arange(n_features) + 20.0)
    freq /= freq.sum()
    offset = rng.standard_normal(d).astype(np.float32)
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 16384):
        m = min(16384, n - start)
        idx = np.stack([rng.choice(n_features, support, replace=False, p=freq) for _ in range(m)])
        coef = rng.exponential(1.0, (m, support)).astype(np.float32) + 0.2
        out[start:start + m] = np.einsum("ms,msd->md", coef, feats[idx]) + offset \
            + 0.05 * rng.standard_normal((m, d)).astype(np.float32)
    return out


OURS_CHILD = r"""
import json, sys, time, torch
from steering.sae import SAE
from steering.train import TrainConfig, train_sae
path, out, d_in, d_sae, k, lr, batch, steps, seed = sys.argv[1:10]
sae = SAE.random(int(d_in), int(d_sae), k=int(k), seed=int(seed))
result = train_sae(sae, path, TrainConfig(lr=float(lr), batch_size=int(batch)), steps=int(steps), progress=False)
sae.save(out)
print(json.dumps({"activations_per_s": result.activations_per_s, "train_fvu": result.fvu,
                  "dead_fraction": result.dead_fraction, "steps": result.steps}))
"""

SAELENS_CHILD = r"""
import json, sys, time, numpy as np, torch
from sae_lens import SAETrainer
from sae_lens.config import SAETrainerConfig, LoggingConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
path, out, d_in, d_sae, k, lr, batch, steps, seed = sys.argv[1:10]
batch, steps = int(batch), int(steps)
torch.manual_seed(int(seed))

def batches():  # the same file, batch after batch, pass after pass (as ours reads it)
    while True:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
        for start in range(0, data.shape[0] - batch + 1, batch):
            yield torch.from_numpy(np.array(data[start:start + batch], dtype=np.float32))

sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=int(d_in), d_sae=int(d_sae), k=int(k)))
cfg = SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch, lr=float(lr),
                       lr_end=float(lr), lr_scheduler_name="constant", device="cpu",
                       dead_feature_window=20,  # steps; ours: 20 batches
                       logger=LoggingConfig(log_to_wandb=False))
trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=batches())
start = time.perf_counter()
trainer.fit()
elapsed = time.perf_counter() - start
sae.save_inference_model(out)
print(json.dumps({"activations_per_s": steps * batch / elapsed, "steps": trainer.n_training_steps,
                  "dead_fraction": float(trainer.dead_neurons.float().mean())}))
"""


def run_child(python: str, code: str, *args) -> dict:
    proc = subprocess.run([python, "-c", code, *map(str, args)], check=False, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="d_in 512, d_sae 4096, 3 rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--k", type=int, default=32)
    args = parser.parse_args()
    d_in, d_sae = (512, 4096) if args.full else (256, 2048)
    rounds = args.rounds or (3 if args.full else 2)
    steps = args.steps or (200 if args.full else 48)
    n_train = 32 * args.batch_size  # several passes when steps > 32

    import torch

    from steering.sae import SAE
    from steering.train import evaluate_sae

    saelens_python = str(ensure_saelens_venv())
    work = Path(tempfile.mkdtemp(prefix="sae_train_bench_"))
    try:
        data = planted_activations(n_train + 16384, d_in, 4 * d_in, support=16, seed=0)
        np.save(work / "train.npy", data[:n_train])
        held_out = torch.from_numpy(data[n_train:])
        del data
        runs = {"ours": [], "saelens": []}
        for r in range(rounds):
            for name, python, code in (("ours", sys.executable, OURS_CHILD),
                                       ("saelens", saelens_python, SAELENS_CHILD)):
                out = work / f"{name}_{r}"
                stats = run_child(python, code, work / "train.npy", out, d_in, d_sae, args.k, args.lr,
                                  args.batch_size, steps, r)
                stats.update(evaluate_sae(SAE.load(out), held_out))
                runs[name].append(stats)
                print(f"round {r} {name:8s} {stats['activations_per_s']:10.0f} act/s  held-out FVU {stats['fvu']:.4f}"
                      f"  L0 {stats['l0']:.1f}  never-firing {stats['dead_fraction']:.3f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {name: {key: median([s[key] for s in runs[name]]) for key in ("activations_per_s", "fvu", "l0")}
           for name in runs}
    ratio = med["ours"]["activations_per_s"] / med["saelens"]["activations_per_s"]
    fvu_ratio = med["saelens"]["fvu"] / med["ours"]["fvu"]
    write_result("sae_train", {
        "config": {"d_in": d_in, "d_sae": d_sae, "k": args.k, "lr": args.lr, "batch_size": args.batch_size,
                   "steps": steps, "n_train": n_train, "rounds": rounds, "torch_threads": torch.get_num_threads()},
        "runs": runs, "median": med, "throughput_ratio": ratio, "fvu_ratio_saelens_over_ours": fvu_ratio})
    print(f"held-out FVU: ours {med['ours']['fvu']:.4f}, SAELens {med['saelens']['fvu']:.4f} "
          f"(SAELens / ours = {fvu_ratio:.2f}; > 1 means ours reconstructs better)")
    print(f"throughput: ours {med['ours']['activations_per_s']:.0f} act/s, "
          f"SAELens {med['saelens']['activations_per_s']:.0f} act/s")
    print(f"training throughput ratio ours / SAELens (goal >= 1.0): {ratio:.2f}")


if __name__ == "__main__":
    main()
