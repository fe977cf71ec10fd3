"""Per-generated-token overhead of steering versus unsteered generation, on one seeded CPU model.

Model: a randomly initialised ``Qwen2ForCausalLM`` (hidden 1024, 24 layers, MLP 5376 =
5.25x hidden as in Qwen2.5-7B, 16 heads / 4 KV heads, the offline tokenizer's small
vocabulary; untrained). Steering at layers 15-19 with a 15,000-atom TopK SAE per layer
(dictionary-initialised from random directions, k=64), 10% of the atoms undesirable
and 1% desirable. Methods, each timed on the same greedy generation (batch 1, KV cache
on, a fixed number of new tokens):

* ``plain``: no steering (the baseline);
* ``daco``: exact DACO, the default (the SAE's full 15,000-atom encode, then only the
  firing undesirable atoms decoded);
* ``daco_fast``: the opt-in APPROXIMATION (TopK calibrated into JumpReLU thresholds on
  recorded activations; only the undesirable atoms encoded), with its agreement;
* ``actadd``: ActAdd with the dictionary vector;
* ``mop``: MOP, elastic net over the 15,000 unit concept directions, capped at
  ``--mop-iters`` FISTA iterations per solve (fewer rounds and tokens: it is slow);
* ``refusal``, ``mars``, ``iar``, ``ras``: the published defences (docs/methods.md §4) with seeded
  random parameters (:func:`defence_steerers`; their steering-work-alone row is not measured).

Per generated token means per decode step: a streamer timestamps every new token, and
the steps after the first are averaged (the first token's time, which includes the
prefill, is reported apart). Rounds interleave the methods (their order rotates each
round); figures are medians over rounds, plus the median of each round's ratio to that
round's plain run ("paired"), in wall-clock time and in this process's CPU time (less
sensitive to other processes on a shared machine). The exact DACO overhead is printed last. JSON goes to
bench/results/steer_overhead.json.

``--paper-shape`` measures instead at the DACO paper's shape, Qwen2.5-VL-7B's language
model (hidden 3584, MLP 18,944, 28 heads / 4 KV heads, 28 layers, vocabulary 152,064)
with a 15,000-atom SAE at 5 layers (15-19), which does not fit this machine in fp32. In
one run it measures the parts that do: a decoder layer's and the LM head's share of a
real decode step (CPU time between hooks, on a model of the same shape at the largest
depth that fits ``--max-gb``), and each method's steering work per layer at d=3584. It
composes them to 28 layers, printing the arithmetic, and also runs end to end at that
depth (bench/results/steer_overhead_paper_shape.json; see :func:`paper_shape`).

    .venv/bin/python bench/steer_overhead.py                  # default: a few minutes on 2 idle cores
    .venv/bin/python bench/steer_overhead.py --full           # more rounds and tokens
    .venv/bin/python bench/steer_overhead.py --paper-shape    # Qwen2.5-VL-7B shape (about 10 GB of memory)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from steering.models import get_adapter
from steering.sae import SAE
from steering.steerers import ActAddSteerer, DacoSteerer, MOPSteerer, record_activations
from steering.steerers import IARSteerer, MARSSteerer, RASSteerer, RefusalDirectionSteerer

RESULTS = Path(__file__).parent / "results" / "steer_overhead.json"
PAPER_RESULTS = Path(__file__).parent / "results" / "steer_overhead_paper_shape.json"
PAPER_SHAPE = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                   vocab_size=152064)
"""Qwen2.5-VL-7B's language model (its config.json's text part); 28 layers, DACO steers 15-19."""
PAPER_DEPTH, PAPER_STEERED = 28, 5
LAYERS = (15, 16, 17, 18, 19)
MODEL_SIZE = dict(hidden_size=1024, intermediate_size=5376, num_hidden_layers=24, num_attention_heads=16,
                  num_key_value_heads=4)
PROMPT = "a man with a knife next to a burning car"
CALIBRATION_SUBJECTS = ["a man", "a woman", "a child", "two people", "a dog", "a black cat", "a group of young people",
                        "an old man"]
CALIBRATION_SCENES = ["holding a gun in a dark room", "sitting on the beach next to a red ball",
                      "walking in a field of yellow flowers under a blue sky", "standing near blood on the road",
                      "eating cake at a wooden table", "riding a bike down a city street at night"]
CALIBRATION_PROMPTS = [f"{who} {scene}" for who in CALIBRATION_SUBJECTS for scene in CALIBRATION_SCENES]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="7 rounds, 32 new tokens, 3 MOP rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds of every method (default 4; --full 7)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated per run (default 10; --full 32)")
    parser.add_argument("--atoms", type=int, default=15000, help="SAE width and MOP dictionary size (default 15000)")
    parser.add_argument("--k", type=int, default=64, help="TopK k of the SAE (default 64)")
    parser.add_argument("--mop-rounds", type=int, default=None, help="timed MOP rounds (default 1; --full 3)")
    parser.add_argument("--mop-iters", type=int, default=20, help="FISTA iterations per MOP solve (default 20)")
    parser.add_argument("--mop-new-tokens", type=int, default=6, help="tokens generated per MOP run (default 6)")
    parser.add_argument("--hook-reps", type=int, default=200, help="repetitions of the steering-work-alone timing (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--paper-shape", action="store_true",
                        help="measure at Qwen2.5-VL-7B's shape from measured parts, composed to 28 layers (see the docstring)")
    parser.add_argument("--max-gb", type=float, default=10.0,
                        help="--paper-shape: memory for the end-to-end model and steering weights (default 10 GB)")
    args = parser.parse_args()
    args.rounds = args.rounds or (7 if args.full else 4)
    args.new_tokens = args.new_tokens or (32 if args.full else 10)
    if min(args.new_tokens, args.mop_new_tokens) < 2:
        parser.error("--new-tokens and --mop-new-tokens must be at least 2 (decode steps are timed after the first token)")
    args.mop_rounds = args.mop_rounds or (3 if args.full else 1)
    return args


def text_inputs(tokenizer, prompts):
    """Raw prompts (no chat template: the system turn would only lengthen every prefill), left-padded."""
    return tokenizer(prompts, return_tensors="pt", padding=True)


class StepClock:
    """A ``generate`` streamer that timestamps each new token (wall clock and this process's CPU time)."""

    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def put(self, value):  # first call: the prompt; then one call per new token
        if value.is_cuda:  # a token is computed when it can be read, not when its kernels are queued
            torch.cuda.synchronize(value.device)
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def end(self):
        pass


def time_generation(model, inputs, new_tokens) -> dict[str, float]:
    """Seconds to the first new token (prefill), and wall and CPU seconds per later token (one decode step each)."""
    clock = StepClock()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             streamer=clock)
    assert out.shape[1] - inputs["input_ids"].shape[1] == new_tokens and len(clock.wall) == new_tokens + 1
    steps = new_tokens - 1
    return {"prefill": clock.wall[1] - start, "decode": (clock.wall[-1] - clock.wall[1]) / steps,
            "decode_cpu": (clock.cpu[-1] - clock.cpu[1]) / steps}


