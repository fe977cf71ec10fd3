"""Sparse coding over a concept dictionary and the MOP edit (docs/methods.md §2).

An activation z (dimension d) is written as ``z = D^T c + r`` over the
dictionary D ([n, d], one concept direction per row; rows should be unit-norm,
see :func:`steering.dictionary.unit_rows` — the solvers accept any D, and the
edit must use the same D as the solve). Two solvers:

* :func:`elastic_net` (PaCE's default): FISTA with adaptive restart, batched
  over many activations at once, on CPU or GPU, minimising per activation::

      1/2 ||z - D^T c||^2 + alpha * (tau ||c||_1 + (1 - tau)/2 ||c||^2)

  **Mapping to scikit-learn.** ``sklearn.linear_model.ElasticNet`` fits
  ``X = D^T`` ([d, n]: the d coordinates are its "samples"), ``y = z`` and
  minimises ``1/(2 d) ||y - X w||^2 + a rho ||w||_1 + a (1 - rho)/2 ||w||^2``.
  That is our objective divided by d, so ``rho = tau`` and ``a = alpha / d``
  (:func:`sklearn_alpha`); the coefficients are identical.
* :func:`lstsq_lowrank` (PaCE's released code): a rank-``rank`` randomised SVD of
  the dictionary (``torch.svd_lowrank``), the least-squares problem projected
  onto its left singular vectors, then ``torch.linalg.lstsq`` (minimum norm).

:func:`mop_edit` removes the undesirable part and adds desirable atoms,
``z' = z - sum_{i in K-} c_i D_i + gamma sum_{i in K+} D_i``; the residual
``z - D^T c`` is kept because only the change (:func:`mop_delta`) is applied.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def sklearn_alpha(alpha: float, d: int) -> float:
    """scikit-learn's ElasticNet ``alpha`` equal to our ``alpha`` for activations of dimension ``d``."""
    return alpha / d


def _check_problem(D: torch.Tensor, Z: torch.Tensor) -> None:
    if D.ndim != 2:
        raise ValueError(f"the dictionary D must be [n_concepts, d], got shape {tuple(D.shape)}")
    if Z.shape[-1] != D.shape[1]:
        raise ValueError(f"activations have dimension {Z.shape[-1]} but the dictionary has d={D.shape[1]}")


def _lipschitz(D: torch.Tensor) -> float:
    """Largest eigenvalue of D D^T (squared spectral norm of D), with a small safety margin."""
    if min(D.shape) <= 2048:
        return float(torch.linalg.matrix_norm(D.double(), ord=2)) ** 2 * 1.0001
    gen = torch.Generator(device=D.device).manual_seed(0)
    v = torch.randn(D.shape[1], generator=gen, device=D.device, dtype=D.dtype)
    for _ in range(100):
        v = D.T @ (D @ v)
        v = v / v.norm()
    return float((D @ v).norm()) ** 2 * 1.02


