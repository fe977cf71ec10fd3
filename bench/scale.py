"""Scale run on the local runner: the CPU stages of DACO-400K at the paper's size.

Three stages, each in its own subprocess (so each peak RSS is that stage's own):

1. ``write_embeddings``: 1,000,000 synthetic caption-image pairs written in clip-retrieval's
   layout (float16 ``img_emb``/``text_emb`` .npy, ``metadata`` parquet; file sets of
   100,000) plus 15,000 concept embeddings. Pairs are drawn from seeds around the
   concepts (pair i sits near concept ``i mod C`` in both modalities), so retrieval has
   real neighbours to find;
2. ``retrieve``: :class:`transforms.retrieve.RetrieveStimuli` over that folder (IVF index
   above 250,000 pairs, k=27 positives and 27 negatives per concept, as the presets);
3. ``directions``: :class:`transforms.directions.ComputeDirections` over 400,000
   synthetic activations of d=3584 (Qwen2.5-VL-7B's width) made inside the pipeline from
   seeds (``bench/directions_memory.py``'s child), spread over 16,000 concepts
   (25 each: 400,000 is not a multiple of 15,000).

All on Beam's FnApiRunner with one worker (``pipeline.runner.run_pipeline``).

    .venv/bin/python bench/scale.py            # the sizes above (~15-20 min on 2 cores)
    .venv/bin/python bench/scale.py --quick    # 1,500 concepts, 100,000 pairs, 40,000 x d=512

Prints wall time, CPU time (user + system of the stage's process; on a shared machine the
better measure of work) and peak RSS per stage and writes bench/results/scale.json (or scale_quick.json);
dataflow/README.md extrapolates the CPU stages of a CC-3M job from these figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PRINT_PEAK, run_child, write_result  # noqa: E402

FULL = {"concepts": 15_000, "pairs": 1_000_000, "dim": 512, "activations": 400_000, "act_dim": 3584,
        "act_concepts": 16_000}
QUICK = {"concepts": 1_500, "pairs": 100_000, "dim": 512, "activations": 40_000, "act_dim": 512,
         "act_concepts": 1_600}
PER_FILE_SET = 100_000


def write_embeddings(emb_dir: str, concepts_path: str, n_concepts: int, n_pairs: int, dim: int) -> None:
    """The synthetic embeddings folder (clip-retrieval layout) and the concept embeddings .npy."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    concepts = unit(np.random.default_rng([0, 0]).standard_normal((n_concepts, dim), dtype=np.float32))
    np.save(concepts_path, concepts, allow_pickle=False)
    for sub in ("img_emb", "text_emb", "metadata"):
        os.makedirs(os.path.join(emb_dir, sub), exist_ok=True)
    for n, start in enumerate(range(0, n_pairs, PER_FILE_SET)):
        stop = min(start + PER_FILE_SET, n_pairs)
        rng = np.random.default_rng([0, 1, n])
        near = concepts[np.arange(start, stop) % n_concepts]
        for sub, prefix in (("img_emb", "img_emb"), ("text_emb", "text_emb")):
            noise = rng.standard_normal((stop - start, dim), dtype=np.float32) * 0.05
            np.save(os.path.join(emb_dir, sub, f"{prefix}_{n}.npy"), unit(near + noise).astype(np.float16),
                    allow_pickle=False)
        keys = [f"{i:09d}" for i in range(start, stop)]
        pq.write_table(pa.table({"key": keys, "caption": [f"caption {k}" for k in keys],
                                 "url": [f"http://127.0.0.1/{k}.jpg" for k in keys],
                                 "shard": [f"{i // 10_000:05d}" for i in range(start, stop)]}),
                       os.path.join(emb_dir, "metadata", f"metadata_{n}.parquet"))


def retrieve(emb_dir: str, concepts_path: str, out: str, n_concepts: int) -> dict:
    """RetrieveStimuli on the local runner; its counters."""
    from pipeline.runner import quiet_beam_logging, run_pipeline
    from transforms.retrieve import RetrieveConfig, RetrieveStimuli

    quiet_beam_logging()
    ids = [f"concept{c:05d}.n.01" for c in range(n_concepts)]
    cfg = RetrieveConfig(k=27, n_negatives=27, min_positives=5)
    counters = run_pipeline(lambda p: p | RetrieveStimuli(out, emb_dir, concepts_path, ids, cfg))
    assert counters["retrieve.concepts_read"] == n_concepts, counters
    return counters


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _stage(name: str, code: str) -> dict:
    cpu_before = _children_cpu()
    seconds, peak_mib, stdout = run_child(code + PRINT_PEAK)
    cpu = _children_cpu() - cpu_before
    result = {"seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "peak_rss_mib": peak_mib,
              "load_1min_after": os.getloadavg()[0]}
    for line in stdout.splitlines():
        if line.startswith("RESULT="):
            result["detail"] = json.loads(line[len("RESULT="):])
    print(f"  {name:<17} {seconds:>8.1f} s wall  {cpu:>8.1f} s CPU   peak RSS {peak_mib:>8,.0f} MiB", flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke-test size (1,500 concepts, 100,000 pairs)")
    parser.add_argument("--dim", type=int, default=None,
                        help="CLIP embedding dimension of the synthetic pairs (default 512; ViT-L-14 has 768; "
                        "retrieval memory grows with it: ~16 bytes per pair and dimension at the peak)")
    args = parser.parse_args(argv)
    size = dict(QUICK if args.quick else FULL)
    size["dim"] = args.dim or size["dim"]
    print(f"scale run ({'quick' if args.quick else 'full'}): {size}; load average {os.getloadavg()}", flush=True)
    stages = {}
    with tempfile.TemporaryDirectory(prefix="daco-scale-") as tmp:
        emb_dir, concepts_path, out = (os.path.join(tmp, x) for x in ("embeddings", "concepts.npy", "out"))
        common = "import sys, json; sys.path.insert(0, 'bench'); import scale\n"
        stages["write_embeddings"] = _stage("write_embeddings", common + (
            f"scale.write_embeddings({emb_dir!r}, {concepts_path!r}, {size['concepts']}, {size['pairs']}, "
            f"{size['dim']})"))
        stages["retrieve"] = _stage("retrieve", common + (
            f"c = scale.retrieve({emb_dir!r}, {concepts_path!r}, {out!r}, {size['concepts']})\n"
            "print('RESULT=' + json.dumps({k: v for k, v in c.items() if k.startswith('retrieve.')}))"))
        stages["directions"] = _stage("directions", common + (
            "from directions_memory import child\n"
            f"print('RESULT=' + json.dumps(child({size['activations']}, {size['act_dim']}, {size['act_concepts']})))"))
    load = os.getloadavg()
    result = {"benchmark": "scale", "quick": args.quick, "size": size, "runner": "FnApiRunner (local, 1 worker)",
              "stages": stages, "load_average_after": load}
    write_result("scale_quick" if args.quick else "scale", result)
    total = sum(s["seconds"] for s in stages.values())
    print(f"load average after: {load}")
    print(f"scale run total {total:,.0f} s: {size['pairs']:,} pairs x {size['concepts']:,} concepts retrieved in "
          f"{stages['retrieve']['seconds']:,.0f} s, {size['activations']:,} activations (d={size['act_dim']}) "
          f"averaged in {stages['directions']['seconds']:,.0f} s; peak RSS max "
          f"{max(s['peak_rss_mib'] for s in stages.values()):,.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
