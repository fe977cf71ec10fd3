"""One prepared GPU check at the paper's shapes: every figure that needs a GPU, in one command.

Figures (each printed as it is measured; ``bench/results/gpu_check.json`` is rewritten after each):

1. ``capture``: the activation stage's own code (``MLLMActivationHandler.run_inference`` ->
   ``pooled_activations`` -> ``steering.capture``) on a randomly initialised, full-size
   Qwen2.5-VL-7B built offline from its real config (``bench/qwen2_5_vl_7b_config.json``,
   the Hub's ``config.json``; token ids set to the offline tokenizer's), bf16, SDPA
   attention (flash-attention 2 when ``flash_attn`` imports). Stimuli: 448x448 JPEGs
   with CC-3M-length captions, batched as the stage batches them (the
   ``cc3m-qwen2.5-vl-7b`` preset's ``mllm`` section; one RunInference example is
   ``4 x batch_size`` stimuli, as ``FixedBatches`` cuts them). Reports stimuli/s and
   tokens/s through the stage, the stopped forward against the full forward with
   ``output_hidden_states`` (bench/capture_throughput.py's), and MFU: FLOPs counted by
   ``torch.utils.flop_counter`` on the stopped forward over the time, against the H200's
   dense bf16 peak of 989.4 TFLOP/s (NVIDIA H200 datasheet: 1,979 TFLOP/s with 2:4
   sparsity) and against the bf16 matmul rate measured in the same run.
2. ``clip``: untrained CLIP ViT-L-14 pairs/s through ``transforms.clip_model`` and ``transforms.embed``: the bare forward
   (``LoadedClip.embed_pairs`` on prepared batches) against the whole Beam stage
   (``ComputeEmbeddings`` on the local runner, bench/clip_throughput.py's timing; model
   load reported apart). Beam's wheels fit the carry, so the stage runs through Beam.
3. ``retrieval``: 15,000 queries over 3.3M random unit vectors (d 768, stored float16 as
   the embeddings stage writes them), top 50 by inner product: exact torch (fp32
   matmul, TF32 off, + top-k, query chunks) against the fp16 matmul (opt-in
   approximation: its recall@50 against exact is printed) and faiss ``IndexFlatIP`` on
   the GPU when a faiss with GPU support imports (none travels by default, see below).
4. ``steering``: DACO's per-generated-token overhead on the same full-size model's
   language model (text prompt, greedy, batch 1, KV cache): exact path and calibrated
   fast path with a 15,000-atom SAE at layers 15-19, ActAdd and MOP beside them, timed by
   bench/steer_overhead.py's code (wall clock, synchronised per token).

Left out: SAE training tokens/s (issue 16's figure 5) needs ``daco train-sae`` (issue 14),
which has not landed.

Wheels: the GPU machine lacks open_clip and apache-beam (both stages import Beam). Build
them here, with network, as x86-64 CPython 3.12 wheels::

    make gpu-check-wheels        # -> .whl/ (pip download --no-deps; list in the Makefile)

and carry ``.whl``; the script installs what does not import into /tmp/daco-gpu-check-site
(pip --no-index --no-deps) before anything else. faiss-gpu does not fit the 64 MiB carry.
docs/gpu-check.md has the exact ``run`` call.

    python3 bench/gpu_check.py                 # GPU, full shapes (budget: <= 6 minutes on one H200)
    python3 bench/gpu_check.py --only capture,steering
    python3 bench/gpu_check.py --smoke         # CPU, tiny shapes, every code path (tests/test_gpu_check.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for path in (str(ROOT), str(BENCH)):  # the repo's packages and the other benchmarks, without an install
    if path not in sys.path:
        sys.path.insert(0, path)

from common import median  # noqa: E402  (bench/common.py)

WHEELS = ROOT / ".whl"
SITE = Path("/tmp/daco-gpu-check-site")
QWEN_CONFIG = BENCH / "qwen2_5_vl_7b_config.json"
PRESET = ROOT / "pipeline" / "presets" / "cc3m-qwen2.5-vl-7b.yaml"
RESULTS = BENCH / "results" / "gpu_check.json"
FIGURES = ("capture", "steering", "retrieval", "clip")
"""In the order they run: the Beam stage (multi-process model sharing on a GPU) goes last."""
H200_DENSE_BF16 = 989.4e12
"""FLOP/s: NVIDIA H200 SXM datasheet, BF16 Tensor Core 1,979 TFLOP/s with 2:4 sparsity, i.e. 989.4 dense."""
STAGE_STIMULI = 400_000
"""Stimuli of the paper's activation stage (the 1.3 H100-hour goal at >= 35% MFU)."""
CAPTION_WORDS = ("a the red dog cat man woman two people riding horse near river sitting on bench in park with "
                 "old city street at night small boy holding blue ball beside white car").split()


