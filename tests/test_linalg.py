"""The shared solves of the matrix methods: right answers on good systems, and on bad ones a
recorded (and logged) fallback instead of an exception or a silent garbage result."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from crucible.methods.linalg import polar, relative_ridge, solve_right_general, solve_right_spd

RNG = np.random.default_rng(3)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def test_spd_solve_matches_numpy_and_records_the_path() -> None:
    x = RNG.standard_normal((40, 6))
    a = x.T @ x / 40
    b = RNG.standard_normal((5, 6))
    diag: dict = {}
    out = solve_right_spd(_t(a), _t(b), ridge_eps=0.0, diag=diag)
    np.testing.assert_allclose(out.numpy(), b @ np.linalg.inv(a), rtol=1e-10, atol=1e-12)
    assert diag["solve"] == "cholesky" and diag["ridge"] == 0.0
    # The estimate is (max/min)^2 of the Cholesky diagonal: a lower bound on cond(A).
    d = np.diag(np.linalg.cholesky(a))
    assert diag["cond"] == pytest.approx((d.max() / d.min()) ** 2, rel=1e-10)
    assert diag["cond"] <= np.linalg.cond(a) * (1 + 1e-10)
    assert "fallback" not in diag
    assert "ill_conditioned" not in diag


def test_relative_ridge_scales_with_the_matrix() -> None:
    a = np.diag([1.0, 2.0, 3.0])
    b = RNG.standard_normal((2, 3))
    assert relative_ridge(_t(a), 1e-2) == pytest.approx(1e-2 * 2.0)
    d1: dict = {}
    d2: dict = {}
    small = solve_right_spd(_t(a), _t(b), ridge_eps=1e-2, diag=d1)
    large = solve_right_spd(_t(a * 1e6), _t(b * 1e6), ridge_eps=1e-2, diag=d2)
    np.testing.assert_allclose(small.numpy(), large.numpy(), rtol=1e-12)  # scale-free
    np.testing.assert_allclose(small.numpy(), b @ np.linalg.inv(a + 0.02 * np.eye(3)), rtol=1e-12)


def test_singular_spd_falls_back_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    a = np.diag([1.0, 0.0, 0.0])
    b = RNG.standard_normal((2, 3))
    diag: dict = {}
    with caplog.at_level(logging.WARNING, logger="crucible.methods.linalg"):
        out = solve_right_spd(_t(a), _t(b), ridge_eps=0.0, diag=diag)
    # No ridge asked for: straight to the minimum-norm pseudo-inverse solution.
    assert diag["solve"] == "eigh_pinv" and diag["rank"] == 1 and "fallback" in diag
    assert any("solve fallback" in r.message for r in caplog.records)
    np.testing.assert_allclose(out.numpy(), np.c_[b[:, :1], np.zeros((2, 2))], atol=1e-12)
    # With a ridge that is still too small for Cholesky: 10x the ridge, recorded.
    near = np.diag([1.0, -5e-11, 0.0])
    diag = {}
    solve_right_spd(_t(near), _t(b), ridge_eps=1e-10, diag=diag)
    assert diag["solve"] == "cholesky_ridge_x10" and "fallback" in diag
    assert diag["ridge_eps"] == pytest.approx(1e-9)


def test_indefinite_matrix_reaches_the_pseudo_inverse() -> None:
    a = np.diag([2.0, -1.0])
    b = np.array([[4.0, 3.0]])
    diag: dict = {}
    out = solve_right_spd(_t(a), _t(b), ridge_eps=0.0, diag=diag)
    assert diag["solve"] == "eigh_pinv" and diag["rank"] == 1
    np.testing.assert_allclose(out.numpy(), [[2.0, 0.0]])  # negative directions dropped


def test_general_solve_uses_lu_then_least_squares() -> None:
    a = RNG.standard_normal((5, 5)) + 5 * np.eye(5)
    b = RNG.standard_normal((3, 5))
    diag: dict = {}
    out = solve_right_general(_t(a), _t(b), diag=diag)
    np.testing.assert_allclose(out.numpy(), b @ np.linalg.inv(a), rtol=1e-10, atol=1e-12)
    assert diag["solve"] == "lu"
    singular = np.ones((3, 3))
    diag = {}
    out = solve_right_general(_t(singular), _t(np.ones((1, 3))), diag=diag)
    assert diag["solve"].startswith("lstsq") and diag["ill_conditioned"] is True
    np.testing.assert_allclose(out.numpy() @ singular, np.ones((1, 3)), atol=1e-9)


def test_polar_factor_is_the_nearest_orthonormal_matrix() -> None:
    m = RNG.standard_normal((7, 4))
    q = polar(_t(m)).numpy()
    np.testing.assert_allclose(q.T @ q, np.eye(4), atol=1e-12)
    u, _, vt = np.linalg.svd(m, full_matrices=False)
    np.testing.assert_allclose(q, u @ vt, atol=1e-12)
