"""`LayerSpec`, usable ranks and exact Tucker recompression."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flora
import tuckerlib
from flora._tucker import block_sum, to_usable_ranks
from flora.spec import LayerSpec, clip_ranks, usable_ranks

shapes = st.lists(st.integers(1, 5), min_size=1, max_size=4)


@given(shape=shapes, data=st.data())
def test_usable_ranks_is_the_largest_fixed_point(shape: list[int], data: st.DataObject) -> None:
    ranks = data.draw(st.lists(st.integers(1, 6), min_size=len(shape), max_size=len(shape)))
    usable = usable_ranks(ranks, shape)
    assert all(1 <= u <= min(r, s) for u, r, s in zip(usable, ranks, shape, strict=True))
    for n, u in enumerate(usable):
        assert u <= math.prod(usable[:n] + usable[n + 1 :])
    # Largest: no feasible vector below `ranks` exceeds it in any mode.
    limits = [min(r, s) for r, s in zip(ranks, shape, strict=True)]
    for candidate in itertools.product(*(range(1, lim + 1) for lim in limits)):
        if usable_ranks(candidate, shape) == candidate:
            assert all(c <= u for c, u in zip(candidate, usable, strict=True))


@given(shape=shapes, data=st.data())
def test_compress_is_exact_and_reaches_usable_ranks(shape: list[int], data: st.DataObject) -> None:
    ranks = data.draw(st.lists(st.integers(1, 6), min_size=len(shape), max_size=len(shape)))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 100)))
    core = torch.randn(ranks, generator=generator, dtype=torch.float64)
    factors = [
        torch.randn(s, r, generator=generator, dtype=torch.float64)
        for s, r in zip(shape, ranks, strict=True)
    ]
    new_core, new_factors = to_usable_ranks(core, factors)
    assert tuple(new_core.shape) == usable_ranks(ranks, shape)
    expected = tuckerlib.tucker_to_tensor(core, factors)
    torch.testing.assert_close(tuckerlib.tucker_to_tensor(new_core, new_factors), expected)


def test_block_sum_adds_tucker_tensors() -> None:
    generator = torch.Generator().manual_seed(0)

    def tucker(ranks: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        core = torch.randn(ranks, generator=generator, dtype=torch.float64)
        return core, [
            torch.randn(s, r, generator=generator, dtype=torch.float64)
            for s, r in zip((4, 3, 2), ranks, strict=True)
        ]

    terms = [tucker((2, 1, 1)), tucker((3, 2, 2)), tucker((1, 1, 1))]
    core, factors = block_sum(terms)
    assert tuple(core.shape) == (4, 3, 2)  # (6, 4, 4) clipped exactly
    expected = sum(tuckerlib.tucker_to_tensor(c, f) for c, f in terms)
    torch.testing.assert_close(tuckerlib.tucker_to_tensor(core, factors), expected)


def test_spec_accepts_numpy_scalars_and_refuses_bools() -> None:
    spec = LayerSpec("Conv1d", (np.int64(4), 3, 3), [np.int32(2), 2, 2], scale=np.float32(0.5))
    assert spec.shape == (4, 3, 3)
    assert spec.ranks == (2, 2, 2)
    assert spec.scale == 0.5
    assert type(spec.shape[0]) is int
    assert type(spec.scale) is float
    assert flora.FLoRAConfig(ranks=np.int64(4), scale=np.float64(2.0)).ranks == 4
    with pytest.raises(TypeError, match="scale"):
        LayerSpec("Linear", (3, 3), (1, 1), scale=True)
    with pytest.raises(TypeError, match="ranks"):
        LayerSpec("Linear", (3, 3), (True, 1))
    with pytest.raises(TypeError, match="ranks"):
        flora.FLoRAConfig(ranks=2.0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "Dense"}, "kind must be one of"),
        ({"ranks": (2, 4)}, "usable ranks are"),
        ({"ranks": (4, 4)}, "do not fit"),
        ({"ranks": (2,)}, "one positive int per mode"),
        ({"scale": float("inf")}, "scale must be finite"),
        ({"init": "pissa"}, "init must be one of"),
        ({"forward": "fast"}, "forward must be one of"),
        ({"dropout": 1.0}, "dropout must lie in"),
    ],
)
def test_spec_validation_messages(changes: dict, message: str) -> None:
    fields = {"kind": "Linear", "shape": (3, 5), "ranks": (2, 2), **changes}
    with pytest.raises(ValueError, match=message):
        LayerSpec(**fields)


def test_one_set_of_messages_for_config_layer_and_record() -> None:
    # The config, a layer and a saved record report a bad scale the same way.
    messages = []
    for build in (
        lambda: flora.FLoRAConfig(scale=0.0),
        lambda: flora.Linear(torch.nn.Linear(3, 3), scale=0.0),
        lambda: LayerSpec.from_record(
            {"kind": "Linear", "shape": [3, 3], "ranks": [1, 1], "scale": 0.0, "init": "zero_core"}
        ),
    ):
        with pytest.raises(ValueError) as info:  # noqa: PT011 - the message is compared below
            build()
        messages.append(str(info.value))
    assert messages == ["scale must be finite and non-zero, got 0.0"] * 3


@pytest.mark.parametrize(
    "record",
    [
        [],
        {"kind": "Linear", "shape": [3, 3], "ranks": [1, 1], "scale": 1.0},
        {
            "kind": "Linear",
            "shape": [3, 3],
            "ranks": [1, 1],
            "scale": 1.0,
            "init": "zero_core",
            "x": 1,
        },
        {"kind": "Linear", "shape": "33", "ranks": [1, 1], "scale": 1.0, "init": "zero_core"},
        {"kind": "Linear", "shape": [3, 3], "ranks": [1, 1], "scale": "1", "init": "zero_core"},
        {"kind": "Linear", "shape": [3, 3], "ranks": [1.0, 1], "scale": 1.0, "init": "zero_core"},
    ],
)
def test_from_record_refuses_malformed_records(record: object) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - one message per defect
        LayerSpec.from_record(record)


def test_clip_ranks_template() -> None:
    assert clip_ranks((16, None, 2), (8, 3, 3)) == (6, 3, 2)  # R_0 <= 3 * 2
    with pytest.raises(ValueError, match="3 entries but the weight has 2 modes"):
        clip_ranks((1, 2, 3), (4, 4))