class CheckError(RuntimeError):
    """A precondition of the check failed; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Sizes of one run: :data:`FULL` (the paper's, on a GPU) or :data:`SMOKE` (tiny, on the CPU)."""

    device: str
    image_px: int
    stage_examples: int  # RunInference examples of 4 x batch_size stimuli per timed pass
    batch_size: int | None  # None: the preset's mllm.batch_size
    reps: int
    clip_model: str
    clip_pairs: int
    clip_image_px: int
    clip_batch: int | None  # None: the preset's clip.batch_size
    queries: int
    database: int
    dim: int
    top_k: int
    query_chunk: int
    atoms: int
    sae_k: int
    new_tokens: int
    rounds: int
    mop_rounds: int
    mop_new_tokens: int
    mop_iters: int
    matmul_n: int


FULL = Shapes(device="cuda", image_px=448, stage_examples=1, batch_size=None, reps=3, clip_model="ViT-L-14",
              clip_pairs=2048, clip_image_px=256, clip_batch=None, queries=15_000, database=3_300_000, dim=768,
              top_k=50, query_chunk=1024, atoms=15_000, sae_k=64, new_tokens=32, rounds=5, mop_rounds=2,
              mop_new_tokens=8, mop_iters=20, matmul_n=8192)
SMOKE = Shapes(device="cpu", image_px=56, stage_examples=1, batch_size=1, reps=1, clip_model="daco-tiny-clip",
               clip_pairs=16, clip_image_px=64, clip_batch=8, queries=64, database=5000, dim=32, top_k=50,
               query_chunk=16, atoms=300, sae_k=16, new_tokens=3, rounds=1, mop_rounds=1, mop_new_tokens=2,
               mop_iters=5, matmul_n=256)
SMOKE_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=20, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096)
SMOKE_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                    fullatt_block_indexes=[1])


def say(*parts) -> None:
    print(*parts, flush=True)


# ----------------------------------------------------------------------------- set-up


def check_device(shapes: Shapes) -> None:
    """Fail fast, before any install or model, when the run cannot work here."""
    import torch

    if shapes.device == "cuda":
        if not torch.cuda.is_available():
            raise CheckError("no CUDA device visible to torch: run this on the GPU machine (docs/gpu-check.md), "
                             "or pass --smoke for the tiny CPU run")
        free, total = torch.cuda.mem_get_info()
        if free < 60 * 2**30:
            raise CheckError(f"{free / 2**30:.0f} GiB free of {total / 2**30:.0f} GiB on the GPU; the full shapes "
                             "need about 60 GiB (an H200 has 139)")


