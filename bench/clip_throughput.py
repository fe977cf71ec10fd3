"""CLIP stage throughput: Beam (ComputeEmbeddings on the local runner) vs a bare open_clip forward.

Same process, same model, same records, rounds interleaved, medians:

- ``bare``: ``model.encode_image`` + ``encode_text`` on batches preprocessed and tokenised
  beforehand (the ceiling: only the forward passes are timed);
- ``beam``: the records (read from the shards into memory beforehand, with
  ``transforms.shards.iter_records``) through
  ``beam.Create | ComputeEmbeddings`` on the local runner: decode, preprocess, tokenise,
  RunInference, write the clip-retrieval layout; the wall time of the whole pipeline,
  model loading included (also reported without it: RunInference's own load-latency metric);
- ``clip_retrieval`` (second figure): clip-retrieval's ``clip_inference`` over the same
  shards with the same weights, end to end (its ``main()``), in its own virtual environment
  under ``bench/.venvs/clip-retrieval`` (created here on first use: it pins older numpy,
  pyarrow and open_clip). It reads the model as ``open_clip:ARCH/<checkpoint file>``, so it
  runs offline on the seeded random weights saved by this script.

Throughput is image-caption pairs per second (one image and one caption embedded per pair).
The model is an untrained ViT-B-32 (random weights, seed 0; compute is what matters here).
The headline, printed last: beam / bare (goal >= 0.8: pipeline overhead <= 20%).

    .venv/bin/python bench/clip_throughput.py            # 192 pairs, 3 rounds (about 5 minutes on an idle 2-core machine)
    .venv/bin/python bench/clip_throughput.py --full     # 1024 pairs, 5 rounds
    .venv/bin/python bench/clip_throughput.py --no-clip-retrieval
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
CACHE = BENCH / ".cache" / "clip_throughput"
VENV = BENCH / ".venvs" / "clip-retrieval"
DRIVER_MARK = "CLIP_INFERENCE_RESULT="
VENV_PACKAGES = ["clip-retrieval", "setuptools<70"]  # clip (an all_clip dependency) imports pkg_resources.packaging


def _corpus(n: int, shard_size: int) -> Path:
    """The embedded corpus (real img2dataset shards, 224 px images), built once per size."""
    from transforms.corpus import build_corpus

    out = CACHE / f"corpus-{n}-{shard_size}"
    if not (out / "corpus.json").exists():
        build_corpus(str(out), n=n, seed=0, image_size=224, shard_size=shard_size)
    return out / "shards"


def _checkpoint(model_name: str) -> Path:
    """The seeded random weights of ``model_name`` as a checkpoint file both libraries load."""
    import torch

    from transforms.clip_model import ClipConfig, load_clip

    path = CACHE / f"{model_name}-seed0.pt"
    if not path.exists():
        loaded = load_clip(ClipConfig(model_name=model_name, pretrained=None, allow_untrained=True, seed=0))
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.save(loaded.model.state_dict(), path)
    return path


def _time_bare(loaded, batches) -> float:
    start = time.perf_counter()
    for images, tokens in batches:
        loaded.embed_pairs(images, tokens)
    return time.perf_counter() - start


def _time_beam(records, cfg, out: Path) -> tuple[float, float]:
    """(wall seconds of the whole pipeline, seconds of it spent loading the model, from
    RunInference's own ``load_model_latency_milli_secs`` metric)."""
    import shutil

    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from transforms.embed import ComputeEmbeddings

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    pipeline = beam.Pipeline(runner=FnApiRunner())  # the local runner of pipeline.runner.run_pipeline
    _ = pipeline | beam.Create(records) | ComputeEmbeddings(str(out), cfg)
    result = pipeline.run()
    result.wait_until_finish()
    wall = time.perf_counter() - start
    metrics = result.metrics().query(MetricsFilter())
    written = sum(c.committed for c in metrics["counters"] if c.key.metric.name == "written")
    assert written == len(records), written
    load_ms = sum(d.committed.sum for d in metrics["distributions"]
                  if d.key.metric.name.endswith("load_model_latency_milli_secs"))
    return wall, load_ms / 1000


def ensure_clip_retrieval_venv() -> Path:
    """bench/.venvs/clip-retrieval with clip-retrieval installed (created once, then reused)."""
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    probe = subprocess.run([str(python), "-c", "import clip_retrieval.clip_inference.main"], capture_output=True)
    if probe.returncode:
        print(f"installing {' '.join(VENV_PACKAGES)} into {VENV} (once; a few minutes)", file=sys.stderr)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *VENV_PACKAGES], check=True)
    return python


