"""Training an :class:`~steering.sae.SAE` on activations (docs/methods.md §3).

Loss per batch: the batch's fraction of variance unexplained,
``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` (scale-free, so learning rates
carry over between models), plus

* TopK: the AuxK loss of Gao et al. 2024 (``dead_latent_remedy="auxk"``): the
  ``k_aux`` dead latents with the largest pre-activations reconstruct the main
  reconstruction's residual e, ``aux_coefficient * ||e - e_hat||^2 / ||e||^2``
  (Gao et al.: coefficient 1/32, k_aux about d_in/2);
* ReLU: ``l1_coefficient * mean ||c||_1 / rms(x - mean(x))`` (normalised the same way).

``dead_latent_remedy="resample"`` instead re-initialises dead atoms every
``resample_every`` steps towards the worst-reconstructed inputs of the batch
(Anthropic's resampling), and resets their optimiser state.

Decoder rows are kept unit-norm (the gradient component along each row is
removed before the step and rows are renormalised after it), so the
dictionary-initialised atoms stay comparable to the concept directions.
A latent is *dead* when it has not fired on any of the last ``dead_window``
activations (default 20 batches).

The decoder uses ``torch.nn.functional.embedding_bag`` over the k active atoms
(TopK), so decoding and its gradient cost O(k d) per activation instead of O(d_sae d).
"""

from __future__ import annotations

import collections
import dataclasses
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from tqdm import tqdm

from steering.sae import SAE

REMEDIES = ("auxk", "resample", "none")


class TrainResult(NamedTuple):
    """What :func:`train_sae` reports."""

    fvu: float
    """Fraction of variance unexplained over the last ``window`` training batches (before each update)."""
    l0: float
    """Mean number of active latents per activation over the same batches."""
    dead_fraction: float
    """Share of latents that did not fire on the last ``dead_window`` activations at the end."""
    steps: int
    """Optimiser steps taken."""
    activations_per_s: float
    """Training throughput: activations consumed per second of the training loop (data loading included)."""
    history: list
    """One dict per logged step: step, loss, fvu, aux_loss, l0, dead_fraction, lr."""


# --------------------------------------------------------------------------- data

def _as_2d_tensor(batch, where: str = "activations") -> torch.Tensor:
    t = torch.as_tensor(np.asarray(batch)) if not isinstance(batch, torch.Tensor) else batch
    if t.ndim != 2:
        raise ValueError(f"{where}: expected a [batch, d] array, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{where}: expected floating-point activations, got {t.dtype}")
    return t


def rebatch(batches: Iterable, batch_size: int) -> Iterator[torch.Tensor]:
    """Re-cut an iterable of [b, d] arrays/tensors into [batch_size, d] tensors (the last may be smaller)."""
    pending: list[torch.Tensor] = []
    have = 0
    for batch in batches:
        t = _as_2d_tensor(batch)
        while t.shape[0]:
            take = min(batch_size - have, t.shape[0])
            pending.append(t[:take])
            have += take
            t = t[take:]
            if have == batch_size:
                yield pending[0] if len(pending) == 1 else torch.cat(pending)
                pending, have = [], 0
    if have:
        yield torch.cat(pending)


def _expand_paths(paths) -> list[Path]:
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted([*p.glob("*.npy"), *p.glob("*.parquet")])
            if not found:
                raise FileNotFoundError(f"{p} holds no *.npy or *.parquet activation files")
            files.extend(found)
        elif p.is_file():
            if p.suffix not in (".npy", ".parquet"):
                raise ValueError(f"{p}: activation files must be .npy or .parquet")
            files.append(p)
        else:
            raise FileNotFoundError(f"activation file or folder {p} does not exist")
    return files