def installed(project: str) -> bool:
    """Whether a distribution named ``project`` is installed (names compared normalised)."""
    try:
        importlib.metadata.distribution(project)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def install_wheels(modules=("apache_beam", "open_clip"), wheels_dir: Path = WHEELS, site: Path = SITE) -> list[str]:
    """When one of ``modules`` does not import, install the carried wheels (``.whl/*.whl``) of the
    distributions not installed here into ``site`` (pip, offline, no dependency resolution) and put
    it on the path of this process and of the processes it starts; the names of the wheels installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return []
    wheels = [w for w in sorted(wheels_dir.glob("*.whl")) if not installed(w.name.split("-")[0])]
    if not wheels:
        raise CheckError(f"{', '.join(missing)} not installed and no wheel for it in {wheels_dir}: run "
                         "`make gpu-check-wheels` on a machine with network and carry '.whl' (docs/gpu-check.md)")
    say(f"installing {len(wheels)} carried wheels into {site} ({', '.join(missing)} missing)")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)], check=True)
    sys.path.append(str(site))
    importlib.invalidate_caches()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(site)]))
    return [w.name for w in wheels]


def check_imports() -> None:
    """Import what the figures import, so a missing dependency fails now with its fix."""
    for module in ("transforms.activations", "transforms.embed", "capture_throughput", "clip_throughput",
                   "steer_overhead"):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise CheckError(f"importing {module} failed ({exc}): add the missing package's wheel to "
                             "GPU_CHECK_WHEELS in the Makefile, rerun `make gpu-check-wheels` and carry '.whl'") from exc


def preset() -> dict:
    """The ``cc3m-qwen2.5-vl-7b`` preset (the paper's build): its ``mllm`` and ``clip`` sections."""
    import yaml

    return yaml.safe_load(PRESET.read_text())


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, reps: int) -> list[float]:
    """Wall seconds of ``reps`` calls of ``fn`` (device synchronised before and after each)."""
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def jpeg(rng, px: int) -> bytes:
    """A random ``px`` x ``px`` RGB JPEG (the stages decode bytes, as they read them from shards)."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (px, px, 3), dtype="uint8")).save(out, format="JPEG", quality=90)
    return out.getvalue()


def caption(rng) -> str:
    """A CC-3M-length caption (6-16 words)."""
    return " ".join(rng.choice(CAPTION_WORDS, size=int(rng.integers(6, 17))))


# ----------------------------------------------------------------------------- the model


def qwen_config(smoke: bool, tokenizer) -> dict:
    """The real Qwen2.5-VL-7B config (tiny sizes in smoke mode), token ids of the offline tokenizer."""
    from steering.models.qwen_vl import mrope_section

    config = json.loads(QWEN_CONFIG.read_text())
    if smoke:
        config.update(SMOKE_TEXT)
        config["vision_config"] = {**config["vision_config"], **SMOKE_VISION}
        head_dim = SMOKE_TEXT["hidden_size"] // SMOKE_TEXT["num_attention_heads"]
        config["rope_scaling"] = {**config["rope_scaling"], "mrope_section": mrope_section(head_dim)}
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>")}
    config.update(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  bos_token_id=ids["<|endoftext|>"],
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return config


def build_qwen(shapes: Shapes, smoke: bool, attention: str = "auto", seed: int = 0):
    """A randomly initialised Qwen2.5-VL-7B (flagged untrained) built on the device in the stage's dtype,
    the real processor classes at the real patch sizes around the adapter's offline tokenizer, and
    the adapter: a ``transforms.activations.LoadedMLLM``."""
    import torch
    import transformers
    from transformers import AutoConfig, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from steering.models import default_dtype, get_adapter
    from steering.models.qwen_vl import CHAT_TEMPLATE
    from transforms.activations import LoadedMLLM, MLLMConfig, token_cap

    adapter = get_adapter("qwen2_5_vl")
    tokenizer = adapter.build_untrained(seed).processor.tokenizer  # the offline tokenizer (its tiny model is dropped)
    config = AutoConfig.for_model(**qwen_config(smoke, tokenizer))
    config.untrained = True
    if attention == "auto":
        attention = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    torch.manual_seed(seed)
    with torch.device(shapes.device):
        model = getattr(transformers, adapter.model_class_name)._from_config(
            config, dtype=default_dtype(shapes.device), attn_implementation=attention)
    model.eval()
    vision = config.vision_config
    pixels = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384}  # the checkpoint's preprocessor_config
    processor = transformers.Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                                              temporal_patch_size=vision.temporal_patch_size, size=pixels),
        video_processor=Qwen2VLVideoProcessor(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                                              temporal_patch_size=vision.temporal_patch_size),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    return LoadedMLLM(model, processor, adapter, token_cap(MLLMConfig(), model))


def matmul_rate(shapes: Shapes) -> float:
    """FLOP/s of an n x n x n matmul in the stage's dtype, median of 10 after 3 warm-ups (the achievable ceiling)."""
    import torch

    from steering.models import default_dtype

    n = shapes.matmul_n
    a = torch.randn(n, n, device=shapes.device, dtype=default_dtype(shapes.device))
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    return 2 * n ** 3 / median(timed(lambda: a @ b, shapes.device, 10))


