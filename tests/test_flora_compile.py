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
import torch._dynamo.testing
from tiny_models import NO_DROPOUT, tiny_bert_config
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


transformers = pytest.importorskip("transformers", reason="transformers is not installed")


def _bert() -> nn.Module:
    config = tiny_bert_config(**NO_DROPOUT)
    torch.manual_seed(0)
    model = transformers.BertModel(config)
    # hosvd: non-zero gradients from the first step; the embeddings take the
    # Embedding path, the rest of the encoder the Linear one.
    config = flora.FLoRAConfig(ranks=2, init="hosvd", target_modules="all-linear", dropout=0.1)
    flora.inject(model, config)
    flora.inject(
        model, flora.FLoRAConfig(ranks=2, target_modules=["word_embeddings"]), adapter_name="emb"
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stands in for training: each adapter changes the output
        for layer in flora.adapted_layers(model).values():
            for adapter in layer.adapters.values():
                adapter.core.add_(torch.randn(adapter.core.shape, generator=generator))
    return model


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(1, 40, (3, 7), generator=torch.Generator().manual_seed(seed))


def _hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).last_hidden_state


def test_bert_has_no_graph_break_in_training_or_inference() -> None:
    torch.compiler.reset()
    model = _bert()
    ids = _ids(0)
    for training, grad in ((True, True), (False, False)):
        model.train(training)
        with torch.set_grad_enabled(grad):
            explained = torch._dynamo.explain(_hidden)(model, ids)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1


def test_bert_trains_compiled_as_eager_with_a_bounded_number_of_compiles() -> None:
    torch.compiler.reset()
    eager, model = _bert(), _bert()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    optimizers = [
        torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        for m in (eager, model)
    ]
    for step in range(3):
        outs = []
        for module, optimizer in zip((eager, compiled), optimizers, strict=True):
            optimizer.zero_grad()
            torch.manual_seed(step)  # the same dropout masks
            out = _hidden(module, _ids(step))
            out.square().mean().backward()
            optimizer.step()
            outs.append(out.detach())
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    # New weights every step, the same graph: one compile for training.
    assert counter.frame_count == 1
    for module in (eager, model):
        module.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            _hidden(compiled, _ids(9)), _hidden(eager, _ids(9)), rtol=1e-4, atol=1e-5
        )
        _hidden(compiled, _ids(10))
    assert counter.frame_count == 2


def test_named_adapters_and_disable_adapter_compiled() -> None:
    torch.compiler.reset()
    model = _bert().eval()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    ids = _ids(3)
    expected = {}
    with torch.no_grad():
        for name in ("default", "emb", ["default", "emb"]):
            flora.set_adapter(model, name)
            expected[str(name)] = _hidden(model, ids)
            torch.testing.assert_close(_hidden(compiled, ids), expected[str(name)])
        with flora.disable_adapter(model):
            base = _hidden(model, ids)
            torch.testing.assert_close(_hidden(compiled, ids), base)
        assert not torch.allclose(base, expected["default"])
        # Back to an adapter seen before: its graph is reused.
        flora.set_adapter(model, "emb")
        torch.testing.assert_close(_hidden(compiled, ids), expected["emb"])
    # One graph per adapter set and one for disable_adapter, no more.
    assert counter.frame_count == 4
