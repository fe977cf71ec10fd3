"""DACO steering through a dictionary-initialised SAE (docs/methods.md §3).

At each steered layer and position: ``c* = encode(z)``; ``c_hat_i = -c*_i`` for the
undesirable atoms K-, ``+gamma`` for the desirable atoms K+, 0 otherwise; and
``z' = z + W_dec^T c_hat``. Only this delta is added, so the SAE's reconstruction
error never enters the model.

Two ways to compute the delta (``mode``):

- ``"exact"`` (default): the SAE's codes exactly as written above. For a TopK SAE
  that is the full encode (every atom, then TopK); for a ReLU SAE the undesirable codes
  are ``relu(pre_acts)`` over a ``[d, |K-|]`` slice of ``W_enc``, which equals the full
  encode exactly, so only that slice is computed. The desirable part is the constant
  ``gamma * sum_{K+} W_dec[i]``.
- ``"fast"`` (an APPROXIMATION, opt-in, TopK SAEs): a TopK code of atom i depends on
  every other atom (is ``pre_i`` among the k largest?), so it is calibrated into
  JumpReLU form, ``c_i = pre_i * [pre_i > theta_i]``, with per-atom thresholds fitted
  on recorded activations by :meth:`DacoSteerer.calibrate`, which measures how often
  the calibrated and exact codes agree. Only the undesirable atoms are encoded and only
  those that fire decoded. Each time a fast steerer is entered it prints that agreement
  (stderr), so no figure obtained with it is mistaken for exact DACO.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

import sys

from steering.steerers.base import BuildOptions, IndexSets, Steerer, disjoint, index_sets, per_layer, register

MODES = ("exact", "fast")


class CalibrationReport(NamedTuple):
    """How well calibrated JumpReLU codes reproduce the exact TopK codes on the undesirable atoms."""

    agreement: float
    """Fraction of (token, undesirable atom) pairs whose calibrated and exact codes are equal (to float rounding)."""
    token_agreement: float
    """Fraction of tokens whose codes agree on every undesirable atom."""
    recall: float
    """Of the (token, atom) pairs active in the exact code, the fraction the calibrated code fires on (1.0 if none)."""
    precision: float
    """Of the pairs the calibrated code fires on, the fraction active in the exact code (1.0 if none)."""
    n_fit: int
    """Activations the thresholds were fitted on."""
    n_eval: int
    """Held-out activations the agreement was measured on (the fitting ones when no hold-out)."""


def sae_activation(sae) -> str:
    """The SAE's activation function name: ``"topk"`` or ``"relu"``."""
    activation = str(sae.activation).lower()
    if activation not in ("topk", "relu"):
        raise ValueError(f"DacoSteerer supports TopK and ReLU SAEs, not activation {activation!r}")
    return activation


class _LayerPlan:
    """What the fast path needs at one layer: slices of the SAE for the steered atoms."""

    def __init__(self, sae, undesirable: torch.Tensor, desirable: torch.Tensor, gamma: float):
        with torch.no_grad():
            self.undesirable = undesirable
            self.desirable = desirable
            self.enc_w = sae.W_enc[:, undesirable].detach().contiguous()  # [d, |K-|]
            self.enc_b = sae.b_enc[undesirable].detach().clone()
            self.b_dec = sae.b_dec.detach().clone()
            self.dec_w = sae.W_dec[undesirable].detach().contiguous()  # [|K-|, d]
            self.add = gamma * sae.W_dec[desirable].detach().sum(0)  # [d]
        self.threshold: torch.Tensor | None = None  # JumpReLU thresholds of a calibrated TopK SAE

    def to(self, device, dtype) -> None:
        for name in ("enc_w", "enc_b", "b_dec", "dec_w", "add", "threshold"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device=device, dtype=dtype))

    def pre_acts(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.b_dec) @ self.enc_w + self.enc_b