# ----------------------------------------------------------------------------- figure 1


class RecordingAdapter:
    """A model adapter that keeps every batch of inputs built through it (all else is the adapter's)."""

    def __init__(self, adapter):
        self._adapter = adapter
        self.inputs = []

    def build_inputs(self, *args, **kwargs):
        inputs = self._adapter.build_inputs(*args, **kwargs)
        self.inputs.append(inputs)
        return inputs

    def __getattr__(self, name):
        return getattr(self._adapter, name)


def figure_capture(loaded, shapes: Shapes, seed: int = 0) -> dict:
    """Activation capture through the stage at the model's full size (see the module docstring)."""
    import numpy as np
    from torch.utils.flop_counter import FlopCounterMode

    from capture_throughput import full_forward
    from steering.capture import capture, forward_until
    from transforms.activations import LoadedMLLM, MLLMActivationHandler, MLLMConfig

    section = preset()["mllm"]
    cfg = MLLMConfig.from_dict({**{k: section[k] for k in ("layers", "pooling", "prompt_template", "batch_size")},
                                "device": shapes.device, **({"batch_size": shapes.batch_size} if shapes.batch_size else {})})
    model, processor, adapter = loaded
    attention = model.config._attn_implementation  # what the model runs, whatever was asked
    rng = np.random.default_rng(seed)
    per_example = 4 * cfg.batch_size  # FixedBatches(4 * batch_size, ...)
    examples = [tuple((jpeg(rng, shapes.image_px), caption(rng)) for _ in range(per_example))
                for _ in range(shapes.stage_examples)]
    n = per_example * len(examples)
    handler = MLLMActivationHandler(cfg)

    def stage(mllm=loaded):
        results = handler.run_inference(examples, mllm)
        failed = [v["error"] for r in results for v in r.inference if "error" in v]
        if failed:
            raise RuntimeError(f"{len(failed)} stimuli failed in the stage: {failed[0]}")

    # the batches the stage builds (its own cutting and inputs), kept for timing the forwards alone
    recorder = RecordingAdapter(adapter)
    stage(LoadedMLLM(model, processor, recorder, loaded.max_tokens))
    batches = [inputs.to(model.device) for inputs in recorder.inputs]
    for inputs in batches:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    padded = int(sum(b["attention_mask"].numel() for b in batches))
    layers = cfg.layers
    variants = {
        "stage": stage,
        "capture": lambda: [capture(model, adapter, b, layers, cfg.pooling) for b in batches],
        "bare": lambda: [forward_until(model, adapter, b, max(layers)) for b in batches],
        "full": lambda: [full_forward(model, b) for b in batches],
    }
    for fn in variants.values():  # warm-up (kernel selection, allocator)
        fn()
    with FlopCounterMode(display=False) as counter:
        variants["capture"]()
    flops = counter.get_total_flops()
    times = {name: timed(fn, shapes.device, shapes.reps) for name, fn in variants.items()}
    med = {name: median(ts) for name, ts in times.items()}
    peak = matmul_rate(shapes)
    stimuli_per_s = n / med["stage"]
    mfu = {name: flops / med[name] / H200_DENSE_BF16 for name in ("stage", "capture")}
    hours = STAGE_STIMULI / stimuli_per_s / 3600
    text = model.config.text_config
    result = {
        "model": {"class": type(model).__name__, "untrained": True, "parameters": sum(p.numel() for p in model.parameters()),
                  "hidden_size": text.hidden_size, "num_hidden_layers": text.num_hidden_layers,
                  "vision_depth": model.config.vision_config.depth, "dtype": str(model.dtype), "attention": attention},
        "stage_config": dataclasses.asdict(cfg), "image_px": shapes.image_px, "stimuli": n,
        "attended_tokens": tokens, "padded_tokens": padded, "forwards": len(batches), "reps": shapes.reps,
        "seconds": times, "median_s": med,
        "stimuli_per_s": {name: n / t for name, t in med.items()},
        "tokens_per_s": {name: tokens / t for name, t in med.items()},
        "full_over_stopped": med["full"] / med["capture"], "hook_overhead_vs_bare": med["capture"] / med["bare"] - 1,
        "stage_over_capture": med["stage"] / med["capture"],
        "flops_per_pass": flops, "flops_per_stimulus": flops / n,
        "peak_flops": H200_DENSE_BF16, "peak_source": "NVIDIA H200 SXM datasheet, BF16 Tensor Core 1,979 TFLOP/s "
                                                      "with sparsity = 989.4 dense",
        "mfu": mfu, "measured_matmul_flops": peak,
        "fraction_of_measured_matmul": {name: flops / med[name] / peak for name in ("stage", "capture")},
        "stage_hours_400k": hours, "goals": {"mfu_min": 0.35, "stage_h100_hours_max": 1.3},
    }
    say(f"[capture] {type(model).__name__} {result['model']['parameters'] / 1e9:.2f}B params, {model.dtype}, "
        f"{attention}; {n} stimuli of {shapes.image_px}px + caption, batch {cfg.batch_size}, "
        f"{tokens / n:.0f} attended tokens per stimulus ({padded / n:.0f} padded)")
    for name in variants:
        say(f"[capture]   {name:<8} {med[name] * 1e3:9.1f} ms/pass  {n / med[name]:8.1f} stimuli/s  "
            f"{tokens / med[name]:10.0f} tokens/s")
    say(f"[capture] stopped vs full forward: {result['full_over_stopped']:.2f}x; hook overhead vs bare "
        f"{result['hook_overhead_vs_bare'] * 100:+.1f}%; stage vs forward alone {result['stage_over_capture']:.2f}x")
    say(f"[capture] {flops / n / 1e12:.2f} TFLOP per stimulus; MFU through the stage {mfu['stage'] * 100:.1f}% "
        f"(capture alone {mfu['capture'] * 100:.1f}%) of {H200_DENSE_BF16 / 1e12:.1f} TFLOP/s dense bf16; "
        f"measured {shapes.matmul_n}^3 bf16 matmul {peak / 1e12:.0f} TFLOP/s (goal >= 35% MFU)")
    say(f"[capture] {STAGE_STIMULI:,} stimuli would take {hours:.2f} GPU-hours at this rate (goal <= 1.3 H100-hours; "
        "an H200's dense bf16 peak is an H100 SXM's)")
    return result


