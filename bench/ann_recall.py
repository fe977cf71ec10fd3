"""Approximate versus exact faiss search for the retrieval stage: recall@50 and speed-up.

15,000 concept queries over 1,000,000 synthetic 512-d pair embeddings (stored float16,
L2-normalised), built with the stage's own :func:`transforms.retrieve.build_index`:
the approximate index the stage uses above ``exact_max`` (IVF-Flat by default) against
the exact inner-product index (the baseline, same process).

The data imitate CLIP embeddings rather than uniform noise: 300 semantic groups, 15,000
concept centres around them, pairs drawn from concepts with Zipf-like popularity (10% of
pairs are group-level "background"), a shared offset per modality (CLIP's cone and
modality gap), and queries that are the concepts' noisy text-side embeddings.

Exact search of every query takes minutes on 2 cores, so by default the exact baseline
runs on a seeded subsample of ``--exact-queries`` queries; recall@50 is measured on that
subsample and the speed-up is per query on the same subsample (exact and approximate
interleaved over ``--rounds``, medians). ``--full`` searches all queries exactly.
The approximate index also searches all 15,000 queries once (reported, not a ratio).

    python bench/ann_recall.py [--quick | --full] [--ann ivf|hnsw] [--nprobe 32] [--nlist N]

Prints recall@50 and the speed-up last; writes bench/results/ann_recall.json
(``ann_recall_quick.json`` with --quick, ``..._noiseX`` with a non-default --noise,
``..._hnsw`` with --ann hnsw).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from common import median, write_result  # noqa: E402

from transforms.retrieve import RetrieveConfig, build_index, ivf_nlist, search  # noqa: E402

DIM = 512
GROUPS = 300
TOP = 50


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def synthetic_corpus(n_pairs: int, n_concepts: int, noise: float = 1.6, seed: int = 0, chunk: int = 100_000):
    """(pairs float16 [n_pairs, 512], queries float32 [n_concepts, 512]), both L2-normalised.
    ``noise``: norm of each pair's isotropic noise relative to its unit concept centre (higher: harder)."""
    rng = np.random.default_rng(seed)
    mu_img, mu_txt = _unit(rng.standard_normal((2, DIM), dtype=np.float32))
    groups = _unit(rng.standard_normal((GROUPS, DIM), dtype=np.float32))
    group_of = rng.integers(0, GROUPS, n_concepts)
    centres = _unit(groups[group_of] + _unit(rng.standard_normal((n_concepts, DIM), dtype=np.float32)))
    popularity = 1.0 / (np.arange(n_concepts) + 10.0) ** 0.8
    popularity = rng.permutation(popularity / popularity.sum())
    pairs = np.empty((n_pairs, DIM), dtype=np.float16)
    for start in range(0, n_pairs, chunk):
        m = min(chunk, n_pairs - start)
        concept = rng.choice(n_concepts, m, p=popularity)
        background = rng.random(m) < 0.1
        base = np.where(background[:, None], groups[group_of[concept]], centres[concept])
        noise = rng.standard_normal((m, DIM), dtype=np.float32) * (noise / np.sqrt(DIM))
        noise[background] *= 1.25
        pairs[start:start + m] = _unit(0.6 * mu_img + base + noise)
    queries = _unit(0.6 * mu_txt + centres + rng.standard_normal((n_concepts, DIM), dtype=np.float32) * (0.5 / np.sqrt(DIM)))
    return pairs, queries.astype(np.float32)