def _parquet_vectors(path: Path, column: str | None) -> Iterator[np.ndarray]:
    pf = pq.ParquetFile(path)
    schema = pf.schema_arrow
    if column is None:
        candidates = [f.name for f in schema if (pa.types.is_fixed_size_list(f.type) or pa.types.is_list(f.type))
                      and pa.types.is_floating(f.type.value_type)]
        if len(candidates) != 1:
            raise ValueError(f"{path}: cannot tell which column holds the activations (list-of-float columns: "
                             f"{candidates}); pass column=...")
        column = candidates[0]
    elif column not in schema.names:
        raise ValueError(f"{path}: no column {column!r}; columns: {schema.names}")
    for rb in pf.iter_batches(columns=[column]):
        arr = rb.column(0)
        if arr.null_count:
            raise ValueError(f"{path}: column {column!r} has null rows")
        if len(arr) == 0:
            continue
        values = np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
        if values.size % len(arr) or not (pa.types.is_fixed_size_list(arr.type)
                                          or len(np.unique(np.asarray(arr.value_lengths()))) == 1):
            raise ValueError(f"{path}: rows of column {column!r} have different lengths")
        yield values.reshape(len(arr), values.size // len(arr))


def iterate_activation_files(paths, batch_size: int, column: str | None = None) -> Iterator[torch.Tensor]:
    """Float32 [batch_size, d] tensors from .npy ([n, d], no pickles) and/or .parquet files.

    ``paths`` is a file, a folder (its *.npy and *.parquet files, sorted) or a list of
    them. A parquet file's activations are its one list-of-float column, or ``column``.
    """
    files = _expand_paths(paths)

    def arrays() -> Iterator[np.ndarray]:
        d = None
        for f in files:
            chunks = [np.load(f, mmap_mode="r", allow_pickle=False)] if f.suffix == ".npy" \
                else _parquet_vectors(f, column)
            for chunk in chunks:
                if chunk.ndim != 2:
                    raise ValueError(f"{f}: expected a 2-D [n, d] array, got shape {chunk.shape}")
                if d is None:
                    d = chunk.shape[1]
                elif chunk.shape[1] != d:
                    raise ValueError(f"{f}: activations have dimension {chunk.shape[1]}, earlier files {d}")
                for start in range(0, chunk.shape[0], 65536):
                    yield np.array(chunk[start:start + 65536], dtype=np.float32)  # a writable copy

    return rebatch(arrays(), batch_size)


def _epochs(activations, batch_size: int, column: str | None) -> Iterator[Iterator[torch.Tensor]]:
    """One batch iterator per pass over the data (a one-shot iterator gives a single pass)."""
    if isinstance(activations, (str, Path)) or (isinstance(activations, (list, tuple)) and activations
                                                 and all(isinstance(a, (str, Path)) for a in activations)):
        _expand_paths(activations)  # fail early on bad paths
        while True:
            yield iterate_activation_files(activations, batch_size, column)
    elif isinstance(activations, (torch.Tensor, np.ndarray)):
        data = _as_2d_tensor(activations)
        while True:
            yield iter(data.split(batch_size))
    elif iter(activations) is activations:  # a generator or other one-shot iterator
        yield rebatch(activations, batch_size)
    else:
        while True:
            yield rebatch(activations, batch_size)


# --------------------------------------------------------------------------- training

class _TopKStep(NamedTuple):
    recon: torch.Tensor
    pre: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor


def _forward_topk(sae: SAE, x: torch.Tensor) -> _TopKStep:
    pre = sae.pre_acts(x)
    values, indices = pre.topk(sae.k, dim=-1, sorted=False)
    values = values.relu()
    recon = F.embedding_bag(indices, sae.W_dec, per_sample_weights=values, mode="sum") + sae.b_dec
    return _TopKStep(recon, pre, values, indices)


def _auxk_loss(sae: SAE, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor, k_aux: int) -> torch.Tensor:
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    k = min(k_aux, n_dead)
    values, indices = pre.masked_fill(~dead, float("-inf")).topk(k, dim=-1, sorted=False)
    # raw pre-activations (no ReLU, as SAELens and sparsify): latents pushed below zero still get a gradient
    e_hat = F.embedding_bag(indices, sae.W_dec, per_sample_weights=values, mode="sum")
    return (e_hat - residual).pow(2).sum() / residual.pow(2).sum().clamp_min(1e-12)


@torch.no_grad()
def _project_decoder_grad(sae: SAE) -> None:
    """Remove each decoder row's gradient component along the row (rows stay on the unit sphere)."""
    g = sae.W_dec.grad
    if g is not None:
        g -= (g * sae.W_dec).sum(-1, keepdim=True) * sae.W_dec


@torch.no_grad()
def _normalise_decoder(sae: SAE) -> None:
    sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def _resample_dead(sae: SAE, opt: torch.optim.Optimizer, x: torch.Tensor, recon: torch.Tensor,
                   dead: torch.Tensor) -> int:
    """Point dead atoms at the worst-reconstructed inputs; returns how many were resampled."""
    idx = torch.nonzero(dead).reshape(-1)
    if idx.numel() == 0:
        return 0
    err = (x - recon).float()
    worst = err.pow(2).sum(-1).topk(min(idx.numel(), err.shape[0])).indices
    idx = idx[: worst.numel()]
    new = err[worst] / err[worst].norm(dim=-1, keepdim=True).clamp_min(1e-12)
    alive = ~dead
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if bool(alive.any()) else torch.tensor(1.0)
    sae.W_dec[idx] = new.to(sae.W_dec.dtype)
    sae.W_enc[:, idx] = (new.T * 0.2 * enc_norm).to(sae.W_enc.dtype)
    sae.b_enc[idx] = 0.0
    for p, sl in ((sae.W_dec, (idx,)), (sae.W_enc, (slice(None), idx)), (sae.b_enc, (idx,))):
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][sl] = 0.0
    return int(idx.numel())