# ----------------------------------------------------------------------------- figure 4


def figure_steering(loaded, shapes: Shapes, seed: int = 0) -> dict:
    """DACO, ActAdd and MOP per-token overhead on the full-size language model (bench/steer_overhead.py's code)."""
    from steer_overhead import LAYERS, PAPER_OVERHEAD_PCT, PROMPT, dictionary_steerers, summarise, text_inputs, time_methods

    model, processor, _adapter = loaded
    tokenizer = processor.tokenizer
    steerers, _calibration, reports = dictionary_steerers(model, tokenizer, shapes.atoms, shapes.sae_k,
                                                          shapes.mop_iters, seed)
    with steerers["mop"]:  # build MOP's solvers where and in the dtype they run (entering moves them)
        steerers["mop"].prepare()
    inputs = text_inputs(tokenizer, [PROMPT]).to(model.device)
    runs = time_methods(model, inputs, steerers, shapes.rounds, shapes.new_tokens, shapes.mop_rounds,
                        shapes.mop_new_tokens)
    rows = summarise(runs)
    clock = "decode_wall"  # on a GPU the process's CPU time measures the launch loop, not the work
    say(f"[steering] {shapes.atoms}-atom SAE (k {shapes.sae_k}) at layers {LAYERS[0]}-{LAYERS[-1]}, prompt "
        f"{inputs['input_ids'].shape[1]} tokens, {shapes.new_tokens} new tokens ({shapes.mop_new_tokens} for mop), "
        f"{shapes.rounds} rounds; ms per generated token (median wall, synchronised):")
    for name, row in rows.items():
        paper = f"  (paper +{PAPER_OVERHEAD_PCT[name]:.1f}%)" if name in PAPER_OVERHEAD_PCT else ""
        say(f"[steering]   {name:<11} {row[clock]['ms']:8.2f} ms  {row[clock]['overhead_pct']:+7.1f}%  "
            f"paired {row[clock]['paired_overhead_pct']:+7.1f}%{paper}")
    for layer, rep in reports.items():
        say(f"[steering]   fast path calibration, layer {layer}: agreement with exact TopK {rep.agreement:.4f}")
    exact = rows["daco"][clock]["overhead_pct"]
    say(f"[steering] DACO exact path per generated token: {exact:+.1f}% (the opt-in fast path "
        f"{rows['daco_fast'][clock]['overhead_pct']:+.1f}%; goal <= +5%, paper +14.6%)")
    return {"clock": clock, "layers": list(LAYERS), "atoms": shapes.atoms, "k": shapes.sae_k,
            "new_tokens": shapes.new_tokens, "mop_new_tokens": shapes.mop_new_tokens, "rounds": shapes.rounds,
            "mop_rounds": shapes.mop_rounds, "mop_iters": shapes.mop_iters, "methods": rows,
            "calibration": {str(layer): rep._asdict() for layer, rep in reports.items()},
            "daco_exact_overhead_pct": exact, "paper_overhead_pct": PAPER_OVERHEAD_PCT, "goal_overhead_pct_max": 5.0}