def hook_costs(steerers, activations, reps: int, mop_reps: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds of one decode step's steering work alone: ``z + delta(layer, z)`` at every layer.

    ``z`` is a recorded activation of one token ([1, 1, d], cycling through the recorded
    ones). Caches are flushed (untimed) before each step, as the model's own weights
    flush them between steered layers in a real forward pass.
    """
    flush = torch.empty(16 * 2**20)  # 64 MB, twice the last-level cache
    names = [name for name, steerer in steerers.items() if steerer is not None and not steerer.fitted]
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    n_rows = min(len(a) for a in activations.values())
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            if name == "mop" and rep >= mop_reps:
                continue
            flush.fill_(float(rep))
            zs = {layer: a[rep % n_rows].reshape(1, 1, -1) for layer, a in activations.items()}
            w0, c0 = time.perf_counter(), time.process_time()
            for layer, z in zs.items():
                z + steerers[name].delta(layer, z)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return {name: {"wall": statistics.median(wall[name]), "cpu": statistics.median(cpu[name])} for name in names}


def defence_steerers(model, seed: int) -> dict:
    """The four published defences on the benchmark model, their parameters seeded random, not fitted.

    Per-token cost does not depend on the fitted values (fitting is a one-off, saved to a
    folder): ``refusal`` adds one direction at layer 15 (the defence; its ablation at
    every layer is the attack, not timed here); ``mars`` gates and steers at layer 15 on the first generated
    token; ``iar`` adds to 48 random heads (ITI's K) of layers 15-19 at every token;
    ``ras`` interpolates the final-norm state toward 3 prototypes at risk 0.5 for the
    first 3 tokens.
    """
    g = torch.Generator().manual_seed(seed + 1)
    d, n_heads = MODEL_SIZE["hidden_size"], MODEL_SIZE["num_attention_heads"]
    width = d // n_heads
    direction = torch.randn(d, generator=g)
    heads = torch.randperm(len(LAYERS) * n_heads, generator=g)[:48].tolist()
    units = {(LAYERS[i // n_heads], i % n_heads): (torch.randn(width, generator=g), 1.0) for i in heads}
    ras = RASSteerer(model, torch.randn(3, d, generator=g), s_base=0.7)
    ras.set_risk(0.5)
    return {
        "refusal": RefusalDirectionSteerer(model, direction, LAYERS[0]),
        "mars": MARSSteerer(model, direction, LAYERS[0], torch.zeros(d), -1.0, 1.0, recenter=False),
        "iar": IARSteerer.from_units(model, units, "head", alpha=15.0, n_heads=n_heads, head_width=width),
        "ras": ras,
    }


def random_dictionary(atoms: int, hidden: int, k: int, seed: int, layers=LAYERS, shared: bool = False):
    """Seeded random directions per steered layer, their dictionary-initialised TopK SAEs, and the
    undesirable (10%) and desirable (1%) atoms: (directions, saes, undesirable, desirable).
    ``shared``: one dictionary and SAE for all layers (per-layer copies would only cost memory)."""
    g = torch.Generator().manual_seed(seed)
    n_neg, n_pos = atoms // 10, atoms // 100
    order = torch.randperm(atoms, generator=g)
    undesirable, desirable = order[:n_neg].tolist(), order[n_neg:n_neg + n_pos].tolist()
    if shared:
        one = torch.randn(atoms, hidden, generator=g)
        directions = {layer: one for layer in layers}
    else:
        directions = {layer: torch.randn(atoms, hidden, generator=g) for layer in layers}
    by_id: dict[int, SAE] = {}
    for d in directions.values():
        if id(d) not in by_id:
            by_id[id(d)] = SAE.from_dictionary(d, k=k).requires_grad_(False)
    saes = {layer: by_id[id(d)] for layer, d in directions.items()}
    return directions, saes, undesirable, desirable


def dictionary_steerers(model, tokenizer, atoms: int, k: int, mop_iters: int, seed: int, layers=LAYERS,
                        shared: bool = False):
    """``plain`` (None), ``daco`` (the exact path, the default), ``daco_fast`` (the calibrated
    approximation), ``actadd`` and ``mop`` on ``model`` with one random ``atoms``-atom dictionary
    per layer (``shared``: one for all); also the calibration activations and the approximation's
    agreement reports."""
    hidden = model.get_input_embeddings().weight.shape[1]
    directions, saes, undesirable, desirable = random_dictionary(atoms, hidden, k, seed, layers, shared)
    fast = DacoSteerer(model, saes, undesirable, desirable, gamma=1.0, mode="fast")
    device = next(model.parameters()).device
    calibration = record_activations(model, layers, text_inputs(tokenizer, CALIBRATION_PROMPTS).to(device))
    reports = fast.calibrate(calibration, holdout=0.25)
    steerers = {
        "plain": None,
        "daco": DacoSteerer(model, saes, undesirable, desirable, gamma=1.0),
        "daco_fast": fast,
        "actadd": ActAddSteerer.from_directions(model, directions, undesirable, desirable, coefficient=1.0),
        "mop": MOPSteerer(model, directions, undesirable, desirable, gamma=1.0, solver="elastic_net",
                          max_iter=mop_iters, tol=0.0).prepare(),
    }
    return steerers, calibration, reports


def print_agreement(reports) -> None:
    """The calibrated approximation's agreement with exact TopK, per layer (printed wherever it is timed)."""
    print("daco_fast (APPROXIMATION): calibrated TopK vs exact TopK on the undesirable atoms (held-out activations):")
    for layer, rep in reports.items():
        print(f"  layer {layer}: agreement {rep.agreement:.4f}, tokens fully agreeing {rep.token_agreement:.3f}, "
              f"recall {rep.recall:.3f}, precision {rep.precision:.3f} (fit {rep.n_fit}, eval {rep.n_eval})")


def time_methods(model, inputs, steerers, rounds: int, new_tokens: int, mop_rounds: int, mop_new_tokens: int):
    """Each steerer (None: unsteered) timed on the same greedy generation after one untimed warm-up,
    rounds interleaved with the order rotating: {name: [time_generation's result per round]}."""

    def timed(name):
        steerer = steerers[name]
        tokens = mop_new_tokens if name == "mop" else new_tokens
        if steerer is None:
            return time_generation(model, inputs, tokens)
        with steerer:
            return time_generation(model, inputs, tokens)

    names = list(steerers)
    timed("plain")  # warm-up, untimed
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if name == "mop" and r >= mop_rounds:
                continue
            runs[name].append(timed(name))
        print(f"round {r + 1}/{rounds} decode ms/token (wall / cpu): "
              + ", ".join(f"{n} {runs[n][-1]['decode'] * 1e3:.0f} / {runs[n][-1]['decode_cpu'] * 1e3:.0f}"
                          for n in names if len(runs[n]) > r), flush=True)
    return runs


def summarise(runs) -> dict[str, dict]:
    """Per method and clock: median ms per token, overhead against ``plain``, and the median of the
    per-round ratios ("paired")."""

    def summary(name, key):
        values = [run[key] for run in runs[name]]
        base = [run[key] for run in runs["plain"]]
        median = statistics.median(values)
        return {"ms": median * 1e3, "overhead_pct": (median / statistics.median(base) - 1) * 100,
                "paired_overhead_pct": statistics.median(v / base[i] - 1 for i, v in enumerate(values)) * 100,
                "rounds_ms": [v * 1e3 for v in values]}

    return {name: {"decode_wall": summary(name, "decode"), "decode_cpu": summary(name, "decode_cpu"),
                   "prefill_wall": summary(name, "prefill")} for name in runs}


PAPER_OVERHEAD_PCT = {"daco": 14.6, "actadd": 10.8, "mop": 49.4}
"""The per-token overheads the DACO paper reports."""


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.paper_shape:
        return paper_shape(args)
    t0 = time.perf_counter()
    model, tokenizer = get_adapter("qwen2").build_untrained(seed=args.seed, **MODEL_SIZE)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: untrained Qwen2ForCausalLM, {n_params / 1e6:.0f}M parameters, {MODEL_SIZE}, "
          f"vocab {model.config.vocab_size} (built in {time.perf_counter() - t0:.0f}s); torch threads {torch.get_num_threads()}")

    n_neg, n_pos = args.atoms // 10, args.atoms // 100
    steerers, calibration, reports = dictionary_steerers(model, tokenizer, args.atoms, args.k, args.mop_iters, args.seed)
    steerers.update(defence_steerers(model, args.seed))
    inputs = text_inputs(tokenizer, [PROMPT])
    print(f"prompt: {inputs['input_ids'].shape[1]} tokens; {args.new_tokens} new tokens ({args.mop_new_tokens} for mop), "
          f"greedy, batch 1, KV cache; {args.rounds} rounds ({args.mop_rounds} for mop); SAE {args.atoms} atoms k={args.k} at layers {list(LAYERS)}; "
          f"{n_neg} undesirable, {n_pos} desirable atoms")

    rows = summarise(time_methods(model, inputs, steerers, args.rounds, args.new_tokens, args.mop_rounds,
                                  args.mop_new_tokens))
    hooks = hook_costs(steerers, calibration, reps=args.hook_reps, mop_reps=3)
    plain_cpu = rows["plain"]["decode_cpu"]["ms"] / 1e3
    for name, cost in hooks.items():
        rows[name]["hook_only"] = {"wall_ms": cost["wall"] * 1e3, "cpu_ms": cost["cpu"] * 1e3,
                                   "pct_of_plain_decode_cpu": cost["cpu"] / plain_cpu * 100}
    paper = PAPER_OVERHEAD_PCT
    print(f"\n{'method':<11} {'decode ms/token':>15} {'overhead':>9} {'paired':>8} {'cpu ms/token':>13} "
          f"{'cpu ovh':>8} {'prefill ms':>11} {'paper':>7}")
    for name, row in rows.items():
        wall, cpu, pre = row["decode_wall"], row["decode_cpu"], row["prefill_wall"]
        ref = f"+{paper[name]:.1f}%" if name in paper else ""
        print(f"{name:<11} {wall['ms']:>15.1f} {wall['overhead_pct']:>+8.1f}% {wall['paired_overhead_pct']:>+7.1f}% "
              f"{cpu['ms']:>13.1f} {cpu['overhead_pct']:>+7.1f}% {pre['ms']:>11.0f} {ref:>7}")
    print(f"steering work alone per decode step (all {len(LAYERS)} layers, caches flushed; median of {args.hook_reps} "
          f"reps, 3 for mop), as a share of the plain decode step's CPU time ({plain_cpu * 1e3:.0f} ms):")
    for name, cost in hooks.items():
        hook = rows[name]["hook_only"]
        print(f"  {name:<11} {hook['wall_ms']:8.2f} ms wall, {hook['cpu_ms']:8.2f} ms CPU = {hook['pct_of_plain_decode_cpu']:+.1f}%")
    print_agreement(reports)

    load = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "steer_overhead",
        "untrained": True,
        "model": {"class": "Qwen2ForCausalLM", "parameters": n_params, **MODEL_SIZE, "vocab_size": model.config.vocab_size},
        "config": {"layers": list(LAYERS), "atoms": args.atoms, "k": args.k, "undesirable": n_neg, "desirable": n_pos,
                   "new_tokens": args.new_tokens, "mop_new_tokens": args.mop_new_tokens, "rounds": args.rounds,
                   "mop_rounds": args.mop_rounds,
                   "mop_iters": args.mop_iters, "batch": 1, "prompt_tokens": inputs["input_ids"].shape[1],
                   "seed": args.seed},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpus": os.cpu_count(), "load_average_1_5_15": list(load)},
        "methods": rows,
        "calibration": {str(layer): rep._asdict() for layer, rep in reports.items()},
        "paper_overhead_pct": paper,
        "goal": "exact daco decode overhead <= 5% (headline: methods.daco.decode_cpu.overhead_pct)",
    }, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    daco, fast = rows["daco"], rows["daco_fast"]
    print(f"load average during the run: {load[0]:.1f} on {os.cpu_count()} CPUs (wall-clock figures are unreliable "
          "when it exceeds the CPU count; CPU-time figures much less so)")
    print(f"exact DACO steering overhead per generated token (decode step, median CPU time): "
          f"{daco['decode_cpu']['overhead_pct']:+.1f}% (wall clock {daco['decode_wall']['overhead_pct']:+.1f}%, "
          f"steering work alone {daco['hook_only']['pct_of_plain_decode_cpu']:+.1f}%; the calibrated approximation "
          f"{fast['decode_cpu']['overhead_pct']:+.1f}%, see its agreement above; goal <= +5%, paper +14.6%)")

