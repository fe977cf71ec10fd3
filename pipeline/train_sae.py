"""``daco train-sae``: per-token MLLM activations -> one dictionary-initialised TopK SAE per layer.

The run (docs/train-sae.md):

1. stimuli: the distinct images of a built output folder's ``stimuli/`` (default) or
   every record of the shards, read shard by shard with the build's shard reader;
2. the MLLM of the ``mllm:`` section, loaded and fed exactly as the activation stage
   does (``transforms.activations.load_mllm``, the adapter's ``build_inputs``);
3. the residual stream after each configured layer, per attended token (every one, or
   ``tokens_per_stimulus`` sampled), through one :class:`~steering.token_activations.ShuffleBuffer`
   shared by the layers;
4. one :class:`~steering.train.SAETrainer` per layer: atoms from the dictionary plus
   ``n_extra`` free atoms, AuxK, unit-norm decoder; activations scaled SAELens's
   ``expected_average_only_in`` way (factor sqrt(d_in) / mean ||x||, estimated on the
   first full buffer) and the factor folded into the saved weights;
5. progress, FVU / L0 / dead fraction every ``log_every`` steps, a checkpoint every
   ``checkpoint_every`` steps (at the next stimulus-batch boundary), ``--resume``;
6. OUT/layer_<l>/ (SAELens format + ``annotation.parquet``), OUT/training.json, OUT/README.md.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.config import load_config_file, section
from steering.config import Config
from transforms.activations import MLLMConfig, load_mllm
from transforms.config import DEVICE_PATTERN, resolve_device

CHECKPOINT = "checkpoint.pt"
SUMMARY = "training.json"
CARD = "README.md"
DEADLETTER = "deadletter.jsonl"
ANNOTATION = "annotation.parquet"
NORMALISATIONS = ("expected_average_only_in", "none")
INITS = ("dictionary", "random")


@dataclass
class SAEConfig(Config):
    """Options of ``daco train-sae`` (the ``sae:`` section of a config file or preset).

    Attributes:
        k: active latents per token (TopK).
        n_extra: free atoms (seeded random unit rows) after the concept atoms.
        init: "dictionary" (atom i = concept i's unit direction) or "random" (the same
            width, every atom random; the baseline of the paper's comparison).
        tokens_per_stimulus: tokens recorded per stimulus, drawn from its attended
            positions; None: every attended position.
        tokens: training tokens; None: one pass over the stimuli (more than one pass
            when ``tokens`` exceeds what a pass yields).
        shuffle_buffer: tokens held by the mixing buffer (memory: this x layers x d x 4 bytes).
        batch_size: tokens per optimiser step.
        lr: Adam learning rate.
        aux_coefficient, k_aux, dead_window: AuxK as in ``steering.train``.
        normalize_activations: "expected_average_only_in" (SAELens: scale by
            sqrt(d_in) / mean norm, folded into the saved weights) or "none".
        eta: cosine threshold of the atom annotation (docs/methods.md §3).
        log_every: steps between FVU / L0 / dead-fraction lines.
        checkpoint_every: steps between checkpoints.
        seed: token sampling, shuffling, free atoms and random init.
        device: "auto" (a GPU when present), "cpu", "cuda", "cuda:N".
    """

    k: int = 32
    n_extra: int = 0
    init: str = "dictionary"
    tokens_per_stimulus: int | None = None
    tokens: int | None = None
    shuffle_buffer: int = 65536
    batch_size: int = 4096
    lr: float = 1e-3
    aux_coefficient: float = 1 / 32
    k_aux: int | None = None
    dead_window: int | None = None
    normalize_activations: str = "expected_average_only_in"
    eta: float = 0.5
    log_every: int = 50
    checkpoint_every: int = 500
    seed: int = 0
    device: str = "auto"

    def validate(self, where: str) -> None:
        import re

        positive = {"k": self.k, "batch_size": self.batch_size, "log_every": self.log_every,
                    "checkpoint_every": self.checkpoint_every}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{where}.{name} must be >= 1, got {value}")
        for name in ("tokens_per_stimulus", "tokens", "k_aux", "dead_window"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{where}.{name} must be >= 1 or null, got {value}")
        if self.n_extra < 0:
            raise ValueError(f"{where}.n_extra must be >= 0, got {self.n_extra}")
        if self.shuffle_buffer < 2 * self.batch_size:
            raise ValueError(f"{where}.shuffle_buffer ({self.shuffle_buffer}) must be at least 2 x batch_size "
                             f"({2 * self.batch_size})")
        if self.init not in INITS:
            raise ValueError(f"{where}.init: {self.init!r} is not one of {INITS}")
        if self.normalize_activations not in NORMALISATIONS:
            raise ValueError(f"{where}.normalize_activations: {self.normalize_activations!r} is not one of {NORMALISATIONS}")
        if not -1.0 <= self.eta <= 1.0:
            raise ValueError(f"{where}.eta is a cosine threshold in [-1, 1], got {self.eta}")
        if not self.lr > 0:
            raise ValueError(f"{where}.lr must be > 0, got {self.lr}")
        if not re.fullmatch(DEVICE_PATTERN, self.device):
            raise ValueError(f"{where}.device: {self.device!r} is not auto, cpu, cuda or cuda:N")


def load_train_config(config: str | None, preset: str | None) -> tuple[MLLMConfig, SAEConfig, str]:
    """The ``mllm:`` and ``sae:`` sections of ``--config FILE`` or ``--preset NAME`` (default: the embedded default)."""
    from pipeline.build import preset_path

    if config and preset:
        raise SystemExit("give --config or --preset, not both")
    path = config or preset_path(preset or "default")
    data = load_config_file(path)
    return section(data, "mllm", MLLMConfig, path), section(data, "sae", SAEConfig, path), \
        f"config:{config}" if config else f"preset:{preset or 'default'}"


# --------------------------------------------------------------------------- stimuli

def stimulus_keys(dictionary_dir: str) -> set[str]:
    """The distinct image keys of a built output folder's ``stimuli/*.parquet``."""
    files = sorted(Path(dictionary_dir, "stimuli").glob("*.parquet"))
    if not files:
        raise SystemExit(f"daco train-sae: {dictionary_dir}/stimuli/ holds no parquet files; "
                         "pass --stimuli all to train on every shard record")
    return {k for f in files for k in pq.read_table(f, columns=["key"]).column("key").to_pylist()}


def iter_stimuli(pattern: str, keys: set[str] | None) -> Iterator[tuple[str, bytes, str] | dict]:
    """(key, image bytes, caption) of every good shard record (whose key is in ``keys`` when given),
    shard by shard in the reader's order, and a dead-letter dict for each bad record."""
    from transforms.shards import Dead, iter_shard, match_shards

    for path in match_shards(pattern):
        for item in iter_shard(path):
            if isinstance(item, Dead):
                yield {"key": item.key, "reason": item.reason, "detail": item.detail, "shard": path}
            elif keys is None or item["key"] in keys:
                yield item["key"], item["jpg"], item["caption"]


# --------------------------------------------------------------------------- state

class LayerTraining:
    """One :class:`~steering.train.SAETrainer` per layer, fed from one shuffle buffer of token rows
    ``[n, len(layers), d]``: :meth:`push` rows as they come, :meth:`finish` at the end of the data."""

    def __init__(self, saes: dict, cfg: SAEConfig, device: str):
        from steering.token_activations import ShuffleBuffer
        from steering.train import SAETrainer, TrainConfig

        self.layers, self.cfg = sorted(saes), cfg
        train = TrainConfig(lr=cfg.lr, batch_size=cfg.batch_size, k_aux=cfg.k_aux, aux_coefficient=cfg.aux_coefficient,
                            dead_window=cfg.dead_window, log_every=cfg.log_every)
        self.trainers = {layer: SAETrainer(saes[layer], train, device=device) for layer in self.layers}
        d = saes[self.layers[0]].d_in
        self.buffer = ShuffleBuffer(cfg.shuffle_buffer, cfg.batch_size, (len(self.layers), d), seed=cfg.seed)
        self.scale: list[float] | None = None
        self.tokens_trained = 0

    @property
    def step(self) -> int:
        """Optimiser steps taken (the same for every layer)."""
        return self.trainers[self.layers[0]].step

    def push(self, rows: torch.Tensor) -> bool:
        """Buffer ``rows`` and train on what the buffer gives out; False once ``cfg.tokens`` are trained."""
        while rows.shape[0]:
            rows = self.buffer.add(rows)
            if self.buffer.full and not self._train(final=False):
                return False
        return True

    def finish(self) -> None:
        """Train on everything still buffered (the end of a single pass)."""
        if self.buffer.count or self.buffer.pending.shape[0]:
            self._train(final=True)

    def _train(self, final: bool) -> bool:
        if self.scale is None:
            self.scale = self._estimate_scale()
        scale = torch.tensor(self.scale).reshape(1, -1, 1)
        for batch in self.buffer.drain(final=final):
            if self.cfg.tokens is not None:
                batch = batch[:self.cfg.tokens - self.tokens_trained]
            if not batch.shape[0]:
                return False
            batch = batch * scale
            for i, layer in enumerate(self.layers):
                entry = self.trainers[layer].train_step(batch[:, i])
                if entry is not None:
                    print(f"[train-sae] step {entry['step']} layer {layer}: fvu {entry['fvu']:.4f}  "
                          f"l0 {entry['l0']:.1f}  dead {entry['dead_fraction']:.3f}  aux {entry['aux_loss']:.4f}",
                          file=sys.stderr, flush=True)
            self.tokens_trained += batch.shape[0]
            if self.cfg.tokens is not None and self.tokens_trained >= self.cfg.tokens:
                return False
        return True

    def _estimate_scale(self) -> list[float]:
        """Per layer: sqrt(d) / mean token norm over the buffer (SAELens's expected_average_only_in), or 1."""
        if self.cfg.normalize_activations == "none":
            return [1.0] * len(self.layers)
        contents = self.buffer.contents()
        norms = contents.double().norm(dim=-1).mean(0)
        return [math.sqrt(contents.shape[-1]) / float(n) for n in norms]

    def state_dict(self) -> dict:
        return {"trainers": {layer: t.state_dict() for layer, t in self.trainers.items()},
                "buffer": self.buffer.state_dict(), "scale": self.scale, "tokens_trained": self.tokens_trained}

    def load_state_dict(self, state: dict) -> None:
        for layer, trainer in self.trainers.items():
            trainer.load_state_dict(state["trainers"][layer])
        self.buffer.load_state_dict(state["buffer"])
        self.scale, self.tokens_trained = state["scale"], int(state["tokens_trained"])


def initial_saes(dictionary, layers, cfg: SAEConfig) -> dict:
    """Per layer: the SAE training starts from (``cfg.init``: dictionary atoms + free atoms, or random)."""
    from steering.sae import SAE

    n = len(dictionary)
    k = min(cfg.k, n + cfg.n_extra)
    if cfg.init == "dictionary":
        return {layer: SAE.from_dictionary(dictionary.directions(layer), k=k, n_extra=cfg.n_extra, seed=cfg.seed,
                                           concept_ids=dictionary.concept_ids) for layer in layers}
    return {layer: SAE.random(dictionary.d, n + cfg.n_extra, k=k, seed=cfg.seed + layer) for layer in layers}


class Run:
    """The live state of one training run: model, stimulus position, sampler, counters, the layers' training."""

    def __init__(self, out: Path, dictionary, mllm: MLLMConfig, cfg: SAEConfig, shards: str,
                 keys: set[str] | None, source: str):
        self.out, self.dictionary, self.mllm, self.cfg = out, dictionary, mllm, cfg
        self.shards, self.keys, self.source = shards, keys, source
        self.layers = sorted(mllm.layers)
        self.loaded = load_mllm(mllm)
        hidden = self.loaded.model.get_input_embeddings().weight.shape[1]
        if hidden != dictionary.d:
            raise SystemExit(f"daco train-sae: the dictionary has d={dictionary.d} but the model has hidden size "
                             f"{hidden}; train on the model the dictionary was built from")
        self.training = LayerTraining(initial_saes(dictionary, self.layers, cfg), cfg, resolve_device(cfg.device))
        self.sampler = torch.Generator().manual_seed(cfg.seed)
        self.position = {"pass": 0, "records": 0}
        self.counts = {"stimuli": 0, "tokens_captured": 0, "deadletter_inference": 0, "deadletter_shards": 0,
                       "deadletter_missing_record": 0}
        self.deadletters: list[dict] = []
        self.last_checkpoint_step = 0
        self.seconds = 0.0

    @property
    def step(self) -> int:
        return self.training.step

    def fingerprint(self) -> dict:
        """What a resumed run must share with the checkpoint."""
        return {"mllm": dataclasses.asdict(self.mllm), "sae": dataclasses.asdict(self.cfg),
                "dictionary": self.dictionary.source, "shards": self.shards,
                "stimuli": "all" if self.keys is None else len(self.keys)}

    def state_dict(self) -> dict:
        return {"fingerprint": self.fingerprint(), "training": self.training.state_dict(),
                "sampler": self.sampler.get_state(), "position": dict(self.position), "counts": dict(self.counts),
                "deadletters": list(self.deadletters), "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        mine, theirs = self.fingerprint(), state["fingerprint"]
        if mine != theirs:
            differ = sorted(k for k in mine if mine[k] != theirs.get(k))
            raise SystemExit(f"daco train-sae --resume: {self.out / CHECKPOINT} was written with different settings "
                             f"({', '.join(differ)}); rerun with the same config, or drop --resume and pick a new --out")
        self.training.load_state_dict(state["training"])
        self.sampler.set_state(state["sampler"])
        self.position = dict(state["position"])
        self.counts, self.deadletters = dict(state["counts"]), list(state["deadletters"])
        self.seconds = float(state["seconds"])
        self.last_checkpoint_step = self.step

    def save_checkpoint(self) -> None:
        tmp = self.out / (CHECKPOINT + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, self.out / CHECKPOINT)
        self.last_checkpoint_step = self.step

    # ------------------------------------------------------------------ the loop
    def stimulus_batches(self) -> Iterator[list[tuple[str, bytes, str]]]:
        """Batches of ``mllm.batch_size`` stimuli from the saved position on, pass after pass."""
        while True:
            skip, batch, i, seen = self.position["records"], [], 0, set()
            for stimulus in iter_stimuli(self.shards, self.keys):
                if isinstance(stimulus, dict):  # a bad shard record: dead-lettered on the first pass
                    if i >= skip and self.position["pass"] == 0:
                        self.counts["deadletter_shards"] += 1
                        self.deadletters.append(stimulus)
                    continue
                seen.add(stimulus[0])
                i += 1
                if i <= skip:
                    continue
                batch.append(stimulus)
                if len(batch) == self.mllm.batch_size:
                    yield batch
                    batch = []
            if not i:
                raise SystemExit(f"daco train-sae: no stimulus found in {self.shards}"
                                 + ("" if self.keys is None else " among the dictionary's stimulus keys"))
            if batch:
                yield batch
            if self.position["pass"] == 0 and self.keys is not None:
                for key in sorted(self.keys - seen):
                    self.counts["deadletter_missing_record"] += 1
                    self.deadletters.append({"key": key, "reason": "missing_record",
                                             "detail": f"a stimulus of {self.dictionary.source} that no shard holds"})
            yield []  # the end of a pass
            self.position = {"pass": self.position["pass"] + 1, "records": 0}

    def tokens(self, batch: list[tuple[str, bytes, str]], capture) -> torch.Tensor:
        """The selected token rows of a stimulus batch; a batch that fails is retried one by one and a
        stimulus that still fails is dead-lettered."""
        from PIL import Image

        from steering.token_activations import select_tokens

        model, processor, adapter = self.loaded

        def run(items):
            images = []
            for _key, jpg, _caption in items:
                with Image.open(io.BytesIO(jpg)) as img:
                    images.append(img.convert("RGB"))
            inputs = adapter.build_inputs(processor, images, [c for _k, _j, c in items], self.mllm.prompt_template)
            inputs = inputs.to(model.device)
            return capture.run(inputs, select_tokens(inputs["attention_mask"], self.cfg.tokens_per_stimulus,
                                                     self.sampler))

        try:
            return run(batch)
        except Exception:  # noqa: BLE001 - find the stimulus at fault: retry one by one
            rows = []
            for item in batch:
                try:
                    rows.append(run([item]))
                except Exception as exc:  # noqa: BLE001 - this stimulus's failure, dead-lettered
                    self.counts["deadletter_inference"] += 1
                    self.deadletters.append({"key": item[0], "reason": "inference",
                                             "detail": f"{type(exc).__name__}: {exc}"[:2000]})
            return torch.cat(rows) if rows else torch.empty(0, len(self.layers), self.dictionary.d)


def train(run: Run, stop_after_steps: int | None = None) -> bool:
    """Stream stimuli through the model and the buffer into the trainers; True when training finished,
    False when stopped after ``stop_after_steps`` steps in this call (a checkpoint is written)."""
    from tqdm import tqdm

    from steering.token_activations import TokenCapture

    cfg = run.cfg
    total = math.ceil(cfg.tokens / cfg.batch_size) if cfg.tokens else None
    start_step = run.step
    bar = tqdm(total=total, initial=start_step, desc="train-sae", unit="step", file=sys.stderr,
               disable=None, leave=False)
    t0 = time.perf_counter()
    finished = False
    with TokenCapture(run.loaded.model, run.loaded.adapter, run.layers) as capture:
        for batch in run.stimulus_batches():
            if batch:
                rows = run.tokens(batch, capture)
                run.position["records"] += len(batch)
                run.counts["stimuli"] += len(batch)
                run.counts["tokens_captured"] += rows.shape[0]
                if not run.training.push(rows):
                    finished = True
                    break
            elif cfg.tokens is None:  # one pass: what is left in the buffer trains too
                run.training.finish()
                finished = True
                break
            bar.update(run.step - bar.n)
            if run.step - run.last_checkpoint_step >= cfg.checkpoint_every:
                run.save_checkpoint()
            if stop_after_steps is not None and run.step - start_step >= stop_after_steps:
                break
    bar.close()
    run.seconds += time.perf_counter() - t0
    if not finished:
        run.save_checkpoint()
    if run.step == 0:
        raise SystemExit("daco train-sae: no token reached the trainer (no stimulus ran); see the dead letters")
    return finished


# --------------------------------------------------------------------------- outputs

def fold_scale(sae, scale: float) -> None:
    """Fold the training-time input scaling ``x -> scale * x`` into ``sae`` so it takes raw activations.

    TopK and ReLU commute with a positive factor, so codes divided by ``scale`` give
    ``encode(x) = TopK((x - b_dec / s) @ W_enc + b_enc / s)`` and ``decode = c @ W_dec + b_dec / s``:
    the reconstruction is SAELens's fold (W_enc * s, W_dec / s, b_dec / s) exactly, with the
    decoder rows kept unit-norm and the codes in raw-activation units.
    """
    with torch.no_grad():
        sae.b_enc.div_(scale)
        sae.b_dec.div_(scale)


def write_outputs(run: Run, untrained: bool) -> dict:
    """OUT/layer_<l>/ (weights, cfg.json, annotation.parquet), OUT/training.json, OUT/README.md."""
    from steering.annotate import annotate

    dictionary = run.dictionary
    layers = {}
    for i, layer in enumerate(run.layers):
        trainer = run.training.trainers[layer]
        sae = trainer.sae.eval()
        summary = trainer.summary()
        fold_scale(sae, run.training.scale[i])
        sae.metadata.update({"layer": layer, "init": run.cfg.init, "untrained_model": untrained,
                             "activation_norm_scaling_factor": run.training.scale[i], "dictionary": dictionary.source,
                             "model": run.mllm.model_id or f"untrained:{run.mllm.family}"})
        folder = sae.cpu().save(run.out / f"layer_{layer}")
        notes = annotate(sae, dictionary, run.cfg.eta, layer)
        rows = notes.to_pylist()
        polarity = dict(zip(dictionary.concept_ids, dictionary.polarity))
        for row in rows:
            row["concept_polarity"] = polarity[row["nearest_concept"]]
        pq.write_table(pa.Table.from_pylist(rows), folder / ANNOTATION)
        layers[layer] = {**summary, "activation_norm_scaling_factor": run.training.scale[i],
                         "undesirable_atoms": len(notes.undesirable), "desirable_atoms": len(notes.desirable),
                         "history": trainer.history}
    counts = {**run.counts, "tokens_trained": run.training.tokens_trained}
    info = {"untrained": untrained, "model": run.mllm.model_id or f"untrained:{run.mllm.family}",
            "dictionary": dictionary.source, "config_source": run.source, "shards": run.shards,
            "stimuli": "all shard records" if run.keys is None else "the dictionary's stimuli",
            "mllm": dataclasses.asdict(run.mllm), "sae": dataclasses.asdict(run.cfg), "counts": counts,
            "tokens_per_s": counts["tokens_trained"] / run.seconds if run.seconds else None,
            "layers": {str(l): v for l, v in layers.items()}}
    (run.out / SUMMARY).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    (run.out / DEADLETTER).write_text("".join(json.dumps(d, sort_keys=True) + "\n" for d in run.deadletters))
    (run.out / CARD).write_text(sae_card(info, location=f"the local folder `{run.out}`"))
    return info


def sae_card(info: dict, location: str) -> str:
    """The SAE folder's card (markdown) from its training.json; ``location`` says where the SAEs are."""
    cfg = info["sae"]
    lines = ["# DACO dictionary-initialised TopK SAEs", ""]
    if info["untrained"]:
        lines += ["> **UNTRAINED MODEL.** These SAEs were trained on activations of a randomly initialised model: "
                  "they show the pipeline works and mean nothing.", ""]
    lines += [f"Where: {location}.", "",
              f"One SAE per decoder layer of `{info['model']}`, trained on its per-token residual stream over "
              f"{info['stimuli']} (dictionary `{info['dictionary']}`), in SAELens's format: `layer_<l>/cfg.json` + "
              "`layer_<l>/sae_weights.safetensors` (`sae_lens.SAE.load_from_disk`, or `steering.SAE.load`), and "
              "`layer_<l>/annotation.parquet`: each atom's label at eta, nearest concept and cosine.", "",
              f"Atoms: {'one per concept, initialised from its direction' if cfg['init'] == 'dictionary' else 'random'}"
              f", plus {cfg['n_extra']} free atoms; TopK k={cfg['k']}, AuxK (coefficient {cfg['aux_coefficient']:g}), "
              f"unit-norm decoder rows; activations normalised `{cfg['normalize_activations']}` (factor folded into "
              "the weights); annotation eta "
              f"{cfg['eta']}. Tokens trained: {info['counts']['tokens_trained']:,} from {info['counts']['stimuli']:,} "
              "stimuli.", "",
              "| layer | FVU | L0 | dead fraction | undesirable atoms | desirable atoms |", "| --- | --- | --- | --- | --- | --- |"]
    for layer, v in sorted(info["layers"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {layer} | {v['fvu']:.4f} | {v['l0']:.1f} | {v['dead_fraction']:.3f} | "
                     f"{v['undesirable_atoms']} | {v['desirable_atoms']} |")
    lines += ["", "Steer with it: `daco steer --method daco --sae DIR ...` or `daco eval --methods daco --sae DIR ...`.", ""]
    return "\n".join(lines)


def sae_folder_files(folder: str | os.PathLike) -> list[Path]:
    """The files of a finished ``daco train-sae`` folder to publish (relative paths), after checking that every
    ``layer_<l>/`` loads and has its annotation; a SystemExit naming the problem otherwise."""
    from steering.sae import SAE

    root = Path(folder)
    if (root / CHECKPOINT).exists():
        raise SystemExit(f"--sae {root}: {CHECKPOINT} is there, the training has not finished; "
                         "finish it with `daco train-sae ... --resume`")
    for name in (SUMMARY, CARD):
        if not (root / name).is_file():
            raise SystemExit(f"--sae {root}: {name} is missing; give a folder written by `daco train-sae`")
    layers = sorted(p for p in root.glob("layer_*") if p.is_dir())
    if not layers:
        raise SystemExit(f"--sae {root}: no layer_<l>/ folder")
    for layer in layers:
        try:
            SAE.load(layer)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--sae {layer}: {exc}") from None
        if not (layer / ANNOTATION).is_file():
            raise SystemExit(f"--sae {layer}: {ANNOTATION} is missing")
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def published_card(folder: str | os.PathLike, location: str) -> str:
    """The card of a train-sae folder, saying the SAEs are at ``location``."""
    return sae_card(json.loads(Path(folder, SUMMARY).read_text()), location)