@dataclasses.dataclass
class TrainConfig:
    """How an SAE is optimised (:class:`SAETrainer`, :func:`train_sae`); the loss is in the module docstring."""

    lr: float = 1e-3
    """Adam learning rate (the loss is scale-free)."""
    batch_size: int = 4096
    """Activations per optimiser step."""
    dead_latent_remedy: str | None = None
    """``"auxk"`` (TopK only), ``"resample"`` or ``"none"``; None: ``"auxk"`` for TopK, ``"resample"`` for ReLU."""
    k_aux: int | None = None
    """Dead latents AuxK reconstructs the residual with (None: ``d_in // 2``)."""
    aux_coefficient: float = 1 / 32
    """Weight of the AuxK loss (Gao et al.: 1/32)."""
    dead_window: int | None = None
    """Activations without firing after which a latent is dead (None: 20 batches)."""
    resample_every: int = 500
    """Steps between resamplings (remedy ``"resample"``)."""
    normalise_decoder: bool = True
    """Keep the decoder rows unit-norm."""
    init_b_dec: bool = True
    """Set ``b_dec`` to the mean of the first batch before training."""
    window: int | None = None
    """Batches over which the final fvu / l0 are averaged (None: the last 10% of :func:`train_sae`'s
    ``steps``, at least 1; 10 when training by epochs or stepping an :class:`SAETrainer` directly)."""
    log_every: int = 50
    """Steps between history entries and progress-bar updates."""


