"""Dictionary initialisation versus random initialisation of a TopK SAE (docs/methods.md §3).

Planted data: ``--concepts`` unit concept directions in R^d (random, so mildly
correlated); each activation is a shared mean offset plus a sparse non-negative
combination of ``--support`` concepts (Zipf-like concept frequencies) plus Gaussian
noise. The dictionary handed to ``SAE.from_dictionary`` is the planted directions
with noise added (``--dict-noise``, cosine to the truth about 0.9), as a real
difference-of-means dictionary would be. Both SAEs have the same width
(concepts + ``--extra`` free atoms), k, learning rate, batch size and number of
steps (``train_sae`` with its defaults: AuxK, unit decoder rows, b_dec set to the
first batch's mean); the random SAE uses ``SAE.random`` (seeded unit atoms, encoder
= decoder transpose). FVU is measured on held-out activations. Rounds use different
seeds (data, dictionary noise and random atoms) and alternate which side trains first;
figures are medians.

    .venv/bin/python bench/dict_init.py            # d 256, 1024 concepts, 3 rounds (a few minutes)
    .venv/bin/python bench/dict_init.py --full     # d 512, 4096 concepts, 5 rounds

Prints both FVUs and, last, their difference (random - dictionary; > 0 means the
dictionary initialisation explains more variance); writes bench/results/dict_init.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
from common import median, write_result

from steering.sae import SAE
from steering.train import TrainConfig, evaluate_sae, train_sae


def planted(n: int, concepts: torch.Tensor, support: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    """[n, d] activations: offset + sparse combinations of ``concepts`` + noise."""
    n_concepts, d = concepts.shape
    freq = 1.0 / (torch.arange(n_concepts, dtype=torch.float64) + 20.0)
    idx = torch.multinomial(freq.expand(n, -1), support, replacement=False, generator=gen)
    coef = torch.empty(n, support, dtype=torch.float64).exponential_(1.0, generator=gen) + 0.2
    offset = torch.randn(d, generator=gen, dtype=torch.float64)
    x = offset + torch.einsum("ns,nsd->nd", coef, concepts.double()[idx])
    return (x + noise * torch.randn(n, d, generator=gen, dtype=torch.float64)).float()


def one_round(args, seed: int) -> dict:
    # the data's stream is seeded apart from the SAEs' (SAE.random(seed) must not redraw the planted directions)
    gen = torch.Generator().manual_seed(10_000 + seed)
    truth = torch.randn(args.concepts, args.d, generator=gen, dtype=torch.float64)
    truth /= truth.norm(dim=1, keepdim=True)
    x = planted(args.train + args.eval, truth, args.support, args.noise, gen)
    train, held_out = x[:args.train], x[args.train:]
    given = truth + args.dict_noise * torch.randn(truth.shape, generator=gen, dtype=torch.float64) / args.d ** 0.5
    cos = float((given / given.norm(dim=1, keepdim=True) * truth).sum(1).mean())
    builders = {
        "dictionary": lambda: SAE.from_dictionary(given.float(), k=args.k, n_extra=args.extra, seed=seed),
        "random": lambda: SAE.random(args.d, args.concepts + args.extra, k=args.k, seed=seed),
    }
    order = list(builders) if seed % 2 == 0 else list(reversed(builders))
    out = {"seed": seed, "dictionary_cosine_to_truth": cos}
    for name in order:
        sae = builders[name]()
        result = train_sae(sae, train, TrainConfig(lr=args.lr, batch_size=args.batch_size), steps=args.steps, progress=False)
        held = evaluate_sae(sae, held_out)
        out[name] = {"fvu": held["fvu"], "train_fvu": result.fvu, "dead_fraction": result.dead_fraction,
                     "activations_per_s": result.activations_per_s}
        print(f"seed {seed} {name:10s} held-out FVU {held['fvu']:.4f} (train {result.fvu:.4f}, "
              f"dead {result.dead_fraction:.3f})", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="d 512, 4096 concepts, 5 rounds, 300 steps")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--d", type=int, default=None)
    parser.add_argument("--concepts", type=int, default=None)
    parser.add_argument("--extra", type=int, default=None, help="free atoms (default: concepts / 4)")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--support", type=int, default=8)
    parser.add_argument("--noise", type=float, default=0.05, help="activation noise per coordinate")
    parser.add_argument("--dict-noise", type=float, default=0.5, help="dictionary noise (norm, relative)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=1024)
    args = parser.parse_args()
    args.d = args.d or (512 if args.full else 256)
    args.concepts = args.concepts or (4096 if args.full else 1024)
    args.extra = args.concepts // 4 if args.extra is None else args.extra
    args.steps = args.steps or (300 if args.full else 100)
    rounds = args.rounds or (5 if args.full else 3)
    args.train, args.eval = args.steps * args.batch_size // 2, 8192  # about two passes

    runs = [one_round(args, seed) for seed in range(rounds)]
    fvu = {name: median([r[name]["fvu"] for r in runs]) for name in ("dictionary", "random")}
    diff = fvu["random"] - fvu["dictionary"]
    write_result("dict_init", {
        "config": {k: v for k, v in vars(args).items()}, "rounds": runs, "median_fvu": fvu,
        "fvu_random_minus_dictionary": diff})
    print(f"held-out FVU after {args.steps} steps: dictionary init {fvu['dictionary']:.4f}, "
          f"random init {fvu['random']:.4f}")
    print(f"variance explained gained by dictionary initialisation (FVU random - dictionary): {diff:+.4f}")


if __name__ == "__main__":
    main()
