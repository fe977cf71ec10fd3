"""``daco train-sae`` at scale: peak memory against tokens streamed, and dictionary vs random initialisation.

1. Memory. A synthetic token stream (sparse non-negative combinations of planted unit
   features plus noise, generated chunk by chunk, never held whole) goes through the
   command's own training path (``pipeline.train_sae.LayerTraining``: the shuffle
   buffer and one ``SAETrainer`` per layer, SAELens-style normalisation) for 1M and for
   10M tokens, each in a fresh interpreter that reports its peak RSS. Goal: RSS(10M) /
   RSS(1M) <= 1.2 (memory flat in the number of tokens).
2. FVE at equal tokens. The planted check of tests/test_train_sae.py (dictionary
   directions plus features the dictionary lacks; dictionary-initialised with free atoms
   against random atoms of the same width, same steps); held-out FVE of both.

    .venv/bin/python bench/train_sae_memory.py            # d 64, 1M and 10M tokens (a few minutes on 2 cores)
    .venv/bin/python bench/train_sae_memory.py --quick    # 0.1M and 1M tokens

Prints both figures, the memory ratio last; writes bench/results/train_sae_memory.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))
from common import PRINT_PEAK, run_child, write_result

CHILD = """
import sys, time, torch
torch.set_num_threads(1)
from pipeline.train_sae import LayerTraining, SAEConfig
from steering.sae import SAE
tokens, d, concepts, extra = {tokens}, {d}, {concepts}, {extra}
g = torch.Generator().manual_seed(0)
features = torch.nn.functional.normalize(torch.randn(concepts + extra, d, generator=g), dim=1)
cfg = SAEConfig(k=16, n_extra=extra, tokens=tokens, shuffle_buffer=65536, batch_size=4096, log_every=10**9)
saes = {{0: SAE.from_dictionary(features[:concepts], k=16, n_extra=extra)}}
training = LayerTraining(saes, cfg, "cpu")
t0 = time.perf_counter()
while True:
    idx = torch.randint(0, concepts + extra, (8192, 4), generator=g)
    coef = torch.zeros(8192, concepts + extra).scatter(1, idx, torch.rand(8192, 4, generator=g) + 0.5)
    rows = (coef @ features + 0.05 * torch.randn(8192, d, generator=g) + 3.0)[:, None, :]
    if not training.push(rows):
        break
seconds = time.perf_counter() - t0
fvu = training.trainers[0].summary()["fvu"]
print(f"TOKENS={{training.tokens_trained}} SECONDS={{seconds:.2f}} FVU={{fvu:.4f}}")
""" + PRINT_PEAK


def memory(tokens: int, d: int) -> dict:
    _wall, peak, stdout = run_child(CHILD.format(tokens=tokens, d=d, concepts=4 * d, extra=d))
    line = next(l for l in stdout.splitlines() if l.startswith("TOKENS="))
    fields = dict(part.split("=") for part in line.split())
    return {"tokens": int(fields["TOKENS"]), "seconds": float(fields["SECONDS"]), "fvu": float(fields["FVU"]),
            "peak_rss_mib": peak, "tokens_per_s": int(fields["TOKENS"]) / float(fields["SECONDS"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="0.1M and 1M tokens instead of 1M and 10M")
    parser.add_argument("--d", type=int, default=64, help="activation dimension (default 64)")
    args = parser.parse_args()
    small, large = (100_000, 1_000_000) if args.quick else (1_000_000, 10_000_000)

    sys.path.insert(0, str(ROOT / "tests"))
    from test_train_sae import planted_training

    _, _, _, _, fvu_dictionary = planted_training("dictionary")
    _, _, _, _, fvu_random = planted_training("random")
    fve = {"dictionary": 1 - fvu_dictionary, "random": 1 - fvu_random}
    print(f"planted FVE at equal tokens: dictionary-initialised {fve['dictionary']:.4f}, random {fve['random']:.4f} "
          f"(+{100 * (fve['dictionary'] - fve['random']):.2f} points)")

    runs = {n: memory(n, args.d) for n in (small, large)}
    for n, r in runs.items():
        print(f"{n:>11,} tokens: peak RSS {r['peak_rss_mib']:.0f} MiB, {r['tokens_per_s']:,.0f} tokens/s "
              f"(1 layer, d {args.d}), final FVU {r['fvu']:.4f}")
    ratio = runs[large]["peak_rss_mib"] / runs[small]["peak_rss_mib"]
    write_result("train_sae_memory" + ("_quick" if args.quick else ""),
                 {"d": args.d, "runs": {str(n): r for n, r in runs.items()}, "planted_fve": fve,
                  "rss_ratio": ratio, "goal": "rss_ratio <= 1.2"})
    print(f"peak RSS {large:,} / {small:,} tokens: {ratio:.3f}x (goal <= 1.2)")


if __name__ == "__main__":
    main()
