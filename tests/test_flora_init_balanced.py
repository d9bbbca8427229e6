"""The ``"balanced"`` init (issue 19) and :func:`flora.sensitivity`.

* every init of every layer kind starts at ``ΔW = 0`` exactly (``"hosvd"``:
  the output is the base's up to rounding);
* a 2-D balanced adapter at ``s = 1`` is PEFT's LoRA with ``lora_alpha = r``:
  same draws, same outputs, same gradients, and still the same after one
  Adam step;
* the diagnostic's gradient norms and ``ΔW`` moves agree with finite
  differences, and its LoRA reference with a real PEFT LoRA;
* the older inits stay available by name and saved adapters keep theirs.
"""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
from torch import nn
from torch.nn import functional

import flora
from flora.init import balanced_init

INITS = ("balanced", "zero_core", "gaussian", "hosvd")

#: Layer kind -> (module factory, input factory).
LAYERS = {
    "Linear": (lambda: nn.Linear(7, 5), lambda: torch.randn(3, 7)),
    "Embedding": (lambda: nn.Embedding(11, 6, padding_idx=2), lambda: torch.tensor([[0, 2, 9]])),
    "Conv1d": (lambda: nn.Conv1d(4, 6, 3), lambda: torch.randn(2, 4, 9)),
    "Conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), lambda: torch.randn(2, 4, 6, 6)),
    "Conv2d grouped": (lambda: nn.Conv2d(4, 6, 3, groups=2), lambda: torch.randn(2, 4, 6, 6)),
    "Conv2d depthwise": (lambda: nn.Conv2d(4, 4, 3, groups=4), lambda: torch.randn(2, 4, 6, 6)),
    "Conv3d": (lambda: nn.Conv3d(2, 3, 3), lambda: torch.randn(1, 2, 5, 5, 5)),
}


class _Experts(nn.Module):
    """A 3-D and a 1-D parameter, adapted through :class:`flora.TuckerParametrization`."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 5, 4))
        self.gain = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x, self.weight) * self.gain


def _injected(module: nn.Module, init: str, ranks: int = 2, **config) -> nn.Module:
    config = flora.FLoRAConfig(ranks=ranks, target_modules=["0"], init=init, **config)
    return flora.inject(nn.Sequential(module), config)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_every_init_starts_at_the_base(kind: str, init: str) -> None:
    make, make_input = LAYERS[kind]
    torch.manual_seed(0)
    base, x = make(), make_input()
    expected = base(x)
    model = _injected(base, init)
    layer = flora.adapted_layers(model)["0"]
    if init == "hosvd":
        assert torch.allclose(model(x), expected, atol=1e-5)
    else:
        assert bool(layer.delta_weight().eq(0).all())
        assert torch.equal(model(x), expected)


def _assert_starts_at_base(
    model: nn.Module, x: torch.Tensor, expected: torch.Tensor, init: str
) -> None:
    """Every adapter's ΔW is exactly zero (hosvd: the base keeps the residual, to rounding)."""
    if init == "hosvd":
        assert torch.allclose(model(x), expected, atol=1e-5)
        return
    for layer in flora.adapted_layers(model).values():
        assert bool(layer.delta_weight().eq(0).all())
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize("init", INITS)
def test_every_init_starts_at_the_base_for_parameters(init: str) -> None:
    torch.manual_seed(0)
    experts, x = _Experts(), torch.randn(3, 2, 5)
    expected = experts(x)
    config = flora.FLoRAConfig(ranks=2, target_parameters=["weight", "gain"], init=init)
    model = flora.inject(experts, config)
    _assert_starts_at_base(model, x, expected, init)


