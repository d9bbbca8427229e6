"""The thin-factor products: the plain products and gradients, in another orientation."""

from __future__ import annotations

import pytest
import torch

from flora.layers._thin import thin_matmul, thin_matmul_t


@pytest.mark.parametrize("lead", [(7,), (2, 3, 5)])
def test_gradients_pass_gradcheck(lead) -> None:
    x = torch.randn(*lead, 6, dtype=torch.float64, requires_grad=True)
    u = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(*lead, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(thin_matmul, (x, u))
    assert torch.autograd.gradcheck(thin_matmul_t, (h, w))


@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_gradients_equal_autograd_of_the_plain_products(needs) -> None:
    x, u = torch.randn(9, 5), torch.randn(5, 2)
    h, w = torch.randn(9, 2), torch.randn(5, 2)
    for fast, plain, (a, b) in [
        (thin_matmul, lambda p, q: p @ q, (x, u)),
        (thin_matmul_t, lambda p, q: p @ q.T, (h, w)),
    ]:
        left = [t.clone().requires_grad_(n) for t, n in zip((a, b), needs, strict=True)]
        right = [t.clone().requires_grad_(n) for t, n in zip((a, b), needs, strict=True)]
        out_fast, out_plain = fast(*left), plain(*right)
        out_fast.backward(torch.ones_like(out_fast))
        out_plain.backward(torch.ones_like(out_plain))
        for p, q, n in zip(left, right, needs, strict=True):
            if n:
                torch.testing.assert_close(p.grad, q.grad)
            else:
                assert p.grad is None


def test_bf16_autocast_matches_the_plain_products() -> None:
    x, u = torch.randn(8, 16), torch.randn(16, 4)
    fast_x, fast_u = x.clone().requires_grad_(), u.clone().requires_grad_()
    plain_x, plain_u = x.clone().requires_grad_(), u.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = thin_matmul_t(thin_matmul(fast_x, fast_u), fast_u)
        plain = (plain_x @ plain_u) @ plain_u.T
    assert fast.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(fast, plain)
    fast.float().sum().backward()
    plain.float().sum().backward()
    assert fast_u.grad.dtype == fast_x.grad.dtype == torch.float32
    torch.testing.assert_close(fast_u.grad, plain_u.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fast_x.grad, plain_x.grad, rtol=2e-2, atol=2e-2)


def test_compiles_without_graph_breaks() -> None:
    x = torch.randn(4, 6, requires_grad=True)
    u = torch.randn(6, 2, requires_grad=True)

    def branch(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return thin_matmul_t(thin_matmul(x, u), u)

    compiled = torch.compile(branch, backend="aot_eager", fullgraph=True)
    out = compiled(x, u)
    torch.testing.assert_close(out, (x @ u) @ u.T)
    out.sum().backward()
    torch.testing.assert_close(
        u.grad, x.T @ (torch.ones(4, 6) @ u) + (torch.ones(4, 6).T @ (x @ u))
    )
    assert x.grad is not None
