"""Per-sample routing: ``model(..., adapter_names=[...])`` runs each sample with its adapter.

Every check compares a mixed batch against the same samples run one at a
time with that adapter set active (or inside ``disable_adapter`` for
``"__base__"``), in float64.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable

import pytest
import torch
from tiny_models import tiny_bert_config
from torch import nn

import flora

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DTYPE = torch.float64
NAMES = ["a", "__base__", "c", "b", "a", "c"]


def _randomize(model: nn.Module, name: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in flora.adapted_layers(model).values():
            if name in layer.adapters:
                for tensor in layer.adapters[name].parameters():
                    tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=DTYPE))


def _three_adapters(model: nn.Module, targets: list[str], **options: object) -> nn.Module:
    """Adapters a (hosvd, all targets), b (first target only, with Δb if it has a bias), c."""
    model = model.to(DTYPE)
    configs = {
        "a": flora.FLoRAConfig(ranks=2, init="hosvd", target_modules=targets, **options),
        "b": flora.FLoRAConfig(ranks=3, target_modules=targets[:1], **options),
        "c": flora.FLoRAConfig(ranks=2, target_modules=targets, **options),
    }
    for seed, (name, config) in enumerate(configs.items()):
        flora.inject(model, config, adapter_name=name)
        _randomize(model, name, seed)
    return model


def _alone(model: nn.Module, name: str, call: Callable[[], torch.Tensor]) -> torch.Tensor:
    if name == "__base__":
        with flora.disable_adapter(model):
            return call()
    flora.set_adapter(model, name)
    return call()


def _per_sample(model: nn.Module, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    active = flora.active_adapters(model)
    rows = [_alone(model, n, lambda i=i: model(x[i : i + 1])) for i, n in enumerate(names)]
    flora.set_adapter(model, active)
    return torch.cat(rows)


def _assert_routed(model: nn.Module, x: torch.Tensor, names: list[str] = NAMES) -> None:
    routed = model(x, adapter_names=names)
    expected = _per_sample(model, x, names)
    torch.testing.assert_close(routed, expected, rtol=1e-12, atol=1e-12)
    # Not vacuous: the adapters change the output.
    assert not torch.allclose(routed[0], _alone(model, "__base__", lambda: model(x[:1]))[0])


@pytest.mark.parametrize(
    "names", [NAMES, ["a", "a", "b", "b", "b", "__base__"]], ids=["interleaved", "contiguous"]
)
def test_linear_mixed_batch_matches_each_sample_alone(names: list[str]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 4))
    model = _three_adapters(model, ["0", "2"], bias=True)
    _assert_routed(model, torch.randn(len(names), 5, 7, dtype=DTYPE), names)


@pytest.mark.parametrize("forward", ["dense", "factorized"])
def test_conv2d_mixed_batch_matches_each_sample_alone(forward: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 1))
    model = _three_adapters(model, ["0", "2"], forward=forward)
    _assert_routed(model, torch.randn(len(NAMES), 3, 6, 6, dtype=DTYPE))


def test_embedding_mixed_batch_matches_each_sample_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 6, padding_idx=0), nn.Linear(6, 3))
    model = _three_adapters(model, ["0", "1"])
    ids = torch.randint(0, 20, (len(NAMES), 5))
    _assert_routed(model, ids)


def test_user_module_with_keyword_inputs() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, *, features: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
            return self.proj(features) + shift

    torch.manual_seed(0)
    model = _three_adapters(Net(), ["proj"])
    x = torch.randn(len(NAMES), 4, dtype=DTYPE)
    routed = model(features=x, shift=1.0, adapter_names=NAMES)
    expected = torch.cat(
        [
            _alone(model, n, lambda i=i: model(features=x[i : i + 1], shift=1.0))
            for i, n in enumerate(NAMES)
        ]
    )
    torch.testing.assert_close(routed, expected, rtol=1e-12, atol=1e-12)


def test_modules_to_save_heads_route_too() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 3)).to(DTYPE)
    for seed, name in enumerate(["a", "b"]):
        config = flora.FLoRAConfig(ranks=2, target_modules=["0"], modules_to_save=["2"])
        flora.inject(model, config, adapter_name=name)
        _randomize(model, name, seed)
        with torch.no_grad():
            model[2].copies[name].weight.add_(float(seed + 1))
    names = ["b", "__base__", "a", "b"]
    x = torch.randn(len(names), 5, dtype=DTYPE)
    routed = model(x, adapter_names=names)
    torch.testing.assert_close(routed, _per_sample(model, x, names), rtol=1e-12, atol=1e-12)


def test_routing_holds_for_one_call_only() -> None:
    torch.manual_seed(0)
    model = _three_adapters(nn.Sequential(nn.Linear(4, 4)), ["0"])
    flora.set_adapter(model, "c")
    x = torch.randn(len(NAMES), 4, dtype=DTYPE)
    before = model(x)
    model(x, adapter_names=NAMES)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert model(x, adapter_names=None).equal(before)
    assert flora.active_adapters(model) == ["c"]
    assert all(not layer._routes for layer in flora.adapted_layers(model).values())


def test_gradients_reach_each_adapter_from_its_own_samples() -> None:
    torch.manual_seed(0)
    model = _three_adapters(nn.Sequential(nn.Linear(4, 3)), ["0"])
    x = torch.randn(len(NAMES), 4, dtype=DTYPE)
    flora.set_adapter(model, ["a", "b", "c"])  # every adapter requires gradients
    model(x, adapter_names=NAMES).square().sum().backward()
    layer = model[0]
    routed = {n: layer.adapters[n].core.grad.clone() for n in ("a", "b", "c")}
    for name in ("a", "b", "c"):
        model.zero_grad()
        rows = [i for i, n in enumerate(NAMES) if n == name]
        flora.set_adapter(model, name)
        layer.adapters[name].requires_grad_(True)
        model(x[rows]).square().sum().backward()
        torch.testing.assert_close(routed[name], layer.adapters[name].core.grad)


def test_bert_mixed_batch() -> None:
    config = tiny_bert_config()
    torch.manual_seed(0)
    model = _three_adapters(transformers.BertModel(config).eval(), ["query", "value", "dense"])
    ids = torch.randint(1, 40, (len(NAMES), 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0

    def run(rows: slice | list[int], **kwargs: object) -> torch.Tensor:
        return model(input_ids=ids[rows], attention_mask=mask[rows], **kwargs).last_hidden_state

    routed = run(slice(None), adapter_names=NAMES)
    expected = torch.cat([_alone(model, n, lambda i=i: run([i])) for i, n in enumerate(NAMES)])
    torch.testing.assert_close(routed, expected, rtol=1e-10, atol=1e-10)


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=30,
        n_positions=24,
        n_embd=16,
        n_layer=2,
        n_head=2,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    # GPT-2's attention and MLP are transformers Conv1D layers, which FLoRA
    # does not adapt: the token and position embeddings and the head are.
    return _three_adapters(model, ["lm_head", "wte", "wpe"])


def test_gpt2_forward_mixed_batch() -> None:
    model = _gpt2()
    ids = torch.randint(1, 30, (len(NAMES), 6))
    routed = model(input_ids=ids, adapter_names=NAMES).logits
    expected = torch.cat(
        [
            _alone(model, n, lambda i=i: model(input_ids=ids[i : i + 1]).logits)
            for i, n in enumerate(NAMES)
        ]
    )
    torch.testing.assert_close(routed, expected, rtol=1e-10, atol=1e-10)


def test_gpt2_generate_routes_every_step() -> None:
    model = _gpt2()
    ids = torch.randint(1, 30, (len(NAMES), 3))
    options = {"max_new_tokens": 6, "do_sample": False}
    routed = model.generate(ids, adapter_names=NAMES, **options)
    expected = torch.cat(
        [
            _alone(model, n, lambda i=i: model.generate(ids[i : i + 1], **options))
            for i, n in enumerate(NAMES)
        ]
    )
    assert torch.equal(routed, expected)
    # Not vacuous: the adapters generate different continuations.
    assert len({tuple(row[3:].tolist()) for row in routed}) > 1
    assert model.__dict__["_flora_generating"] == {}


def test_unknown_name_is_named() -> None:
    model = _three_adapters(nn.Sequential(nn.Linear(4, 4)), ["0"])
    x = torch.randn(3, 4, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"unknown adapters \['nonexistent'\].*'a', 'b', 'c'"):
        model(x, adapter_names=["nonexistent"] * 3)


def test_length_must_match_the_batch() -> None:
    model = _three_adapters(nn.Sequential(nn.Linear(4, 4)), ["0"])
    x = torch.randn(3, 4, dtype=DTYPE)
    with pytest.raises(ValueError, match="adapter_names has 16 entries for a batch of 3"):
        model(x, adapter_names=["a"] * 16)


@pytest.mark.parametrize("names", ["a", ["a", 1, "b"], 3])
def test_names_must_be_a_list_of_strings(names: object) -> None:
    model = _three_adapters(nn.Sequential(nn.Linear(4, 4)), ["0"])
    with pytest.raises(TypeError, match="adapter_names must"):
        model(torch.randn(3, 4, dtype=DTYPE), adapter_names=names)


def test_merged_adapters_refuse_routing() -> None:
    model = _three_adapters(nn.Sequential(nn.Linear(4, 4)), ["0"])
    flora.merge(model)
    with pytest.raises(RuntimeError, match=r"layer '0' has merged adapters \['a'\].*unmerge"):
        model(torch.randn(2, 4, dtype=DTYPE), adapter_names=["a", "b"])


def test_disabled_adapters_refuse_routing() -> None:
    model = _three_adapters(nn.Sequential(nn.Linear(4, 4)), ["0"])
    with flora.disable_adapter(model), pytest.raises(RuntimeError, match="disable_adapter"):
        model(torch.randn(2, 4, dtype=DTYPE), adapter_names=["a", "b"])


def test_parameter_adapters_refuse_routing() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).to(DTYPE)
    flora.inject(model, flora.FLoRAConfig(target_modules=["0"], target_parameters=["1.weight"]))
    with pytest.raises(
        ValueError, match=r"parameter '1\.weight' is adapted through target_parameters"
    ):
        model(torch.randn(2, 4, dtype=DTYPE), adapter_names=["default", "__base__"])


def test_input_without_the_batch_first_is_named() -> None:
    class Transposed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x.transpose(0, 1))

    model = _three_adapters(Transposed(), ["proj"])
    with pytest.raises(ValueError, match=r"module 'proj' got an input of shape \[5, 3, 4\]"):
        model(torch.randn(3, 5, 4, dtype=DTYPE), adapter_names=["a", "b", "c"])
    # The failed call leaves nothing behind.
    assert not model.proj._routes
    assert not model.__dict__["_flora_routed"]


def test_a_failing_forward_clears_the_route() -> None:
    class Failing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise KeyError(self.proj(x).shape)

    model = _three_adapters(Failing(), ["proj"])
    with pytest.raises(KeyError):
        model(torch.randn(2, 4, dtype=DTYPE), adapter_names=["a", "b"])
    assert not model.proj._routes
    assert not model.__dict__["_flora_routed"]


def test_a_thread_running_plainly_is_not_routed() -> None:
    """Thread A routes and pauses mid-forward; thread B runs the active adapter meanwhile."""
    paused, resume = threading.Event(), threading.Event()

    class Pausing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, pause: bool = False) -> torch.Tensor:
            h = self.first(x)
            if pause:
                paused.set()
                assert resume.wait(10)
            return self.second(h)

    torch.manual_seed(0)
    model = _three_adapters(Pausing(), ["first", "second"])
    x = torch.randn(len(NAMES), 4, dtype=DTYPE)
    plain, routed = model(x), {}
    expected = torch.cat(
        [_alone(model, n, lambda i=i: model(x[i : i + 1])) for i, n in enumerate(NAMES)]
    )
    flora.set_adapter(model, "a")
    thread = threading.Thread(
        target=lambda: routed.update(out=model(x, pause=True, adapter_names=NAMES))
    )
    thread.start()
    assert paused.wait(10)
    concurrent = model(x)
    resume.set()
    thread.join(10)
    torch.testing.assert_close(concurrent, plain, rtol=0, atol=0)
    torch.testing.assert_close(routed["out"], expected, rtol=1e-12, atol=1e-12)


def test_copies_route_and_unload_removes_the_keyword() -> None:
    torch.manual_seed(0)
    model = _three_adapters(nn.Sequential(nn.Linear(4, 4)), ["0"])
    x = torch.randn(len(NAMES), 4, dtype=DTYPE)
    duplicate = copy.deepcopy(model)
    torch.testing.assert_close(
        duplicate(x, adapter_names=NAMES), model(x, adapter_names=NAMES), rtol=0, atol=0
    )
    flora.unload(model)
    with pytest.raises(TypeError, match="adapter_names"):
        model(x, adapter_names=NAMES)


def test_training_with_gradient_checkpointing_is_refused() -> None:
    config = tiny_bert_config()
    model = _three_adapters(transformers.BertModel(config), ["query", "value"])
    # transformers 5.x renamed gradient_checkpointing_enable (a deprecated alias now).
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)()
    ids = torch.randint(1, 40, (len(NAMES), 7))
    with pytest.raises(ValueError, match="cannot train with gradient checkpointing"):
        model.train()(input_ids=ids, adapter_names=NAMES)
    with torch.no_grad():  # inference recomputes nothing: routing works
        model.eval()(input_ids=ids, adapter_names=NAMES)