# ----------------------------------------------------------------------------- figure 2


def figure_clip(shapes: Shapes, seed: int = 0) -> dict:
    """CLIP pairs/s: the bare forward against the Beam stage end to end (model load excluded)."""
    import numpy as np
    import torch
    from PIL import Image

    from clip_throughput import _time_bare, _time_beam
    from transforms.clip_model import ClipConfig, load_clip

    batch = shapes.clip_batch or preset()["clip"]["batch_size"]
    cfg = ClipConfig(model_name=shapes.clip_model, pretrained=None, allow_untrained=True, batch_size=batch,
                     device=shapes.device, seed=seed)
    rng = np.random.default_rng(seed)
    records = [{"key": f"{i:09d}", "jpg": jpeg(rng, shapes.clip_image_px), "caption": caption(rng),
                "url": f"http://127.0.0.1/{i}.jpg", "shard": "00000"} for i in range(shapes.clip_pairs)]
    start = time.perf_counter()
    loaded = load_clip(cfg)
    load_s = time.perf_counter() - start
    examples = []
    for r in records:
        with Image.open(io.BytesIO(r["jpg"])) as img:
            examples.append((loaded.preprocess(img.convert("RGB")), loaded.tokenizer([r["caption"]])[0]))
    chunks = [examples[i:i + batch] for i in range(0, len(examples), batch)]
    batches = [(torch.stack([e[0] for e in c]), torch.stack([e[1] for e in c])) for c in chunks]
    _time_bare(loaded, batches)  # warm-up
    med = {"bare": median(timed(lambda: _time_bare(loaded, batches), shapes.device, shapes.reps))}
    del loaded
    gc.collect()
    with tempfile.TemporaryDirectory() as out:
        beam_wall, beam_load = _time_beam(records, cfg, Path(out))
    med["beam"] = beam_wall - beam_load
    n = len(records)
    rate = {name: n / t for name, t in med.items()}
    say(f"[clip] untrained {cfg.model_name}, batch {batch}, {n} pairs of {shapes.clip_image_px}px JPEG + caption "
        f"(model built in {load_s:.1f}s):")
    for name in ("bare", "beam"):
        say(f"[clip]   {name:<5} {rate[name]:9.1f} pairs/s")
    say(f"[clip] Beam stage end to end {beam_wall:.1f}s, of which model load {beam_load:.1f}s; "
        f"through Beam (model load excluded) / bare: {rate['beam'] / rate['bare']:.2f} (goal >= 0.8)")
    return {"model": cfg.model_name, "untrained": True, "batch_size": batch, "pairs": n,
            "image_px": shapes.clip_image_px, "median_s": med, "pairs_per_s": rate,
            "beam_wall_s": beam_wall, "beam_model_load_s": beam_load,
            "beam_over_bare": rate["beam"] / rate["bare"],
            "path": "Beam: ComputeEmbeddings on the local runner (its wheels fit the carry)",
            "goal_min": 0.8}


# ----------------------------------------------------------------------------- figure 3