def _time_clip_retrieval(python: Path, shards: Path, checkpoint: Path, model_name: str, batch_size: int,
                         n: int, out: Path) -> dict:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    tars = sorted(p.stem for p in shards.glob("*.tar"))
    job = {"input_dataset": f"{shards}/{{{tars[0]}..{tars[-1]}}}.tar", "output_folder": str(out),
           "input_format": "webdataset", "batch_size": batch_size, "num_prepro_workers": 1,
           "enable_metadata": True, "use_jit": False, "wds_number_file_per_input_file": n // len(tars),
           "write_batch_size": n, "clip_model": f"open_clip:{model_name}/{checkpoint}"}
    proc = subprocess.run([str(python), __file__, "--clip-retrieval-driver", json.dumps(job)],
                          capture_output=True, text=True, cwd=BENCH)
    if proc.returncode:
        raise RuntimeError(f"clip_inference failed:\n{proc.stderr[-3000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith(DRIVER_MARK)]
    if not lines:
        raise RuntimeError(f"clip_inference printed no result:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    result = json.loads(lines[-1][len(DRIVER_MARK):])
    stats = [json.loads(p.read_text()) for p in (out / "stats").glob("[0-9]*.json")]
    result["worker_total_s"] = sum(s["total_duration"] for s in stats)  # its own timing, loading excluded
    result["sample_count"] = sum(s["sample_count"] for s in stats)
    return result


def _clip_retrieval_driver(job_json: str) -> None:
    """Runs inside the clip-retrieval venv: clip_inference's main(), timed, as one JSON line."""
    import open_clip
    from clip_retrieval.clip_inference.main import main as clip_inference

    open_clip.add_model_config(BENCH.parent / "transforms" / "clip_configs")  # daco-tiny-clip, for --model
    start = time.perf_counter()
    clip_inference(**json.loads(job_json))
    print(f"\n{DRIVER_MARK}" + json.dumps({"wall_s": time.perf_counter() - start}))  # its progress line has no newline


def _agreement(ours: Path, theirs: Path) -> float:
    """Largest |difference| between our and clip_inference's image embeddings of the same keys."""
    import numpy as np
    import pyarrow.parquet as pq

    from transforms.embeddings_layout import read_embeddings

    img, _, meta = read_embeddings(str(ours / "embeddings"))
    row = {k: i for i, k in enumerate(meta.column("key").to_pylist())}
    their_img = np.load(theirs / "img_emb" / "img_emb_0.npy", allow_pickle=False)
    their_keys = pq.read_table(theirs / "metadata" / "metadata_0.parquet").column("key").to_pylist()
    ours_aligned = img[[row[k] for k in their_keys]].astype(np.float32)
    return float(np.abs(ours_aligned - their_img.astype(np.float32)).max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=192, help="image-caption pairs (default 192; --full 1024)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3; --full 5)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights, seed 0)")
    parser.add_argument("--full", action="store_true", help="1024 pairs, 5 rounds")
    parser.add_argument("--no-clip-retrieval", action="store_true", help="skip the clip-retrieval figure")
    parser.add_argument("--clip-retrieval-driver", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.clip_retrieval_driver:
        _clip_retrieval_driver(args.clip_retrieval_driver)
        return 0
    if args.full:
        args.n, args.rounds = max(args.n, 1024), max(args.rounds, 5)

    sys.path.insert(0, str(BENCH))
    import io

    import torch
    from PIL import Image

    from common import median, write_result
    from pipeline.runner import quiet_beam_logging
    from transforms.clip_model import ClipConfig, load_clip
    from transforms.shards import iter_records

    quiet_beam_logging()
    shards = _corpus(args.n, shard_size=(args.n + 1) // 2)
    records = list(iter_records(str(shards)))
    checkpoint = _checkpoint(args.model)
    cfg = ClipConfig(model_name=args.model, pretrained=str(checkpoint), batch_size=args.batch_size, device="cpu")
    loaded = load_clip(cfg)
    batches = []
    for i in range(0, len(records), args.batch_size):
        chunk = records[i:i + args.batch_size]
        images = torch.stack([loaded.preprocess(Image.open(io.BytesIO(r["jpg"])).convert("RGB")) for r in chunk])
        batches.append((images, loaded.tokenizer([r["caption"] for r in chunk])))
    _time_bare(loaded, batches[:1])  # warm-up

    clip_retrieval_error = None
    python = None
    if not args.no_clip_retrieval:
        try:
            python = ensure_clip_retrieval_venv()
        except (subprocess.CalledProcessError, OSError) as exc:
            clip_retrieval_error = f"could not create {VENV}: {exc}"

    times: dict[str, list[float]] = {"bare": [], "beam": [], "clip_retrieval": []}
    clip_retrieval_runs = []
    model_load: list[float] = []  # seconds of each beam round spent loading the model
    methods = ["bare", "beam"] + (["clip_retrieval"] if python else [])
    for r in range(args.rounds):
        for method in methods[r % len(methods):] + methods[:r % len(methods)]:  # rotate the order
            if method == "bare":
                times["bare"].append(_time_bare(loaded, batches))
            elif method == "beam":
                wall, load = _time_beam(records, cfg, CACHE / "out-beam")
                times["beam"].append(wall)
                model_load.append(load)
            elif clip_retrieval_error is None:
                try:
                    run = _time_clip_retrieval(python, shards, checkpoint, args.model, args.batch_size, args.n,
                                               CACHE / "out-clip-retrieval")
                    clip_retrieval_runs.append(run)
                    times["clip_retrieval"].append(run["wall_s"])
                except RuntimeError as exc:
                    clip_retrieval_error = str(exc)
            print(f"round {r + 1}/{args.rounds} {method}: "
                  f"{times[method][-1] if times[method] else float('nan'):.2f} s", file=sys.stderr, flush=True)

    n = len(records)
    rate = {m: n / median(t) for m, t in times.items() if t}
    result = {
        "model": f"{args.model} (random weights, seed 0)", "pairs": n, "batch_size": args.batch_size,
        "rounds": args.rounds, "torch_threads": torch.get_num_threads(),
        "seconds": times, "pairs_per_s": rate, "beam_vs_bare": rate["beam"] / rate["bare"], "goal": 0.8,
        "beam_model_load_s": model_load,
        "beam_vs_bare_excluding_model_load": n / median([w - l for w, l in zip(times["beam"], model_load)]) / rate["bare"],
        "load_average_1min": os.getloadavg()[0],
    }
    if clip_retrieval_runs:
        worker = median([run["worker_total_s"] for run in clip_retrieval_runs])
        result["clip_retrieval"] = {
            "end_to_end_pairs_per_s": rate["clip_retrieval"], "worker_loop_pairs_per_s": n / worker,
            "beam_vs_clip_retrieval": rate["beam"] / rate["clip_retrieval"],
            "settings": "clip_inference main(), webdataset input, num_prepro_workers=1, use_jit=False",
            "max_abs_diff_img_emb_vs_ours": _agreement(CACHE / "out-beam", CACHE / "out-clip-retrieval"),
        }
    if clip_retrieval_error:
        result["clip_retrieval_error"] = clip_retrieval_error
    path = write_result("clip_throughput", result)

    print(f"pairs {n}, batch {args.batch_size}, {args.model} untrained, {args.rounds} rounds, results in {path}")
    print(f"bare open_clip forward: {rate['bare']:.1f} pairs/s (median {median(times['bare']):.2f} s)")
    print(f"beam ComputeEmbeddings: {rate['beam']:.1f} pairs/s (median {median(times['beam']):.2f} s end to end, "
          f"of which loading the model {median(model_load):.2f} s)")
    if clip_retrieval_runs:
        cr = result["clip_retrieval"]
        print(f"clip-retrieval clip_inference: {cr['end_to_end_pairs_per_s']:.1f} pairs/s end to end, "
              f"{cr['worker_loop_pairs_per_s']:.1f} pairs/s in its worker loop; "
              f"beam / clip-retrieval (end to end) = {cr['beam_vs_clip_retrieval']:.2f}x; "
              f"max |img_emb difference| vs ours {cr['max_abs_diff_img_emb_vs_ours']:.4f}")
    elif clip_retrieval_error:
        print(f"clip-retrieval: not measured: {clip_retrieval_error}")
    print(f"beam / bare forward = {result['beam_vs_bare']:.2f} end to end, "
          f"{result['beam_vs_bare_excluding_model_load']:.2f} without the one-time model load (goal >= 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