class SAETrainer:
    """One SAE's optimiser, dead-latent bookkeeping and running metrics, stepped one batch at a time.

    :func:`train_sae` drives one; ``daco train-sae`` drives one per layer from a shared
    token stream. :meth:`state_dict` / :meth:`load_state_dict` hold everything a step
    depends on (weights, Adam moments, firing counters, the metric window, the history),
    so a run restored from a checkpoint continues bit for bit. ``device``: where to train
    (default: the SAE's device).
    """

    def __init__(self, sae: SAE, config: TrainConfig | None = None, device: str | torch.device | None = None):
        config = config or TrainConfig()
        lr, batch_size, k_aux, dead_window = config.lr, config.batch_size, config.k_aux, config.dead_window
        normalise_decoder, dead_latent_remedy = config.normalise_decoder, config.dead_latent_remedy
        if dead_latent_remedy is None:
            dead_latent_remedy = "auxk" if sae.activation == "topk" else "resample"
        if dead_latent_remedy not in REMEDIES:
            raise ValueError(f"dead_latent_remedy must be one of {REMEDIES}, got {dead_latent_remedy!r}")
        if dead_latent_remedy == "auxk" and sae.activation != "topk":
            raise ValueError("dead_latent_remedy='auxk' needs a TopK SAE; use 'resample' for ReLU")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device) if device is not None else sae.W_enc.device
        self.sae = sae.to(self.device).train()
        self.lr = lr
        self.remedy = dead_latent_remedy
        self.k_aux = k_aux or max(1, sae.d_in // 2)
        self.aux_coefficient = config.aux_coefficient
        self.dead_window = dead_window or 20 * batch_size
        self.resample_every = config.resample_every
        self.normalise_decoder = normalise_decoder
        self.init_b_dec = config.init_b_dec
        self.log_every = config.log_every
        self.opt = torch.optim.Adam(sae.parameters(), lr=lr)
        if normalise_decoder:
            _normalise_decoder(sae)
        self.since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=self.device)
        self.recent: collections.deque = collections.deque(maxlen=max(1, config.window or 10))
        self.history: list[dict] = []
        self.step = 0
        self.seen = 0

    def dead(self) -> torch.Tensor:
        """Latents that have not fired on the last ``dead_window`` activations (or on any, early on)."""
        return self.since_fired >= min(self.dead_window, max(self.seen, 1))

    def train_step(self, batch, log: bool = False) -> dict | None:
        """One optimiser step on a [b, d_in] batch; the history entry when this step logged one
        (every ``log_every`` steps, or when ``log``), else None."""
        sae = self.sae
        x = _as_2d_tensor(batch).to(device=self.device, dtype=sae.W_enc.dtype, non_blocking=True)
        if x.shape[1] != sae.d_in:
            raise ValueError(f"activations have dimension {x.shape[1]}, the SAE expects d_in={sae.d_in}")
        if self.step == 0 and self.init_b_dec:
            with torch.no_grad():
                sae.b_dec.copy_(x.mean(0))
        centred_ss = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
        aux = x.new_zeros(())
        if sae.activation == "topk":
            out = _forward_topk(sae, x)
            recon, active = out.recon, out.values > 0
            fired_idx = out.indices[active]
            l0_sum = float(active.sum())
        else:
            codes = sae.encode(x)
            recon = sae.decode(codes)
            fired_idx = torch.nonzero(codes.detach().sum(0) > 0).reshape(-1)
            l0_sum = float((codes > 0).sum())
            aux = sae.l1_coefficient * codes.sum(-1).mean() / (centred_ss / x.shape[0]).sqrt()
        sq_err = (recon - x).pow(2).sum()
        fvu = sq_err / centred_ss
        if sae.activation == "topk" and self.remedy == "auxk" and self.step > 0:
            aux = self.aux_coefficient * _auxk_loss(sae, out.pre, (x - recon).detach(), self.dead(), self.k_aux)
        loss = fvu + aux
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.normalise_decoder:
            _project_decoder_grad(sae)
        self.opt.step()
        if self.normalise_decoder:
            _normalise_decoder(sae)
        with torch.no_grad():
            self.since_fired += x.shape[0]
            self.since_fired[fired_idx] = 0
        self.seen += x.shape[0]
        self.step += 1
        if self.remedy == "resample" and self.step % self.resample_every == 0:
            _resample_dead(sae, self.opt, x, recon.detach(), self.dead())
        self.recent.append((float(sq_err.detach()), float(centred_ss), l0_sum, x.shape[0]))
        if self.step % self.log_every and not log:
            return None
        entry = {"step": self.step, "loss": float(loss.detach()), "fvu": float(fvu.detach()),
                 "aux_loss": float(aux.detach()), "l0": l0_sum / x.shape[0],
                 "dead_fraction": float(self.dead().float().mean()), "lr": self.lr}
        self.history.append(entry)
        return entry

    def summary(self) -> dict[str, float]:
        """fvu and l0 over the metric window, the dead fraction now, steps and activations seen."""
        if not self.recent:
            raise ValueError("train_sae: the activations were empty; nothing was trained")
        sq, ss, l0s, n = (sum(v[i] for v in self.recent) for i in range(4))
        return {"fvu": sq / ss, "l0": l0s / n, "dead_fraction": float(self.dead().float().mean()),
                "steps": self.step, "activations": self.seen}

    def state_dict(self) -> dict:
        """Everything the next step depends on (tensors stay tensors; torch.save-able)."""
        return {"sae": {k: v.detach().clone() for k, v in self.sae.state_dict().items()},
                "opt": self.opt.state_dict(), "since_fired": self.since_fired.clone(),
                "recent": list(self.recent), "recent_maxlen": self.recent.maxlen,
                "history": list(self.history), "step": self.step, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (of a trainer built with the same options)."""
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["opt"])
        self.since_fired.copy_(state["since_fired"])
        self.recent = collections.deque(state["recent"], maxlen=state["recent_maxlen"])
        self.history = list(state["history"])
        self.step, self.seen = int(state["step"]), int(state["seen"])


def train_sae(sae: SAE, activations, config: TrainConfig | None = None, *, steps: int | None = None, epochs: int = 1,
              progress: bool = True, device: str | torch.device | None = None, column: str | None = None) -> TrainResult:
    """Train ``sae`` in place with Adam on ``activations``; see the module docstring for the loss.

    Args:
        activations: a [n, d] tensor/array, an iterable of [b, d] batches, or activation
            file(s)/folder(s) (see :func:`iterate_activation_files`).
        config: the optimisation settings (:class:`TrainConfig`; None: its defaults).
        steps: optimiser steps (passes repeat as needed); None: ``epochs`` passes.
        progress: show a tqdm progress bar.
        device: where to train (default: the SAE's device).
        column: parquet column holding activations, when files are given.
    """
    config = config or TrainConfig()
    if steps is None and epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    window = config.window or (max(1, steps // 10) if steps else 10)
    trainer = SAETrainer(sae, dataclasses.replace(config, window=window), device=device)
    bar = tqdm(total=steps, disable=not progress, desc="train_sae", unit="step", leave=False)
    t0 = time.perf_counter()
    for epoch, batches in enumerate(_epochs(activations, config.batch_size, column)):
        if steps is None and epoch >= epochs:
            break
        got_any = False
        for batch in batches:
            got_any = True
            entry = trainer.train_step(batch, log=trainer.step + 1 == steps)
            if entry is not None:
                bar.set_postfix(fvu=f"{entry['fvu']:.4f}", l0=f"{entry['l0']:.1f}", dead=f"{entry['dead_fraction']:.3f}")
            bar.update(1)
            if steps is not None and trainer.step >= steps:
                break
        if (steps is not None and trainer.step >= steps) or not got_any:
            break
    elapsed = time.perf_counter() - t0
    bar.close()
    if steps is not None and 0 < trainer.step < steps:
        warnings.warn(f"train_sae: the activations ran out after {trainer.step} of {steps} steps "
                      "(a one-shot iterator gives a single pass; pass a list, tensor or files to repeat)",
                      stacklevel=2)
    sae.eval()
    summary = trainer.summary()
    return TrainResult(fvu=summary["fvu"], l0=summary["l0"], dead_fraction=summary["dead_fraction"],
                       steps=trainer.step, activations_per_s=trainer.seen / elapsed if elapsed > 0 else float("inf"),
                       history=trainer.history)


@torch.no_grad()
def evaluate_sae(sae: SAE, activations, batch_size: int = 4096, column: str | None = None) -> dict[str, float]:
    """FVU (against the data's global mean), mean L0 and the share of latents that never fire, over one pass."""
    sq = 0.0
    count = 0
    total = None
    total_sq = None
    l0 = 0.0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=sae.W_enc.device)
    for batch in next(_epochs(activations, batch_size, column)):
        x = _as_2d_tensor(batch).to(device=sae.W_enc.device, dtype=sae.W_enc.dtype)
        codes = sae.encode(x)
        sq += float((sae.decode(codes) - x).double().pow(2).sum())
        xd = x.double()
        total = xd.sum(0) if total is None else total + xd.sum(0)
        total_sq = xd.pow(2).sum() if total_sq is None else total_sq + xd.pow(2).sum()
        count += x.shape[0]
        active = codes > 0
        l0 += float(active.sum())
        fired |= active.any(0)
    if count == 0:
        raise ValueError("evaluate_sae: the activations were empty")
    variance = float(total_sq - total.pow(2).sum() / count)
    return {"fvu": sq / variance, "l0": l0 / count, "dead_fraction": float((~fired).float().mean()),
            "n": count}