@register("daco")
class DacoSteerer(Steerer):
    """Steer with SAEs: remove the undesirable atoms' codes and add ``gamma`` of each desirable atom.

    Args:
        model: a Hugging Face model (its decoder layers are found through its adapter).
        saes_by_layer: decoder layer -> :class:`steering.SAE` trained on that layer's output;
            the steered layers are its keys.
        undesirable: atom indices K- (one list for every layer, or a dict layer -> list),
            as :func:`steering.annotate` returns them.
        desirable: atom indices K+, likewise.
        gamma: the code given to each desirable atom (*not published*; 0 only removes): one
            value, or a dict layer -> value (``daco steer`` / ``daco eval`` pass γ times the
            layer's mean activation norm, see :mod:`steering.steerers.from_dictionary`).
        mode: ``"exact"`` (default) or ``"fast"`` (the calibrated approximation; see the module docstring).
    """

    needs_dictionary = True

    @classmethod
    def build(cls, options: BuildOptions) -> DacoSteerer:
        """The SAEs of ``options.sae_dir`` (else dictionary-initialised), annotated; gamma in the shared unit."""
        from steering.steerers.from_dictionary import daco_saes, strengths

        saes, undesirable, desirable = daco_saes(options.dictionary, options.layers, options.sae_dir, options.k, options.eta)
        return cls(options.model, saes, undesirable, desirable, gamma=strengths(options))

    def __init__(self, model: nn.Module | None, saes_by_layer: Mapping[int, object], undesirable: IndexSets,
                 desirable: IndexSets = (), gamma: float | Mapping[int, float] = 1.0, mode: str = "exact"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if not saes_by_layer:
            raise ValueError("saes_by_layer is empty: give one SAE per layer to steer")
        super().__init__(model, saes_by_layer.keys())
        self.saes = dict(saes_by_layer)
        self.gamma = per_layer(gamma, self.layers, "gamma")
        self.mode = mode
        self.calibration: dict[int, CalibrationReport] = {}
        sizes = {layer: sae.W_dec.shape[0] for layer, sae in self.saes.items()}
        self.undesirable = index_sets(undesirable, self.layers, sizes, "undesirable")
        self.desirable = index_sets(desirable, self.layers, sizes, "desirable")
        disjoint(self.undesirable, self.desirable)
        self.activations = {layer: sae_activation(sae) for layer, sae in self.saes.items()}
        self._plans = {layer: _LayerPlan(self.saes[layer], self.undesirable[layer], self.desirable[layer],
                                   self.gamma[layer]) for layer in self.layers}

    def _to(self, device, dtype) -> None:
        for layer in self.layers:
            self._plans[layer].to(device, dtype)
            self.saes[layer].to(device)

    def uses_fast_path(self, layer: int) -> bool:
        """Whether ``layer`` computes only the steered atoms' codes (always exact for ReLU; calibrated for TopK)."""
        if self.activations[layer] == "relu":
            return True
        if self.mode == "exact":
            return False
        if self._plans[layer].threshold is None:
            raise RuntimeError(f"layer {layer}: a TopK SAE needs calibrate(activations) before mode='fast'")
        return True

    def __enter__(self) -> DacoSteerer:
        super().__enter__()
        if self.mode == "fast":
            print(self.agreement_note(), file=sys.stderr, flush=True)
        return self

    def agreement_note(self) -> str:
        """What the fast mode's approximation costs: its measured agreement with exact TopK, per layer."""
        topk = [layer for layer in self.layers if self.activations[layer] == "topk"]
        if not topk:
            return "daco: fast mode on ReLU SAEs is exact"
        for layer in topk:
            self.uses_fast_path(layer)  # the clear error when a TopK layer is not calibrated
        rows = "; ".join(f"layer {layer}: tokens fully agreeing {r.token_agreement:.3f}, recall {r.recall:.3f}, "
                         f"precision {r.precision:.3f} (n={r.n_eval})" for layer, r in self.calibration.items()
                         if layer in topk)
        return ("daco: APPROXIMATION (TopK calibrated into JumpReLU thresholds), not exact DACO; agreement with exact "
                f"TopK on the undesirable atoms (held-out activations): {rows}")

    @torch.no_grad()
    def undesirable_codes(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """The codes ``c*_i`` of the undesirable atoms ([..., |K-|]) as this steerer computes them."""
        if not self.uses_fast_path(layer):
            return self._exact_codes(layer, z)
        plan = self._plans[layer]
        pre = plan.pre_acts(z)
        if plan.threshold is None:  # ReLU: exact
            return torch.relu(pre)
        return pre_to_codes(pre, plan.threshold)

    def _exact_codes(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        sae = self.saes[layer]
        return sae.encode(z.to(sae.W_enc.dtype))[..., self.undesirable[layer]].to(z.dtype)

    @torch.no_grad()
    def delta(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """``W_dec^T c_hat`` for the activation ``z`` ([..., d]) at ``layer``.

        Whatever the mode, only the undesirable atoms that fire somewhere in ``z`` are
        decoded (the others' codes are 0) and the desirable part is precomputed, so the
        exact mode costs one full encode plus a sparse decode.
        """
        plan = self._plans[layer]
        codes = self.undesirable_codes(layer, z).to(plan.dec_w.dtype)
        n_atoms = codes.shape[-1]  # 0 with no undesirable atoms: only the desirable part is added
        fired = codes.reshape(-1, n_atoms).ne(0).any(0).nonzero().squeeze(1) if n_atoms else codes.new_zeros(0).long()
        if fired.numel() < n_atoms:
            return (plan.add - codes.index_select(-1, fired) @ plan.dec_w.index_select(0, fired)).to(z.dtype)
        return (plan.add - codes @ plan.dec_w).to(z.dtype)

    @torch.no_grad()
    def calibrate(self, activations: torch.Tensor | Mapping[int, torch.Tensor], holdout: float = 0.25,
                  seed: int = 0) -> dict[int, CalibrationReport]:
        """Fit JumpReLU thresholds for the undesirable atoms of each TopK SAE and report agreement.

        ``activations`` are recorded outputs of the steered layers ([n, d], or a dict
        layer -> [n, d]; see :func:`steering.steerers.record_activations`). For each
        undesirable atom the threshold is the one that best separates, on the fitting
        rows, the activations where the exact TopK code is active from those where it
        is not (smallest L1 error of the codes, see :func:`fit_thresholds`). Agreement
        is then measured on a random ``holdout`` fraction of the rows (on the fitting
        rows when ``holdout`` is 0); the reports are kept in :attr:`calibration` and printed
        whenever a fast steerer is entered. ReLU layers need no calibration and report
        perfect agreement.
        """
        if not 0 <= holdout < 1:
            raise ValueError(f"holdout must be in [0, 1), not {holdout}")
        if not isinstance(activations, Mapping):
            activations = {layer: activations for layer in self.layers}
        reports = {}
        for layer in self.layers:
            if layer not in activations:
                raise ValueError(f"calibrate: no activations for steered layer {layer}")
            plan = self._plans[layer]
            z = activations[layer].to(device=plan.enc_w.device, dtype=plan.enc_w.dtype).reshape(-1, plan.enc_w.shape[0])
            if self.activations[layer] == "relu":
                reports[layer] = CalibrationReport(1.0, 1.0, 1.0, 1.0, z.shape[0], z.shape[0])
                continue
            order = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(seed)).to(z.device)
            n_eval = int(round(holdout * z.shape[0]))
            fit, held = (order[n_eval:], order[:n_eval]) if n_eval else (order, order)
            if fit.numel() == 0:
                raise ValueError("calibrate needs at least one activation to fit thresholds on")
            exact = self._exact_codes(layer, z)
            plan.threshold = fit_thresholds(plan.pre_acts(z[fit]), exact[fit] != 0)
            reports[layer] = _agreement(pre_to_codes(plan.pre_acts(z[held]), plan.threshold), exact[held],
                                        n_fit=fit.numel())
        self.calibration.update(reports)
        return reports


def pre_to_codes(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """JumpReLU: ``pre`` where it exceeds the per-atom ``threshold``, else 0."""
    return pre * (pre > threshold)


def fit_thresholds(pre: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Per-column JumpReLU thresholds ``theta`` fitted so that ``pre > theta`` reproduces ``active``.

    ``pre`` and ``active`` are [n, m]. Each mistake costs the code value it gets wrong,
    ``max(pre, 0)``, so the fitted threshold minimises the L1 error of the calibrated
    codes against the exact ones on these rows. Firing on the t largest values of a
    column costs ``(value of the inactive among them) + (value of the active outside
    them)``; for the best t over 0..n theta lies mid-way between the t-th and (t+1)-th
    largest values (at the largest when t = 0, just below the smallest when t = n). Thresholds are never negative (a TopK code is never negative).
    """
    values, order = pre.sort(dim=0, descending=True)
    labels = active.gather(0, order)
    weight = values.clamp_min(0).double()
    zero = torch.zeros_like(weight[:1])
    fired_active = torch.cat([zero, (weight * labels).cumsum(0)])  # [n + 1, m]: among the top t
    fired_inactive = torch.cat([zero, (weight * ~labels).cumsum(0)])
    cost = fired_inactive + (fired_active[-1:] - fired_active)
    best = cost.argmin(0)[None]  # first minimum: the fewest firings among equals
    below_all = torch.nextafter(values[-1:], torch.full_like(values[-1:], -float("inf")))
    first_out = torch.cat([values, below_all]).gather(0, best)  # largest value left out
    last_in = torch.cat([values[:1], values]).gather(0, best)  # smallest value fired (the largest when t = 0)
    middle = torch.where(best == 0, first_out, (first_out + last_in) / 2)  # mid-gap: generalises best
    return middle.squeeze(0).clamp_min(0)


def _agreement(calibrated: torch.Tensor, exact: torch.Tensor, n_fit: int) -> CalibrationReport:
    fired, active = calibrated != 0, exact != 0
    same = (fired == active) & torch.isclose(calibrated, exact, rtol=1e-5, atol=1e-6)
    both = (fired & active).sum().item()
    return CalibrationReport(
        agreement=same.float().mean().item(),
        token_agreement=same.all(-1).float().mean().item(),
        recall=both / active.sum().item() if active.any() else 1.0,
        precision=both / fired.sum().item() if fired.any() else 1.0,
        n_fit=n_fit,
        n_eval=exact.shape[0],
    )
