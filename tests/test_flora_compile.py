"""An adapted model under :func:`torch.compile`: forward and backward agree with eager.

The backend is ``"aot_eager"``: TorchDynamo captures the graph and AOTAutograd
traces the joint forward/backward graph, which is where adapter code can fail
to compile (Python control flow, parameter containers, in-place updates).
Inductor would add only code generation, independent of the adapters, and on
the 2-core CPU machine of CI its C++ compilation of this small model took
20-70 s per forward mode (measured with torch 2.13), too slow for the suite.

``fullgraph=True`` makes any graph break an error: the forward-mode choice of
``forward="auto"`` is plain Python arithmetic on static shapes and must trace.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flora

pytestmark = pytest.mark.slow

DTYPE = torch.float32


def _model(forward: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=3),
        nn.Flatten(),
        nn.Linear(6 * 5 * 5, 4),
    ).to(DTYPE)
    # "hosvd" starts with a non-zero core and factors, so every adapter
    # tensor gets a non-zero gradient at the first step.
    config = flora.FLoRAConfig(
        ranks=2, init="hosvd", forward=forward, target_modules=["0", "2", "4"]
    )
    return flora.inject(model, config)


def _forward_backward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().sum().backward()
    return out.detach(), [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("forward", ["auto", "factorized", "dense"])
def test_compiled_matches_eager(forward: str) -> None:
    torch.compiler.reset()
    model = _model(forward)
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    expected_out, expected_grads = _forward_backward(model, x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out, grads = _forward_backward(compiled, x)

    tol = 100 * torch.finfo(DTYPE).eps
    torch.testing.assert_close(out, expected_out, rtol=tol, atol=tol)
    assert len(grads) == len(expected_grads) > 0
    for grad, expected in zip(grads, expected_grads, strict=True):
        assert grad is not None
        assert expected.abs().max() > 0, "a zero gradient would make the comparison vacuous"
        torch.testing.assert_close(grad, expected, rtol=tol, atol=tol * expected.abs().max())