def build_exact(pairs: np.ndarray, cfg: RetrieveConfig, chunk: int = 100_000):
    """The exact inner-product index, filled chunk by chunk (no full float32 copy besides its own)."""
    index = build_index(pairs[:chunk], cfg, kind="flat")
    for start in range(chunk, len(pairs), chunk):
        index.add(pairs[start:start + chunk].astype(np.float32))
    return index


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def recall_at(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k found by the approximate top-k."""
    return float(np.mean([len(set(a[a >= 0]) & set(e)) / len(e) for a, e in zip(approx, exact)]))


TIE = 1e-5


def tie_tolerant_recall(pairs: np.ndarray, queries: np.ndarray, approx: np.ndarray, exact: np.ndarray) -> float:
    """Like :func:`recall_at`, but an approximate hit whose inner product (float64, recomputed)
    is within ``TIE`` of the exact k-th also counts: near-ties at the boundary swap between
    two float32 kernels (BLAS in the exact index, SIMD loops in IVF) without any search error."""
    hits = []
    for q, a, e in zip(queries.astype(np.float64), approx, exact):
        kth = (pairs[e].astype(np.float64) @ q).min()
        found = a[a >= 0]
        near = found[pairs[found].astype(np.float64) @ q >= kth - TIE]
        hits.append(min(len(e), len(set(near) | (set(found) & set(e)))) / len(e))
    return float(np.mean(hits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke run: 100,000 pairs, 2,000 queries")
    size.add_argument("--full", action="store_true", help="exact search of every query (minutes on 2 cores)")
    parser.add_argument("--pairs", type=int, default=None, help="pairs (default 1,000,000; --quick 100,000)")
    parser.add_argument("--queries", type=int, default=None, help="concept queries (default 15,000; --quick 2,000)")
    parser.add_argument("--exact-queries", type=int, default=1500,
                        help="queries searched exactly (the recall and timing subsample; --full: all)")
    parser.add_argument("--noise", type=float, default=1.6,
                        help="pair noise norm relative to the concept centre (1.6: own-concept pairs at cosine ~0.4 "
                        "to their concept's query; higher is harder)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (medians)")
    parser.add_argument("--ann", choices=["ivf", "hnsw"], default="ivf")
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default: the stage's, 2*sqrt(n))")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF lists probed (default: the stage's)")
    parser.add_argument("--sweep", type=int, nargs="*", default=[8, 64, 128],
                        help="other nprobe values to report (IVF), besides the headline one")
    args = parser.parse_args()

    n_pairs = args.pairs or (100_000 if args.quick else 1_000_000)
    n_queries = args.queries or (2_000 if args.quick else 15_000)
    options = {"ann": args.ann, "nlist": args.nlist}
    if args.nprobe:
        options["nprobe"] = args.nprobe
    cfg = RetrieveConfig.from_dict(options)

    t_data, (pairs, queries) = timed(lambda: synthetic_corpus(n_pairs, n_queries, args.noise))
    print(f"data: {n_pairs:,} pairs x {DIM} (float16), {n_queries:,} queries ({t_data:.1f}s)", flush=True)
    n_exact = n_queries if args.full else min(args.exact_queries, n_queries)
    subset = np.sort(np.random.default_rng(1).choice(n_queries, n_exact, replace=False))
    sample = queries[subset]

    t_ann_build, ann = timed(lambda: build_index(pairs, cfg, kind=cfg.ann))
    print(f"{cfg.ann} index built in {t_ann_build:.1f}s", flush=True)
    t_exact_build, exact = timed(lambda: build_exact(pairs, cfg))
    print(f"exact index built in {t_exact_build:.1f}s", flush=True)

    exact_times, ann_times = [], []
    for round_ in range(args.rounds):
        t_exact, exact_ids = timed(lambda: search(exact, sample, TOP))
        t_ann, ann_ids = timed(lambda: search(ann, sample, TOP))
        exact_times.append(t_exact)
        ann_times.append(t_ann)
        print(f"round {round_ + 1}: exact {t_exact:.2f}s, {cfg.ann} {t_ann:.2f}s on {n_exact:,} queries", flush=True)
    recall = recall_at(ann_ids, exact_ids)
    recall_ties = tie_tolerant_recall(pairs, sample, ann_ids, exact_ids)
    print(f"{cfg.ann}: recall@{TOP} {recall:.4f} (counting near-ties within {TIE:g}: {recall_ties:.4f})", flush=True)
    speedup = median(exact_times) / median(ann_times)

    sweep = {}
    if cfg.ann == "ivf":
        for nprobe in sorted(set(args.sweep) - {cfg.nprobe}):
            ann.nprobe = nprobe
            t, ids = timed(lambda: search(ann, sample, TOP))
            sweep[nprobe] = {"recall_at_50": recall_at(ids, exact_ids), "speedup": median(exact_times) / t,
                             "recall_at_50_tie_tolerant": tie_tolerant_recall(pairs, sample, ids, exact_ids)}
            print(f"nprobe {nprobe}: recall@50 {sweep[nprobe]['recall_at_50']:.4f}, "
                  f"speed-up {sweep[nprobe]['speedup']:.1f}x (one run)", flush=True)
        ann.nprobe = cfg.nprobe
    t_all, _ = timed(lambda: search(ann, queries, TOP))
    print(f"{cfg.ann}: all {n_queries:,} queries in {t_all:.1f}s", flush=True)

    result = {
        "pairs": n_pairs, "dim": DIM, "noise": args.noise, "queries": n_queries, "exact_queries": n_exact, "top": TOP,
        "index": cfg.ann, "nlist": ivf_nlist(n_pairs, cfg) if cfg.ann == "ivf" else None,
        "nprobe": cfg.nprobe if cfg.ann == "ivf" else None,
        "hnsw": {"m": cfg.hnsw_m, "ef_search": cfg.ef_search} if cfg.ann == "hnsw" else None,
        "rounds": args.rounds, "recall_at_50": recall, "recall_at_50_tie_tolerant": recall_ties,
        "tie_tolerance": TIE, "speedup": speedup,
        "exact_search_s_median": median(exact_times), "ann_search_s_median": median(ann_times),
        "ann_all_queries_s": t_all, "ann_build_s": t_ann_build, "exact_build_s": t_exact_build,
        "nprobe_sweep": sweep, "quick": args.quick, "full": args.full,
        "note": "exact search timed on the same query subsample as the approximate one"
                + ("" if n_exact == n_queries else f" ({n_exact:,} of {n_queries:,} queries, seeded)"),
    }
    suffix = ("_quick" if args.quick else "") + (f"_noise{args.noise:g}" if args.noise != 1.6 else "") \
        + ("" if cfg.ann == "ivf" else f"_{cfg.ann}")
    path = write_result("ann_recall" + suffix, result)
    print(f"wrote {path}")
    setting = f"nprobe {cfg.nprobe}" if cfg.ann == "ivf" else f"M {cfg.hnsw_m}, ef_search {cfg.ef_search}"
    print(f"recall@{TOP} {recall:.4f} (goal >= 0.95) | speed-up {speedup:.1f}x over exact search "
          f"({cfg.ann}, {setting}, {n_pairs:,} pairs, {n_exact:,} queries timed)")


if __name__ == "__main__":
    main()