def unit_rows(n: int, d: int, device: str, generator, chunk: int = 262_144):
    """``n`` random unit vectors [n, d], float16 (as the embeddings stage stores them), drawn in chunks."""
    import torch

    out = torch.empty(n, d, dtype=torch.float16, device=device)
    for start in range(0, n, chunk):
        block = torch.randn(min(chunk, n - start), d, device=device, generator=generator)
        out[start:start + len(block)] = torch.nn.functional.normalize(block, dim=1)
    return out


def torch_search(queries, database, k: int, chunk: int):
    """Top-``k`` inner products of each query: matmul + top-k, ``chunk`` queries at a time; indices on the CPU."""
    import torch

    found = []
    with torch.inference_mode():
        for start in range(0, len(queries), chunk):
            scores = queries[start:start + chunk] @ database.T
            found.append(scores.topk(k, dim=1).indices.cpu())
    return torch.cat(found)


def recall_at(found, exact, k: int) -> float:
    """Mean over queries of |found ∩ exact| / k."""
    import numpy as np

    f, e = np.asarray(found), np.asarray(exact)
    return float(np.mean([len(np.intersect1d(f[i], e[i])) / k for i in range(len(e))]))


def faiss_gpu(device: str):
    """faiss when it can search here (GPU support on a GPU run; any faiss in smoke mode), else (None, why)."""
    if importlib.util.find_spec("faiss") is None:
        return None, "faiss not installed (no faiss-gpu wheel for CUDA 13 fits the 64 MiB carry)"
    import faiss

    if device.startswith("cuda") and not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
        return None, "faiss has no GPU support here"
    return faiss, ""


def figure_retrieval(shapes: Shapes, seed: int = 0) -> dict:
    """Exact top-50 at CC-3M scale: torch fp32 vs torch fp16 vs faiss (see the module docstring)."""
    import torch

    g = torch.Generator(shapes.device).manual_seed(seed)
    database = unit_rows(shapes.database, shapes.dim, shapes.device, g)
    queries = unit_rows(shapes.queries, shapes.dim, shapes.device, g)
    k, chunk = shapes.top_k, shapes.query_chunk
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # exact: fp32 products of the stored fp16 values
    try:
        db32, q32 = database.float(), queries.float()
        torch_search(q32[:chunk], db32, k, chunk)  # warm-up
        sync(shapes.device)
        start = time.perf_counter()
        exact = torch_search(q32, db32, k, chunk)
        exact_s = time.perf_counter() - start
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    del db32
    gc.collect()
    methods = {"torch_fp32_exact": {"seconds": exact_s, "recall_at_k": 1.0}}
    if shapes.device != "cpu":  # half-precision matmul is a GPU path
        torch_search(queries[:chunk], database, k, chunk)
        sync(shapes.device)
        start = time.perf_counter()
        half = torch_search(queries, database, k, chunk)
        methods["torch_fp16"] = {"seconds": time.perf_counter() - start, "recall_at_k": recall_at(half, exact, k)}
    faiss, why = faiss_gpu(shapes.device)
    if faiss is not None:
        index = faiss.IndexFlatIP(shapes.dim)
        if shapes.device != "cpu":
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        index.add(database.float().cpu().numpy())
        q = q32.cpu().numpy()
        start = time.perf_counter()
        _, found = index.search(q, k)
        methods["faiss_flat_ip"] = {"seconds": time.perf_counter() - start, "recall_at_k": recall_at(found, exact, k),
                                    "gpu": shapes.device != "cpu"}
    say(f"[retrieval] {shapes.queries:,} queries over {shapes.database:,} unit vectors, d {shapes.dim}, top {k}, "
        f"query chunks of {chunk}:")
    for name, m in methods.items():
        say(f"[retrieval]   {name:<17} {m['seconds']:8.2f} s  {shapes.queries / m['seconds']:10.0f} queries/s  "
            f"recall@{k} {m['recall_at_k']:.4f} (vs torch fp32 exact)")
    if why:
        say(f"[retrieval]   faiss: not measured: {why}")
    fastest = min(methods, key=lambda name: methods[name]["seconds"])
    say(f"[retrieval] fastest: {fastest}")
    return {"queries": shapes.queries, "database": shapes.database, "dim": shapes.dim, "k": k, "query_chunk": chunk,
            "stored_dtype": "float16", "methods": methods, "faiss_skipped": why or None, "fastest": fastest}


