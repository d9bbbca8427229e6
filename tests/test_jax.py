"""JAX under ``jax.jit``: primitives and fixed-rank decompositions trace; the rest refuses clearly.

A function of ``jax.jit`` sees tracers without values. Everything that only
needs shapes (the primitives, decompositions at fixed integer ranks, the
spectra) must trace and agree with the eager result; whatever needs values
on the host (ranks from ``tol``, HOOI's stopping rule, ranks from energy)
must raise a ``TypeError`` that says so, never JAX's
``ConcretizationTypeError`` from inside tuckerlib.
"""

from __future__ import annotations

import numpy as np
import pytest

import tuckerlib as tl

jax = pytest.importorskip("jax")
jnp = jax.numpy


@pytest.fixture(scope="module")
def x():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.standard_normal((6, 5, 4)))


@pytest.fixture(scope="module")
def factors():
    rng = np.random.default_rng(1)
    return [jnp.asarray(rng.standard_normal((n, 2))) for n in (6, 5, 4)]


PRIMITIVES = {
    "unfold": lambda x, fs: tl.unfold(x, 1),
    "fold": lambda x, fs: tl.fold(tl.unfold(x, 2), 2, x.shape),
    "mode_product": lambda x, fs: tl.mode_product(x, fs[1], 1, transpose=True),
    "multi_mode_product": lambda x, fs: tl.multi_mode_product(x, fs, transpose=True, skip=0),
    "tucker_to_tensor": lambda x, fs: tl.tucker_to_tensor(x[:2, :2, :2], fs),
    "to_tensor": lambda x, fs: tl.TuckerTensor(x[:2, :2, :2], fs).to_tensor(),
    "norm": lambda x, fs: tl.TuckerTensor(x[:2, :2, :2], fs).norm(),
}


@pytest.mark.parametrize("name", list(PRIMITIVES))
def test_primitives_under_jit_equal_eager(name, x, factors):
    call = PRIMITIVES[name]
    traced = jax.jit(call)(x, factors)
    np.testing.assert_allclose(np.asarray(traced), np.asarray(call(x, factors)), rtol=1e-12)


FIXED_RANK = {
    "hosvd": lambda x: tl.hosvd(x, (3, 2, 2)),
    "sthosvd": lambda x: tl.sthosvd(x, (3, 2, 2)),
    "rhosvd": lambda x: tl.rhosvd(x, 2, oversample=1, seed=0),
}


@pytest.mark.parametrize("name", list(FIXED_RANK))
def test_fixed_rank_decompositions_under_jit(name, x):
    def run(x):
        core, factors = FIXED_RANK[name](x)
        return core, factors

    core, factors = jax.jit(run)(x)
    eager = FIXED_RANK[name](x)
    np.testing.assert_allclose(np.asarray(core), np.asarray(eager.core), atol=1e-10)
    for f, g in zip(factors, eager.factors, strict=True):
        np.testing.assert_allclose(np.asarray(f), np.asarray(g), atol=1e-10)


def test_float32_under_jit_stays_float32(x):
    core, _ = jax.jit(lambda x: tuple(tl.sthosvd(x, 2)))(x.astype(jnp.float32))
    assert core.dtype == jnp.float32


def test_mode_spectra_under_jit(x):
    traced = jax.jit(tl.mode_spectra)(x)
    for s, e in zip(traced, tl.mode_spectra(x), strict=True):
        np.testing.assert_allclose(np.asarray(s), np.asarray(e), atol=1e-10)


NEEDS_VALUES = {
    "sthosvd-tol": (lambda x: tl.sthosvd(x, tol=0.1), "choosing ranks from tol"),
    "hosvd-tol": (lambda x: tl.hosvd(x, tol=0.1), "choosing ranks from tol"),
    "hooi": (lambda x: tl.hooi(x, 2), "hooi.s stopping rule .the error after each sweep."),
    "energy_ranks": (lambda x: tl.energy_ranks(x, 0.9), "a host copy"),
    "ranks_for_budget": (lambda x: tl.ranks_for_budget(x, 40), "a host copy"),
    "tucker_vs_matrix": (lambda x: tl.tucker_vs_matrix(x, 40), "a host copy"),
}


@pytest.mark.parametrize("name", list(NEEDS_VALUES))
def test_value_dependent_calls_refuse_clearly_under_jit(name, x):
    call, purpose = NEEDS_VALUES[name]
    with pytest.raises(TypeError, match=f"{purpose} needs the values of the tensor.*jax.jit"):
        jax.jit(call)(x)


@pytest.mark.parametrize("name", ["hosvd", "sthosvd", "hooi", "rhosvd"])
def test_eager_jax_decompositions_equal_numpy(name, x):
    calls = {
        "hosvd": lambda x: tl.hosvd(x, 2),
        "sthosvd": lambda x: tl.sthosvd(x, tol=0.3),
        "hooi": lambda x: tl.hooi(x, 2, max_iter=3),
        "rhosvd": lambda x: tl.rhosvd(x, 2, oversample=1, seed=0),
    }
    result, expected = calls[name](x), calls[name](np.asarray(x))
    assert isinstance(result.core, jax.Array)
    np.testing.assert_allclose(np.asarray(result.core), expected.core, atol=1e-10)
    for f, g in zip(result.factors, expected.factors, strict=True):
        np.testing.assert_allclose(np.asarray(f), g, atol=1e-10)


ANALYSIS = {
    "mode_spectra": lambda x: tl.mode_spectra(x),
    "energy_ranks": lambda x: tl.energy_ranks(x, 0.9),
    "effective_rank": lambda x: tl.effective_rank(tl.mode_spectra(x)[0]),
    "stable_rank": lambda x: tl.stable_rank(tl.mode_spectra(x)[1]),
    "ranks_for_budget": lambda x: tl.ranks_for_budget(x, 40),
    "tucker_vs_matrix": lambda x: tl.tucker_vs_matrix(x, 40),
}


@pytest.mark.parametrize("name", sorted(ANALYSIS))
def test_eager_jax_analysis_equals_numpy(name, x):
    """The rank analysis on eager JAX arrays gives NumPy's answer (fixed shapes)."""
    result, expected = ANALYSIS[name](x), ANALYSIS[name](np.asarray(x))
    if name == "mode_spectra":
        for r, e in zip(result, expected, strict=True):
            np.testing.assert_allclose(np.asarray(r), e, atol=1e-10)
    elif name == "tucker_vs_matrix":
        assert result["tucker_ranks"] == expected["tucker_ranks"]
        for key in ("tucker_error", "matrix_error"):
            np.testing.assert_allclose(result[key], expected[key], atol=1e-10)
    else:
        np.testing.assert_allclose(np.asarray(result), np.asarray(expected), atol=1e-10)