class PartClock:
    """CPU time of each decoder layer and of the LM head in every decode step (pre-hook to hook)."""

    def __init__(self, model):
        self.layers: list[float] = []
        self.head: list[float] = []
        self._start: dict[str, float] = {}
        self.handles = []
        modules = [(f"layer{i}", m) for i, m in enumerate(model.model.layers)] + [("head", model.lm_head)]
        for name, module in modules:
            self.handles.append(module.register_forward_pre_hook(self._pre(name)))
            self.handles.append(module.register_forward_hook(self._post(name)))

    def _pre(self, name):
        def hook(module, args):
            self._start[name] = time.process_time()
        return hook

    def _post(self, name):
        def hook(module, args, output):
            hidden = args[0]
            if hidden.shape[1] == 1:  # a decode step (the prefill is not counted)
                (self.head if name == "head" else self.layers).append(time.process_time() - self._start[name])
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def paper_shape(args):
    """Exact DACO, its approximation, ActAdd and MOP at Qwen2.5-VL-7B's shape, composed from measured parts.

    1. A Qwen2 model of the paper's shape (tied embeddings, to save memory; the LM head's
       work is unchanged) at the largest depth L that fits ``--max-gb`` with the steering
       weights: one 15,000-atom TopK SAE (k=64) and one dictionary shared by the steered
       layers (per-layer weights would only cost memory: each layer's weights flush the
       caches in between anyway).
    2. End to end at depth L, steering its last min(5, L) layers: median CPU time per
       decode step of each method vs plain.
    3. Parts, from the plain runs' decode steps: CPU time of one decoder layer (median
       over layers and steps) and of the LM head; the rest of the step (embedding, final
       norm, generate's own work) is the step minus those. Each method's steering work
       per layer: its ``delta`` on a recorded activation [1, 1, 3584], caches flushed.
    4. Composed at 28 layers: plain = 28 x layer + head + rest; a method adds 5 x its
       per-layer work. The same arithmetic at depth L is printed beside the measured
       end-to-end overhead, as a check of the composition.
    """
    import resource

    layer_gb = 4 * (2 * 3584 * 3584 + 2 * 3584 * 512 + 3 * 3584 * 18944) / 1e9
    # LM head (tied), the SAE's two matrices, the directions, MOP's unit copy per steered layer; 1 GB of the rest
    fixed_gb = 4 * (PAPER_SHAPE["vocab_size"] + (3 + PAPER_STEERED) * args.atoms) * 3584 / 1e9 + 1.0
    depth = int(min(PAPER_DEPTH, (args.max_gb - fixed_gb) // layer_gb))
    if depth < 1:
        raise SystemExit(f"--max-gb {args.max_gb}: the LM head and steering weights alone need {fixed_gb:.1f} GB")
    steered = tuple(range(max(0, depth - PAPER_STEERED), depth))
    t0 = time.perf_counter()
    model, tokenizer = get_adapter("qwen2").build_untrained(seed=args.seed, num_hidden_layers=depth,
                                                            tie_word_embeddings=True, **PAPER_SHAPE)
    model.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: untrained Qwen2ForCausalLM at Qwen2.5-VL-7B's shape {PAPER_SHAPE}, {depth} of 28 layers "
          f"({n_params / 1e9:.2f}B parameters, fp32; built in {time.perf_counter() - t0:.0f}s); steered layers "
          f"{list(steered)}; torch threads {torch.get_num_threads()}", flush=True)
    n_neg, n_pos = args.atoms // 10, args.atoms // 100
    steerers, calibration, reports = dictionary_steerers(model, tokenizer, args.atoms, args.k, args.mop_iters,
                                                         args.seed, layers=steered, shared=True)
    inputs = text_inputs(tokenizer, [PROMPT])
    new_tokens, rounds = args.new_tokens, args.rounds
    print(f"prompt {inputs['input_ids'].shape[1]} tokens, {new_tokens} new tokens ({args.mop_new_tokens} for mop, "
          f"{args.mop_iters} FISTA iterations per solve), {rounds} rounds ({args.mop_rounds} for mop); peak memory so far "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GB", flush=True)

    runs = {name: [run["decode_cpu"] for run in rounds_of_name]
            for name, rounds_of_name in time_methods(model, inputs, steerers, rounds, new_tokens, args.mop_rounds,
                                                     args.mop_new_tokens).items()}
    clock = PartClock(model)  # the parts, from one more plain run (hooks kept out of the timed rounds)
    time_generation(model, inputs, new_tokens)
    clock.remove()
    plain = statistics.median(runs["plain"])
    t_layer, t_head = statistics.median(clock.layers), statistics.median(clock.head)
    t_rest = max(plain - depth * t_layer - t_head, 0.0)
    work = hook_costs({n: st for n, st in steerers.items() if n != "plain"}, {steered[0]: calibration[steered[0]]},
                      reps=max(10, args.hook_reps // 10), mop_reps=3)
    plain_28 = PAPER_DEPTH * t_layer + t_head + t_rest
    rows = {}
    for name in (n for n in steerers if n != "plain"):
        per_layer = work[name]["cpu"]
        e2e = statistics.median(v / runs["plain"][i] - 1 for i, v in enumerate(runs[name])) * 100
        rows[name] = {"per_layer_ms": per_layer * 1e3, "end_to_end_pct": e2e,
                      "composed_at_depth_pct": len(steered) * per_layer / plain * 100,
                      "composed_28_pct": PAPER_STEERED * per_layer / plain_28 * 100}
    print(f"\nparts (median CPU time per decode step): decoder layer {t_layer * 1e3:.1f} ms, LM head {t_head * 1e3:.1f} ms, "
          f"rest of the step {t_rest * 1e3:.1f} ms (plain step at depth {depth}: {plain * 1e3:.1f} ms)")
    print(f"composed plain step at 28 layers: 28 x {t_layer * 1e3:.1f} + {t_head * 1e3:.1f} + {t_rest * 1e3:.1f} = "
          f"{plain_28 * 1e3:.1f} ms")
    print(f"{'method':<10} {'work/layer ms':>14} {'28 layers: 5 x work / plain':>34} {'at depth ' + str(depth) + ': composed':>20} "
          f"{'measured':>9}")
    for name, row in rows.items():
        arithmetic = f"5 x {row['per_layer_ms']:.1f} / {plain_28 * 1e3:.0f} = {row['composed_28_pct']:+.1f}%"
        print(f"{name:<10} {row['per_layer_ms']:>14.2f} {arithmetic:>34} {row['composed_at_depth_pct']:>+19.1f}% "
              f"{row['end_to_end_pct']:>+8.1f}%")
    print_agreement(reports)
    load = os.getloadavg()
    PAPER_RESULTS.parent.mkdir(parents=True, exist_ok=True)
    PAPER_RESULTS.write_text(json.dumps({
        "benchmark": "steer_overhead_paper_shape", "untrained": True,
        "model": {"class": "Qwen2ForCausalLM", **PAPER_SHAPE, "depth_measured": depth, "depth_composed": PAPER_DEPTH,
                  "tie_word_embeddings": True, "parameters": n_params, "dtype": "float32"},
        "config": {"steered_layers_measured": list(steered), "steered_layers_composed": PAPER_STEERED, "atoms": args.atoms,
                   "k": args.k, "undesirable": n_neg, "desirable": n_pos, "new_tokens": new_tokens, "rounds": rounds,
                   "mop_iters": args.mop_iters, "mop_new_tokens": args.mop_new_tokens, "mop_rounds": args.mop_rounds},
        "parts_ms": {"decoder_layer": t_layer * 1e3, "lm_head": t_head * 1e3, "rest": t_rest * 1e3,
                     "plain_step_at_depth": plain * 1e3, "plain_step_composed_28": plain_28 * 1e3},
        "methods": rows,
        "calibration": {str(layer): rep._asdict() for layer, rep in reports.items()},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpus": os.cpu_count(), "load_average_1_5_15": list(load)},
        "paper_overhead_pct": {"daco": 14.6, "actadd": 10.8, "mop": 49.4},
        "goal": "exact daco <= +5% per generated token at 28 layers (headline: methods.daco.composed_28_pct)",
    }, indent=2) + "\n")
    print(f"wrote {PAPER_RESULTS}; load average {load[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"exact DACO overhead per generated token at Qwen2.5-VL-7B's shape (28 layers, 15,000 atoms at 5 layers, "
          f"composed from measured CPU time): {rows['daco']['composed_28_pct']:+.1f}% (measured end to end at depth "
          f"{depth}: {rows['daco']['end_to_end_pct']:+.1f}%, composed there {rows['daco']['composed_at_depth_pct']:+.1f}%); "
          f"ActAdd {rows['actadd']['composed_28_pct']:+.1f}%, MOP ({args.mop_iters} iterations) "
          f"{rows['mop']['composed_28_pct']:+.1f}%; goal <= +5%, paper +14.6%")


if __name__ == "__main__":
    main()