class ElasticNetSolver:
    """Batched elastic-net coding over a fixed dictionary (precomputes what every solve reuses).

    Args:
        D: [n, d] dictionary (unit-norm rows recommended).
        alpha, tau: penalty weight and L1 share (PaCE: 0.1, 0.9); see the module docstring.
    """

    def __init__(self, D: torch.Tensor, alpha: float = 0.1, tau: float = 0.9):
        if not (0.0 <= tau <= 1.0):
            raise ValueError(f"tau must be in [0, 1], got {tau}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if D.ndim != 2:
            raise ValueError(f"the dictionary D must be [n_concepts, d], got shape {tuple(D.shape)}")
        self.D = D
        self.alpha = float(alpha)
        self.tau = float(tau)
        n, d = D.shape
        # the gradient needs c @ (D D^T): through the Gram matrix when it is cheaper
        self.gram = D @ D.T if n <= 2 * d else None
        self.ridge = self.alpha * (1.0 - self.tau)
        self.step = 1.0 / (_lipschitz(D) + self.ridge)
        self.threshold = self.alpha * self.tau * self.step

    def _gram_times(self, c: torch.Tensor) -> torch.Tensor:
        return c @ self.gram if self.gram is not None else (c @ self.D) @ self.D.T

    @torch.no_grad()
    def solve(self, Z: torch.Tensor, max_iter: int = 1000, tol: float = 1e-6,
              init: torch.Tensor | None = None) -> torch.Tensor:
        """Coefficients [b, n] for activations Z [b, d] (or [d] -> [n]).

        Stops when no coefficient moved by more than ``tol * max(1, max|c|)`` in an
        iteration, or after ``max_iter`` iterations.
        """
        _check_problem(self.D, Z)
        squeeze = Z.ndim == 1
        Z2 = Z.reshape(-1, Z.shape[-1]).to(self.D.dtype)
        b = Z2 @ self.D.T
        c = torch.zeros_like(b) if init is None else init.reshape(b.shape).to(b.dtype).clone()
        y = c.clone()
        t = torch.ones(b.shape[0], 1, dtype=b.dtype, device=b.device)
        for it in range(max_iter):
            grad = self._gram_times(y) - b + self.ridge * y
            u = y - self.step * grad
            c_new = torch.sign(u) * torch.clamp(u.abs() - self.threshold, min=0.0)
            diff = c_new - c
            # adaptive restart (O'Donoghue & Candes): drop momentum where it points uphill
            restart = ((y - c_new) * diff).sum(-1, keepdim=True) > 0
            t_new = (1.0 + torch.sqrt(1.0 + 4.0 * t * t)) / 2.0
            momentum = torch.where(restart, torch.zeros_like(t), (t - 1.0) / t_new)
            t = torch.where(restart, torch.ones_like(t), t_new)
            y = c_new + momentum * diff
            c = c_new
            if it % 10 == 9 or it == max_iter - 1:
                scale = max(1.0, float(c.abs().max())) if c.numel() else 1.0
                if float(diff.abs().max()) <= tol * scale:
                    break
        return c.reshape(-1) if squeeze else c.reshape(*Z.shape[:-1], self.D.shape[0])


def elastic_net(D: torch.Tensor, Z: torch.Tensor, alpha: float = 0.1, tau: float = 0.9,
                max_iter: int = 1000, tol: float = 1e-6) -> torch.Tensor:
    """Elastic-net coefficients [b, n] of activations Z [b, d] over the dictionary D [n, d].

    Minimises ``1/2 ||z - D^T c||^2 + alpha (tau ||c||_1 + (1-tau)/2 ||c||^2)`` per row
    of Z (scikit-learn's ``alpha`` is ``alpha / d``, see :func:`sklearn_alpha`).
    Reuse an :class:`ElasticNetSolver` to code many batches over one dictionary.
    """
    return ElasticNetSolver(D, alpha, tau).solve(Z, max_iter=max_iter, tol=tol)


class LowRankLstsq:
    """PaCE's least-squares coding after a rank-``rank`` embedding of the dictionary.

    ``torch.svd_lowrank(D^T, q)`` gives an orthonormal basis U [d, q] of the
    dictionary's dominant span; each z is projected onto it and the projected system
    ``(U^T D^T) c = U^T z`` is solved by least squares (minimum-norm solution).
    The randomised SVD is seeded, so results are reproducible.
    """

    def __init__(self, D: torch.Tensor, rank: int = 500, niter: int = 4, seed: int = 0):
        if D.ndim != 2:
            raise ValueError(f"the dictionary D must be [n_concepts, d], got shape {tuple(D.shape)}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.D = D
        q = min(int(rank), *D.shape)
        devices = [D.device] if D.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            U, _, _ = torch.svd_lowrank(D.T, q=q, niter=niter)
        self.basis = U  # [d, q]
        self.projected = (D @ U).T.contiguous()  # [q, n]: U^T D^T

    @torch.no_grad()
    def solve(self, Z: torch.Tensor) -> torch.Tensor:
        """Coefficients [b, n] for activations Z [b, d] (or [d] -> [n])."""
        _check_problem(self.D, Z)
        squeeze = Z.ndim == 1
        Z2 = Z.reshape(-1, Z.shape[-1]).to(self.D.dtype)
        rhs = (Z2 @ self.basis).T  # [q, b]
        if self.projected.device.type == "cpu":
            sol = torch.linalg.lstsq(self.projected, rhs, driver="gelsd").solution
        else:  # CUDA's lstsq assumes full rank; the pseudo-inverse is the same minimum-norm solution
            sol = torch.linalg.pinv(self.projected) @ rhs
        c = sol.T
        return c.reshape(-1) if squeeze else c.reshape(*Z.shape[:-1], self.D.shape[0])


def lstsq_lowrank(D: torch.Tensor, Z: torch.Tensor, rank: int = 500) -> torch.Tensor:
    """Least-squares coefficients [b, n] of Z [b, d] over D [n, d] after a rank-``rank`` embedding (PaCE)."""
    return LowRankLstsq(D, rank).solve(Z)


def _check_sets(n: int, undesirable: Sequence[int], desirable: Sequence[int]) -> tuple[list[int], list[int]]:
    neg, pos = [int(i) for i in undesirable], [int(i) for i in desirable]
    bad = [i for i in neg + pos if not 0 <= i < n]
    if bad:
        raise IndexError(f"concept indices {bad[:5]} are outside the dictionary's {n} rows")
    both = sorted(set(neg) & set(pos))
    if both:
        raise ValueError(f"concept indices {both[:5]} are both undesirable and desirable")
    return neg, pos


def mop_delta(D: torch.Tensor, C: torch.Tensor, undesirable: Sequence[int], desirable: Sequence[int],
              gamma: float = 0.0) -> torch.Tensor:
    """The MOP change ``- sum_{K-} c_i D_i + gamma sum_{K+} D_i`` for coefficients C [..., n] -> [..., d]."""
    if C.shape[-1] != D.shape[0]:
        raise ValueError(f"coefficients have {C.shape[-1]} entries but the dictionary has {D.shape[0]} rows")
    neg, pos = _check_sets(D.shape[0], undesirable, desirable)
    delta = torch.zeros(*C.shape[:-1], D.shape[1], dtype=D.dtype, device=D.device)
    if neg:
        idx = torch.as_tensor(neg, device=D.device)
        delta = delta - C.index_select(-1, idx).to(D.dtype) @ D.index_select(0, idx)
    if pos and gamma:
        delta = delta + gamma * D[torch.as_tensor(pos, device=D.device)].sum(0)
    return delta


def mop_edit(Z: torch.Tensor, D: torch.Tensor, C: torch.Tensor, undesirable: Sequence[int],
             desirable: Sequence[int], gamma: float = 0.0) -> torch.Tensor:
    """``z' = z - sum_{K-} c_i D_i + gamma sum_{K+} D_i`` (the residual ``z - D^T c`` is kept)."""
    _check_problem(D, Z)
    return Z + mop_delta(D, C, undesirable, desirable, gamma).to(Z.dtype)