class _SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` as a one-input module (query, key and value are ``x``)."""

    def __init__(self, separate: bool) -> None:
        super().__init__()
        # kdim != embed_dim stores separate q/k/v projection weights.
        kdim = 6 if separate else None
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=kdim)
        self.key = nn.Linear(8, 6) if separate else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.key(x)
        return self.attn(x, kv, kv, need_weights=False)[0]


def _other_kinds() -> dict[str, tuple]:
    """The kinds beyond torch's own layers: (module, input, target)."""
    from transformers.pytorch_utils import Conv1D

    return {
        "Conv1D (GPT-2)": (nn.Sequential(Conv1D(5, 7)), torch.randn(3, 7), "0"),
        "MultiheadAttention packed": (_SelfAttention(False), torch.randn(2, 4, 8), "attn"),
        "MultiheadAttention separate": (_SelfAttention(True), torch.randn(2, 4, 8), "attn"),
    }


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize(
    "kind", ["Conv1D (GPT-2)", "MultiheadAttention packed", "MultiheadAttention separate"]
)
def test_every_init_starts_at_the_base_for_other_kinds(kind: str, init: str) -> None:
    pytest.importorskip("transformers", reason="the Conv1D kind is transformers'")
    torch.manual_seed(0)
    module, x, target = _other_kinds()[kind]
    module.eval()
    expected = module(x)
    config = flora.FLoRAConfig(ranks=2, target_modules=[target], init=init)
    model = flora.inject(module, config)
    _assert_starts_at_base(model, x, expected, init)


@pytest.mark.parametrize("init", [i for i in INITS if i != "hosvd"])
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_every_init_starts_at_the_base_on_quantized_bases(quant: str, init: str) -> None:
    # hosvd is refused on quantized bases (test_flora_bnb.py).
    pytest.importorskip("bitsandbytes", reason="quantized bases are bitsandbytes'")
    from bnb_cases import IN, quantized_base

    base = quantized_base(quant).eval()
    x = torch.randn(3, IN)
    expected = base(x)
    config = flora.FLoRAConfig(ranks=2, target_modules=["0"], init=init)
    model = flora.inject(nn.Sequential(base), config).eval()
    layer = flora.adapted_layers(model)["0"]
    assert bool(layer.delta_weight().eq(0).all())
    assert torch.equal(model(x), expected)


def test_balanced_nd_rule() -> None:
    torch.manual_seed(0)
    model = _injected(nn.Conv2d(8, 6, 3), "balanced")
    layer = flora.adapted_layers(model)["0"]
    u0, u1, *kernel = (f.detach() for f in layer.factors)
    assert layer.ranks == (2, 2, 2, 2)
    assert bool(u0.eq(0).all())
    # G_(0) = [I 0]: the first R_0 columns of the mode-0 unfolding are the identity.
    unfolded = layer.core.detach().reshape(2, -1)
    assert torch.equal(unfolded[:, :2], torch.eye(2))
    assert bool(unfolded[:, 2:].eq(0).all())
    for factor in kernel:
        assert torch.allclose(factor.T @ factor, torch.eye(2), atol=1e-6)
    # U_1 is PEFT's lora_A draw: |entries| <= 1/sqrt(in).
    assert float(u1.abs().max()) <= 1 / math.sqrt(8)


def test_balanced_init_on_meta_tensors_only_shapes() -> None:
    core, factors = balanced_init("Linear", (5, 7), (2, 2), dtype=torch.float32, device="meta")
    assert core.is_meta
    assert [tuple(f.shape) for f in factors] == [(5, 2), (7, 2)]


# ---------------------------------------------------------------- PEFT equality


def _peft_and_flora(base: nn.Module, rank: int, seed: int) -> tuple[nn.Module, nn.Module]:
    """PEFT LoRA and FLoRA balanced on copies of ``base``, adapter tensors drawn from ``seed``."""
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["0"], lora_dropout=0.0)
    lora = peft.get_peft_model(nn.Sequential(_copy(base)), config)
    torch.manual_seed(seed)
    lora.base_model.model[0].reset_lora_parameters("default", True)
    torch.manual_seed(seed)
    tucker = _injected(_copy(base), "balanced", rank, scale=1.0)
    return lora, tucker


def _copy(module: nn.Module) -> nn.Module:
    clone = type(module).__new__(type(module))
    clone.__dict__ = dict(module.__dict__)
    clone._parameters = {k: nn.Parameter(v.detach().clone()) for k, v in module._parameters.items()}
    return clone


def _lora_tensors(lora: nn.Module, kind: str) -> tuple[nn.Parameter, nn.Parameter]:
    """PEFT's tensors that map to FLoRA's ``U_1`` and ``U_0``, in that order."""
    layer = lora.base_model.model[0]
    if kind == "Embedding":
        # ΔW (num, dim) = A_embᵀ B_embᵀ: mode 0 is A_embᵀ, mode 1 is B_embᵀ.
        return layer.lora_embedding_B["default"], layer.lora_embedding_A["default"]
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


@pytest.mark.parametrize("kind", ["Linear", "Embedding"])
def test_balanced_2d_is_peft_lora(kind: str) -> None:
    torch.manual_seed(0)
    base = nn.Linear(12, 9) if kind == "Linear" else nn.Embedding(15, 8)
    x = torch.randn(6, 12) if kind == "Linear" else torch.randint(0, 15, (4, 5))
    target = torch.randn(base(x).shape)
    lora, tucker = _peft_and_flora(base, rank=4, seed=7)
    layer = flora.adapted_layers(tucker)["0"]
    a, b = _lora_tensors(lora, kind)
    u0, u1 = layer.factors
    if kind == "Linear":
        # The very draws: U_1ᵀ = lora_A, U_0 = lora_B = 0, core = I.
        assert torch.equal(u1.detach().T, a.detach())
        assert torch.equal(u0.detach(), b.detach())
        pairs = [(u1, a, True), (u0, b, False)]
    else:
        # U_1 = lora_embedding_B (dim, r), U_0 = lora_embedding_Aᵀ = 0.
        assert torch.equal(u1.detach(), a.detach())
        assert torch.equal(u0.detach(), b.detach().T)
        pairs = [(u1, a, False), (u0, b, True)]
    assert torch.equal(layer.core.detach(), torch.eye(4))
    lr = 0.01
    optimizers = [
        torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=lr)
        for m in (lora, tucker)
    ]
    for step in range(2):
        outputs = [m(x) for m in (lora, tucker)]
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-6, atol=1e-6)
        for output, optimizer in zip(outputs, optimizers, strict=True):
            optimizer.zero_grad()
            functional.mse_loss(output, target).backward()
        for ours, theirs, transposed in pairs:
            expected = theirs.grad.T if transposed else theirs.grad
            torch.testing.assert_close(ours.grad, expected, rtol=1e-5, atol=1e-7)
        # The core's gradient U_0ᵀ (∂L/∂ΔW) U_1 is zero while U_0 is: Adam leaves it at I.
        assert bool(layer.core.grad.eq(0).all()) == (step == 0)
        if step == 0:
            for optimizer in optimizers:
                optimizer.step()


# ---------------------------------------------------------------- diagnostic


def _trained_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.Tanh(), nn.Flatten(), nn.Linear(5 * 4 * 4, 4))
    model = model.double()
    config = flora.FLoRAConfig(
        ranks={"Conv2d": (3, 2, 2, 2), "Linear": 3},
        target_modules=["0", "3"],
        init="balanced",
        scale=0.7,
    )
    model = flora.inject(model, config)
    with torch.no_grad():
        for layer in flora.adapted_layers(model).values():
            for p in (layer.core, *layer.factors):
                p.add_(0.2 * torch.randn_like(p))
    x, y = torch.randn(8, 3, 6, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
    return model, x, y


def test_sensitivity_matches_finite_differences() -> None:
    model, x, y = _trained_model()

    def loss(m: nn.Module) -> torch.Tensor:
        return functional.cross_entropy(m(x), y)

    table = flora.sensitivity(model, loss)
    layers = flora.adapted_layers(model)
    assert len(table) == (5 + 2) + (3 + 2)  # conv: core + 4 factors, Linear: core + 2; + LoRA
    checked = 0
    for record in table:
        if record.group.startswith("LoRA"):
            continue
        adapter = layers[record.layer].adapter()
        groups = {"core": adapter.core, **{f"U_{n}": f for n, f in enumerate(adapter.factors)}}
        tensor = groups[record.group]
        # Gradient: the loss's central difference along the gradient's unit direction.
        with torch.enable_grad():
            adapter.zero_grad()
            loss(model).backward()
        grad = tensor.grad.detach().clone()
        direction, eps = grad / grad.norm(), 1e-6
        with torch.no_grad():
            tensor.add_(eps * direction)
            up = float(loss(model))
            tensor.sub_(2 * eps * direction)
            down = float(loss(model))
            tensor.add_(eps * direction)
        assert (up - down) / (2 * eps) == pytest.approx(record.grad_norm, rel=1e-6)
        # ΔW move: one sign step of size eta, differenced.
        eta = 1e-3
        with torch.no_grad():
            before = adapter.delta_weight().clone()
            tensor.sub_(eta * grad.sign())
            after = adapter.delta_weight().clone()
            tensor.add_(eta * grad.sign())
        assert float((after - before).norm()) / eta == pytest.approx(record.delta_per_lr, rel=1e-6)
        checked += 1
    assert checked == 8


def test_sensitivity_lora_reference_is_peft_lora_at_init() -> None:
    torch.manual_seed(0)
    base = nn.Linear(10, 6).double()
    x, target = torch.randn(5, 10, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    model = _injected(_copy(base), "zero_core")
    table = flora.sensitivity(model, lambda m: functional.mse_loss(m(x), target), seed=3)
    rows = {r.group: r for r in table}
    assert table.lora_ranks == {"0": 2}
    # The reference's A is PEFT's draw from a generator seeded with `seed`.
    a = torch.empty(2, 10, dtype=torch.float64)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=torch.Generator().manual_seed(3))
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"])
    lora = peft.get_peft_model(nn.Sequential(_copy(base)), config)
    layer = lora.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
    functional.mse_loss(lora(x), target).backward()
    grad_b = layer.lora_B["default"].weight.grad
    assert rows["LoRA B"].grad_norm == pytest.approx(float(grad_b.norm()), rel=1e-9)
    assert rows["LoRA B"].delta_per_lr == pytest.approx(float((grad_b.sign() @ a).norm()))
    assert rows["LoRA A"].grad_norm == 0
    assert rows["LoRA A"].delta_per_lr == 0
    # zero_core: only the core moves ΔW at the start.
    assert rows["core"].delta_per_lr > 0
    assert rows["U_0"].delta_per_lr == rows["U_1"].delta_per_lr == 0


def test_sensitivity_leaves_the_model_as_it_was() -> None:
    model, x, y = _trained_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    table = flora.sensitivity(model, lambda m: functional.cross_entropy(m(x), y))
    assert all(p.grad is None for p in model.parameters())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    text = str(table)
    assert text.splitlines()[0].split() == [
        "layer",
        "group",
        "shape",
        "grad",
        "norm",
        "ΔW",
        "per",
        "unit",
        "LR",
    ]
    assert len(text.splitlines()) == len(table) + 1
    assert table.total("U") == pytest.approx(
        sum(r.delta_per_lr for r in table if r.group.startswith("U_"))
    )


def test_sensitivity_takes_a_batch_of_a_model_with_a_loss() -> None:
    class _WithLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, y: torch.Tensor):
            return type("Out", (), {"loss": functional.mse_loss(self.proj(x), y)})()

    model = flora.inject(_WithLoss(), flora.FLoRAConfig(ranks=2, target_modules=["proj"]))
    table = flora.sensitivity(model, {"x": torch.randn(3, 4), "y": torch.randn(3, 4)})
    assert [r.group for r in table] == ["core", "U_0", "U_1", "LoRA B", "LoRA A"]


def test_sensitivity_errors() -> None:
    model, x, y = _trained_model()

    def loss(m: nn.Module) -> torch.Tensor:
        return functional.cross_entropy(m(x), y)

    with pytest.raises(ValueError, match="no FLoRA adapters"):
        flora.sensitivity(nn.Linear(2, 2), lambda m: m(torch.ones(2)).sum())
    with pytest.raises(ValueError, match="scalar tensor"):
        flora.sensitivity(model, lambda m: m(x))
    with pytest.raises(TypeError, match="loss must be a callable"):
        flora.sensitivity(model, 3.0)
    with pytest.raises(ValueError, match="lora_rank must be an int >= 1, got 0"):
        flora.sensitivity(model, loss, lora_rank=0)
    with pytest.raises(ValueError, match=r"has no \.loss"):
        flora.sensitivity(model, {"input": x})
    flora.merge(model)
    with pytest.raises(ValueError, match=r"layer '0'.*merged"):
        flora.sensitivity(model, loss)


# ---------------------------------------------------------------- older inits


def test_older_inits_stay_available_by_name() -> None:
    torch.manual_seed(0)
    zero = flora.adapted_layers(_injected(nn.Linear(4096, 8), "zero_core"))["0"]
    assert bool(zero.core.eq(0).all())
    assert float(zero.factors[1].detach().std()) == pytest.approx(1 / math.sqrt(2 * 2), rel=0.05)
    gauss = flora.adapted_layers(_injected(nn.Linear(4096, 8), "gaussian"))["0"]
    assert float(gauss.factors[1].detach().std()) == pytest.approx(1 / 2, rel=0.05)
    with pytest.raises(ValueError, match=r"init must be one of .*'balanced'.*got 'lora'"):
        flora.FLoRAConfig(init="lora")


@pytest.mark.parametrize("init", ["zero_core", "gaussian"])
def test_saved_adapter_keeps_its_init(tmp_path, init: str) -> None:
    torch.manual_seed(0)
    model = _injected(nn.Linear(6, 4), init)
    with torch.no_grad():
        flora.adapted_layers(model)["0"].core.add_(0.5)
    flora.save_adapter(model, tmp_path)
    # What main's code wrote: the init's name in the layer records.
    assert f'"init": "{init}"' in (tmp_path / "adapter_config.json").read_text()
    assert init in json.dumps(json.loads((tmp_path / "adapter_config.json").read_text()))
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(6, 4))
    fresh[0].load_state_dict(model[0].base_layer.state_dict())
    loaded = flora.load_adapter(fresh, tmp_path)
    layer = flora.adapted_layers(loaded)["0"]
    assert layer.init == init
    x = torch.randn(3, 6)
    assert torch.equal(loaded(x), model(x))


def test_tuckerlib_reads_every_init_flora_records() -> None:
    from flora.spec import INIT_MODES
    from tuckerlib.io.flora_format import INIT_MODES as READABLE

    # One list for both packages; "auto" never reaches a file: a spec resolves it.
    assert READABLE is INIT_MODES
    assert flora.LayerSpec("Linear", (4, 6), (2, 2), init="auto").init == "balanced"
    assert flora.LayerSpec("Conv1d", (4, 6, 3), (2, 2, 2), init="auto").init == "zero_core"
