"""Activation capture: the stopped forward (steering.capture) versus transformers' full forward.

One seeded, untrained Qwen2-VL-shaped model (28 decoder layers, real
``Qwen2VLForConditionalGeneration``), hooks at layers 15-19, mean pooling, one batch of
(image, caption) stimuli from the adapter's ``build_inputs``. Three ways to get the same
pooled vectors, interleaved over rounds (the order rotates each round), medians quoted:

* ``full``: ``model(**inputs, output_hidden_states=True)`` then pooling ``hidden_states[l + 1]``
  (every layer, final norm, LM head and logits run);
* ``capture``: :func:`steering.capture.capture` (pooling hooks, stopped after layer 19);
* ``bare``: :func:`steering.capture.forward_until` (the same stopped forward with one stop
  hook and no pooling), the baseline of the hook overhead.

The vocabulary is scaled with the hidden size (152,064 x hidden / 3,584) so that the LM
head costs the same share of a layer as in Qwen2-VL-7B; the vision tower is the adapter's
tiny one (it costs the same in all three). Goals: full/capture >= 1.3x, capture/bare - 1 <= 10%.

The headline uses the process's CPU time with one torch thread: the machine this was
written on is shared (load far above its core count), which makes wall time mostly a
measure of the neighbours; wall-clock medians are printed and written too.

    python bench/capture_throughput.py [--rounds 7] [--batch 4] [--hidden 256] [--threads 1] [--full]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, write_result  # noqa: E402

from steering.capture import capture, forward_until, pooling_weights  # noqa: E402
from steering.models import get_adapter, model_inputs  # noqa: E402

LAYERS = [15, 16, 17, 18, 19]
NUM_LAYERS = 28
QWEN2_VL_7B = {"hidden": 3584, "vocab": 152064, "heads": 28, "kv_heads": 4, "intermediate": 18944}
WORDS = "a the red dog cat man woman two people riding horse near river sitting on bench in park with".split()


def build(hidden: int, seed: int):
    """The seeded 28-layer Qwen2-VL-shaped model, its adapter and processor."""
    adapter = get_adapter("qwen2_vl")
    scale = hidden / QWEN2_VL_7B["hidden"]
    heads = hidden // 64  # head dim 64
    model, processor = adapter.build_untrained(
        seed=seed, num_hidden_layers=NUM_LAYERS, hidden_size=hidden, num_attention_heads=heads,
        num_key_value_heads=max(1, heads * QWEN2_VL_7B["kv_heads"] // QWEN2_VL_7B["heads"]),
        intermediate_size=int(round(QWEN2_VL_7B["intermediate"] * scale / 64)) * 64,
        vocab_size=int(round(QWEN2_VL_7B["vocab"] * scale / 64)) * 64,
    )
    return adapter, model, processor


def stimuli(batch: int, seed: int):
    """``batch`` random 32x32 images with captions of 6-14 words (so the batch is padded)."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(batch)]
    captions = [" ".join(rng.choice(WORDS, size=int(rng.integers(6, 15)))) for _ in range(batch)]
    return images, captions


def full_forward(model, inputs) -> dict[int, torch.Tensor]:
    """The baseline: every layer and the LM head, then pooling the requested hidden states."""
    weights = pooling_weights(inputs["attention_mask"], "mean")
    with torch.inference_mode():
        hidden = model(**model_inputs(inputs), output_hidden_states=True, use_cache=False).hidden_states
    return {l: torch.einsum("bs,bsd->bd", weights, hidden[l + 1].float()) for l in LAYERS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the language model (multiple of 64)")
    parser.add_argument("--full", action="store_true", help="larger sizes: hidden 512, batch 8, 9 rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time measures the work)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.full:
        args.hidden, args.batch, args.rounds = 512, 8, 9
    adapter, model, processor = build(args.hidden, args.seed)
    inputs = adapter.build_inputs(processor, *stimuli(args.batch, args.seed), "Describe the image. {caption}")
    tokens = int(inputs["attention_mask"].sum())

    expected = full_forward(model, inputs)
    got = capture(model, adapter, inputs, LAYERS, "mean")
    for layer in LAYERS:
        torch.testing.assert_close(got[layer], expected[layer], rtol=1e-4, atol=1e-5)

    variants = {
        "full": lambda: full_forward(model, inputs),
        "capture": lambda: capture(model, adapter, inputs, LAYERS, "mean"),
        "bare": lambda: forward_until(model, adapter, inputs, LAYERS[-1]),
    }
    names = list(variants)
    for name in names:  # warm-up
        variants[name]()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        order = names[round_ % 3:] + names[:round_ % 3]
        for name in order:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            variants[name]()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start_wall)
        print(f"round {round_ + 1}: " + "  ".join(
            f"{n} {cpu[n][-1] * 1000:7.1f} ms cpu ({wall[n][-1] * 1000:7.1f} wall)" for n in names), flush=True)

    med = {name: median(ts) for name, ts in cpu.items()}
    med_wall = {name: median(ts) for name, ts in wall.items()}
    speedup = med["full"] / med["capture"]
    overhead = med["capture"] / med["bare"] - 1
    text = model.config.text_config
    write_result("capture_throughput", {
        "model": {"class": type(model).__name__, "untrained": True, "seed": args.seed, "num_layers": NUM_LAYERS,
                  "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
                  "num_attention_heads": text.num_attention_heads, "num_key_value_heads": text.num_key_value_heads,
                  "vocab_size": text.vocab_size},
        "layers": LAYERS, "pooling": "mean", "batch": args.batch, "attended_tokens": tokens,
        "padded_shape": list(inputs["input_ids"].shape), "rounds": args.rounds,
        "cpu_s": cpu, "wall_s": wall, "median_cpu_s": med, "median_wall_s": med_wall,
        "stimuli_per_cpu_s": {n: args.batch / t for n, t in med.items()},
        "speedup_full_over_capture": speedup, "hook_overhead_vs_bare": overhead,
        "speedup_full_over_capture_wall": med_wall["full"] / med_wall["capture"],
        "hook_overhead_vs_bare_wall": med_wall["capture"] / med_wall["bare"] - 1,
        "headline_clock": "process CPU time, 1 torch thread", "goals": {"speedup_min": 1.3, "hook_overhead_max": 0.10},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    })
    for name in names:
        print(f"{name:<8} median {med[name] * 1000:7.1f} ms cpu ({med_wall[name] * 1000:7.1f} ms wall)  "
              f"{args.batch / med[name]:6.1f} stimuli per cpu-second")
    print(f"batch {args.batch}, padded {tuple(inputs['input_ids'].shape)}, hidden {text.hidden_size}, "
          f"{NUM_LAYERS} layers, vocab {text.vocab_size}, hooks at {LAYERS[0]}-{LAYERS[-1]}")
    print(f"hook overhead, capture vs bare stopped forward: {overhead * 100:+.1f}% (goal <= 10%)")
    print(f"capture throughput, stopped forward vs full forward with output_hidden_states: {speedup:.2f}x (goal >= 1.3x)")


if __name__ == "__main__":
    main()