# ----------------------------------------------------------------------------- main


def environment(shapes: Shapes, wheels: list[str]) -> dict:
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "cpus": os.cpu_count(), "device": shapes.device, "carried_wheels": wheels}
    if shapes.device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30)
    return env


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (every code path; under a minute)")
    parser.add_argument("--only", default=",".join(FIGURES),
                        help=f"comma-separated figures to run, of {', '.join(FIGURES)} (default: all)")
    parser.add_argument("--attention", default="auto", choices=("auto", "sdpa", "flash_attention_2", "flex_attention", "eager"),
                        help="the Qwen model's attn_implementation (auto: flash_attention_2 when flash_attn imports, else sdpa)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"result JSON (default {RESULTS.relative_to(ROOT)}; --smoke: gpu_check_smoke.json beside it)")
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(args.only) - set(FIGURES))
    if unknown or not args.only:
        parser.error(f"--only: unknown figure(s) {unknown}; choose from {', '.join(FIGURES)}")
    args.out = args.out or (RESULTS.with_name("gpu_check_smoke.json") if args.smoke else RESULTS)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    shapes = SMOKE if args.smoke else FULL
    started = time.perf_counter()
    # the repo's packages for the processes Beam starts too (on a GPU the model server is one)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    try:
        check_device(shapes)
        wheels = install_wheels()
        check_imports()
    except (CheckError, subprocess.CalledProcessError) as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    import torch

    torch.set_grad_enabled(False)
    if args.smoke:
        torch.set_num_threads(1)  # tiny ops: one thread, no spin-waiting on a shared CPU
    result = {"smoke": args.smoke, "shapes": dataclasses.asdict(shapes), "environment": environment(shapes, wheels),
              "figures": {}, "left_out": {"sae_training": "needs `daco train-sae` (issue 14, Trained DACO), not landed"}}

    def save():
        result["elapsed_s"] = time.perf_counter() - started
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")

    def run(name, fn, *fn_args):
        t0 = time.perf_counter()
        try:
            result["figures"][name] = {**fn(*fn_args), "figure_s": time.perf_counter() - t0}
        except Exception as exc:  # noqa: BLE001 - one figure's failure must not cost the others' device minutes
            traceback.print_exc()
            result["figures"][name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            say(f"[{name}] FAILED: {type(exc).__name__}: {exc}")
        say(f"[{name}] {time.perf_counter() - t0:.0f}s (run so far {time.perf_counter() - started:.0f}s)")
        save()

    say(f"gpu_check: {'smoke (CPU, tiny shapes)' if args.smoke else 'full shapes'} on {shapes.device}; "
        f"figures {', '.join(args.only)}; SAE training left out (issue 14)")
    if {"capture", "steering"} & set(args.only):
        t0 = time.perf_counter()
        try:
            loaded = build_qwen(shapes, args.smoke, args.attention)
        except Exception as exc:  # noqa: BLE001 - reported like a figure's failure
            traceback.print_exc()
            for name in {"capture", "steering"} & set(args.only):
                result["figures"][name] = {"error": f"building the model: {type(exc).__name__}: {exc}"[:2000]}
        else:
            say(f"[model] untrained Qwen2.5-VL-7B{' (smoke sizes)' if args.smoke else ''} built on {shapes.device} "
                f"in {time.perf_counter() - t0:.0f}s")
            if "capture" in args.only:
                run("capture", figure_capture, loaded, shapes)
            if "steering" in args.only:
                run("steering", figure_steering, loaded, shapes)
            del loaded
            gc.collect()
            if shapes.device == "cuda":
                torch.cuda.empty_cache()
    if "retrieval" in args.only:
        run("retrieval", figure_retrieval, shapes)
    if "clip" in args.only:
        run("clip", figure_clip, shapes)
    save()
    failed = sorted(name for name, fig in result["figures"].items() if "error" in fig)
    say(f"wrote {args.out} in {result['elapsed_s']:.0f}s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
