"""Tests of the rank rules (resolve_rank) and tucker_params."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tuckerlib import resolve_rank, tucker_params

SHAPES = st.lists(st.integers(1, 64), min_size=1, max_size=5).map(tuple)


def test_none_keeps_every_mode_full():
    assert resolve_rank(None, (4, 16, 32)) == (4, 16, 32)


@given(shape=SHAPES, rank=st.integers(1, 100))
def test_an_int_is_clipped_to_each_mode(shape, rank):
    assert resolve_rank(rank, shape) == tuple(min(rank, size) for size in shape)


@given(shape=SHAPES, data=st.data())
def test_a_sequence_gives_one_rank_per_mode_with_none_full(shape, data):
    rank = [data.draw(st.none() | st.integers(1, size)) for size in shape]
    expected = tuple(size if r is None else r for r, size in zip(rank, shape, strict=True))
    assert resolve_rank(rank, shape) == expected
    assert resolve_rank(tuple(rank), shape) == expected


def test_numpy_integers_are_accepted():
    assert resolve_rank(np.int64(3), (2, 5)) == (2, 3)
    assert resolve_rank([np.int32(1), None], np.array([2, 5])) == (1, 5)


@pytest.mark.parametrize(
    ("rank", "error", "match"),
    [
        (0, ValueError, "rank must be >= 1, got 0"),
        (-2, ValueError, "rank must be >= 1, got -2"),
        ((5, 2, 2), ValueError, r"rank\[0\]=5 is outside \[1, 4\] \(mode 0 has size 4"),
        ((4, 17, 2), ValueError, r"rank\[1\]=17 is outside \[1, 16\]"),
        ((4, 0, 2), ValueError, r"rank\[1\]=0 is outside \[1, 16\]"),
        ((2, 2), ValueError, "rank has 2 entries but the tensor has 3 modes"),
        ((2, 2, 2, 2), ValueError, "rank has 4 entries but the tensor has 3 modes"),
        (True, TypeError, "rank must be an integer, got bool"),
        ((2, False, 2), TypeError, r"rank\[1\] must be an integer, got bool"),
        (2.0, TypeError, "rank must be an integer, got float"),
        ((2, 2.5, 2), TypeError, r"rank\[1\] must be an integer, got float"),
        ("2", TypeError, "rank must be an integer, got str"),
    ],
)
def test_bad_ranks_are_rejected_naming_the_argument(rank, error, match):
    with pytest.raises(error, match=match):
        resolve_rank(rank, (4, 16, 32))


def test_error_messages_use_the_callers_argument_name():
    with pytest.raises(ValueError, match=r"ranks\[2\]=40 is outside \[1, 32\]"):
        resolve_rank((1, 1, 40), (4, 16, 32), name="ranks")


@given(shape=SHAPES, data=st.data())
def test_tucker_params_is_core_plus_factors(shape, data):
    rank = tuple(data.draw(st.integers(1, size)) for size in shape)
    expected = math.prod(rank) + sum(i * r for i, r in zip(shape, rank, strict=True))
    assert tucker_params(shape, rank) == expected


def test_tucker_params_follows_the_rank_rules():
    assert tucker_params((64, 64, 3, 3), (16, 16, 2, 2)) == 3084
    assert tucker_params((4, 6), 8) == tucker_params((4, 6), (4, 6)) == 24 + 16 + 36
    assert tucker_params((4, 6), None) == tucker_params((4, 6), (None, 6))
    with pytest.raises(ValueError, match=r"rank\[0\]=5 is outside"):
        tucker_params((4, 6), (5, 1))
