"""steering.sparse_coding: elastic net against scikit-learn, PaCE's lstsq variant, the MOP edit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import ElasticNet

from steering.dictionary import unit_rows
from steering.sparse_coding import (
    ElasticNetSolver,
    elastic_net,
    lstsq_lowrank,
    mop_delta,
    mop_edit,
    sklearn_alpha,
)


def planted(n, d, b, support, seed, dtype=torch.float64, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    D = unit_rows(torch.randn(n, d, generator=g, dtype=torch.float64))
    C = torch.zeros(b, n, dtype=torch.float64)
    for row in range(b):
        idx = torch.randperm(n, generator=g)[:support]
        C[row, idx] = torch.randn(support, generator=g, dtype=torch.float64) * 3
    Z = C @ D + noise * torch.randn(b, d, generator=g, dtype=torch.float64)
    return D.to(dtype), C.to(dtype), Z.to(dtype)


def sklearn_coefs(D, Z, alpha, tau):
    d = D.shape[1]
    model = ElasticNet(alpha=sklearn_alpha(alpha, d), l1_ratio=tau, fit_intercept=False, tol=1e-12, max_iter=100000)
    return np.stack([model.fit(D.T.double().numpy(), z.double().numpy()).coef_.copy() for z in Z])


@pytest.mark.parametrize("n,d,alpha,tau", [(20, 32, 0.1, 0.9), (48, 32, 0.05, 0.5), (30, 64, 0.3, 1.0),
                                           (64, 24, 1.0, 0.7)])
def test_elastic_net_matches_sklearn(n, d, alpha, tau):
    D, _, Z = planted(n, d, b=4, support=4, seed=n + d)
    ours = elastic_net(D, Z, alpha=alpha, tau=tau, max_iter=20000, tol=1e-10)
    assert ours.shape == (4, n)
    np.testing.assert_allclose(ours.numpy(), sklearn_coefs(D, Z, alpha, tau), atol=1e-4)


def test_elastic_net_float32_and_single_vector():
    D, _, Z = planted(24, 32, b=3, support=3, seed=7, dtype=torch.float32)
    ours = elastic_net(D, Z, alpha=0.1, tau=0.9, max_iter=5000, tol=1e-7)
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.double().numpy(), sklearn_coefs(D, Z, 0.1, 0.9), atol=1e-4)
    single = ElasticNetSolver(D).solve(Z[0], max_iter=5000, tol=1e-7)
    assert single.shape == (24,)
    np.testing.assert_allclose(single.numpy(), ours[0].numpy(), atol=1e-5)


def test_elastic_net_rejects_bad_inputs():
    D = torch.eye(4)
    with pytest.raises(ValueError, match="dimension 3"):
        elastic_net(D, torch.ones(2, 3))
    with pytest.raises(ValueError, match="tau"):
        elastic_net(D, torch.ones(2, 4), tau=1.5)


def test_lstsq_lowrank_recovers_exact_combinations():
    D, C, _ = planted(12, 40, b=5, support=4, seed=3, noise=0.0)
    Z = C @ D
    coefs = lstsq_lowrank(D, Z, rank=500)  # rank is capped at min(n, d) = 12
    np.testing.assert_allclose(coefs.numpy(), C.numpy(), atol=1e-8)
    again = lstsq_lowrank(D.float(), Z.float(), rank=12)
    np.testing.assert_allclose(again.double().numpy(), C.numpy(), atol=1e-3)


def test_mop_edit_removes_exactly_the_undesirable_components():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(32, 10, generator=g, dtype=torch.float64))
    D = Q.T.contiguous()  # 10 orthonormal directions in R^32
    C = torch.zeros(6, 10, dtype=torch.float64)
    C[:, [0, 3, 5, 7]] = torch.rand(6, 4, generator=g, dtype=torch.float64) + 0.5
    residual = torch.randn(6, 32, generator=g, dtype=torch.float64)
    residual -= residual @ D.T @ D  # orthogonal to every direction
    Z = C @ D + residual
    coefs = lstsq_lowrank(D, Z)
    np.testing.assert_allclose(coefs.numpy(), C.numpy(), atol=1e-10)
    undesirable, desirable = [3, 7], [1]
    edited = mop_edit(Z, D, coefs, undesirable, desirable, gamma=0.5)
    after = edited @ D.T  # coefficients of the edited activations
    np.testing.assert_allclose(after[:, undesirable].numpy(), 0.0, atol=1e-10)
    np.testing.assert_allclose(after[:, 1].numpy(), 0.5, atol=1e-10)
    keep = [0, 2, 4, 5, 6, 8, 9]
    np.testing.assert_allclose(after[:, keep].numpy(), C[:, keep].numpy(), atol=1e-10)
    # the residual outside the dictionary's span is kept
    np.testing.assert_allclose((edited - after @ D).numpy(), residual.numpy(), atol=1e-10)
    np.testing.assert_allclose(mop_delta(D, coefs, undesirable, desirable, 0.5).numpy(), (edited - Z).numpy())
    # elastic net with a small penalty removes them almost exactly too
    en = elastic_net(D, Z, alpha=1e-6, tau=0.9, max_iter=2000, tol=1e-12)
    assert float((mop_edit(Z, D, en, undesirable, []) @ D.T)[:, undesirable].abs().max()) < 1e-5


def test_mop_rejects_bad_sets():
    D = torch.eye(4)
    with pytest.raises(IndexError, match="outside"):
        mop_delta(D, torch.ones(1, 4), [9], [])
    with pytest.raises(ValueError, match="both"):
        mop_delta(D, torch.ones(1, 4), [1], [1])
