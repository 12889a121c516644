"""AES routing: weights, sparse dispatch against a dense reference, aux losses, dynamic routing."""

import torch
import torch.nn.functional as F

from apertis_core.model.experts import AdaptiveExpertSystem, route

from conftest import tiny_config


def make_layer(**overrides):
    cfg = tiny_config("apertis-nano", **{"n_experts": 6, "moe_top_k": 2, **overrides})
    layer = AdaptiveExpertSystem(cfg)
    layer.reset_parameters(0.1, 0.1)
    torch.nn.init.normal_(layer.router.weight, std=0.5)
    return layer


def dense_reference(layer, x):
    """Run every expert on every token and combine with the routing weights."""
    flat = x.reshape(-1, x.shape[-1])
    probs = layer.router(flat).float().softmax(-1)
    weights, experts = route(probs, layer.top_k, layer.routing, layer.threshold)
    gate_matrix = torch.zeros_like(probs).scatter_(1, experts, weights)  # (N, E)
    out = layer.shared(flat) if layer.shared is not None else torch.zeros_like(flat)
    for e in range(layer.n_experts):
        gate, up = (flat @ layer.gate_up[e]).chunk(2, -1)
        out = out + gate_matrix[:, e : e + 1] * ((F.silu(gate) * up) @ layer.down[e])
    return out.view_as(x)


def test_routed_weights_sum_to_one():
    probs = torch.rand(50, 8).softmax(-1)
    for mode in ("topk", "dynamic"):
        weights, _ = route(probs, 3, mode, 0.5)
        assert torch.allclose(weights.sum(-1), torch.ones(50))


def test_sparse_dispatch_equals_dense_reference():
    for routing in ("topk", "dynamic"):
        layer = make_layer(moe_routing=routing).eval()
        x = torch.randn(3, 11, 32)
        with torch.no_grad():
            y, _ = layer(x)
            assert (y - dense_reference(layer, x)).abs().max() < 1e-5


def test_experts_only_see_their_tokens():
    layer = make_layer(n_shared_experts=0).eval()
    seen = []
    original = layer._experts

    def spy(inputs, counts, weights):
        seen.append(inputs.shape[0])
        return original(inputs, counts, weights)

    layer._experts = spy
    with torch.no_grad():
        layer(torch.randn(2, 10, 32))
    assert seen == [20 * 2]  # 20 tokens x top-2, not 20 x 6 experts


def test_balance_loss_is_larger_for_a_collapsed_router():
    layer = make_layer(moe_z_loss_coef=0.0)
    direction = F.normalize(torch.randn(32), dim=0)
    x = direction * 3 + 0.01 * torch.randn(4, 16, 32)  # every token points the same way
    with torch.no_grad():
        layer.router.weight.zero_()
        balanced = layer(x)[1]
        layer.router.weight[0] = 10 * direction  # ... so every token strongly prefers expert 0
        collapsed = layer(x)[1]
    assert layer.last_utilisation[0] == 1.0
    assert collapsed > balanced * 1.5


def test_z_loss_grows_with_router_logit_scale():
    layer = make_layer(moe_aux_loss_coef=0.0)
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        small = layer(x)[1]
        layer.router.weight.mul_(10)
        large = layer(x)[1]
    assert large > small


def test_dynamic_routing_uses_fewer_experts_on_confident_tokens():
    layer = make_layer(moe_routing="dynamic", moe_top_k=4, moe_threshold=0.6).eval()
    x = torch.randn(1, 32, 32)
    with torch.no_grad():
        layer.router.weight.mul_(0.01)  # nearly uniform router: many experts needed to reach 0.6
        layer(x)
        unsure = float(layer.last_experts_per_token)
        layer.router.weight.mul_(1000)  # sharp router: the top expert alone passes 0.6
        layer(x)
        confident = float(layer.last_experts_per_token)
    assert unsure >= 3.0 and confident < unsure


def test_utilisation_statistics_cover_all_tokens():
    layer = make_layer()
    layer(torch.randn(2, 9, 32))
    assert torch.isclose(layer.last_utilisation.sum(), torch.tensor(2.0))  # top-2: two slots per token


# ---- Every dispatch path against the per-token reference (naive.expert_mixture) -------------------------------
import copy  # noqa: E402

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from apertis_core.model import naive  # noqa: E402
from apertis_core.model.experts import DISPATCHES  # noqa: E402


def results(layer, x, fn, seed=3):
    """[y, dx, d every parameter] for a fixed random loss on y (the auxiliary loss is left out: the
    reference has none)."""
    y = fn(x)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    loss = (y.double() * grad).sum()
    params = list(layer.parameters())
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    return [y] + [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, [x, *params], strict=True)]


def reference(layer, x):
    wide = copy.deepcopy(layer).double()
    x64 = x.detach().double().requires_grad_()
    return results(wide, x64, lambda x_: naive.expert_mixture(wide, x_)[0])


def errors(fast, ref):
    """|fast - ref| / |ref|, against 1 where the reference is smaller (top-1 routing has a zero router
    gradient by definition, which the fast path gets to 1e-8)."""
    return [
        float((f.double() - r.double()).norm() / r.double().norm().clamp_min(1.0))
        for f, r in zip(fast, ref, strict=True)
    ]


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("routing", ["topk", "dynamic"])
@pytest.mark.parametrize("shared", [0, 1])
def test_dispatch_matches_per_token_reference(dispatch, routing, shared):
    layer = make_layer(moe_routing=routing, n_shared_experts=shared)  # expert width 42: padded for grouped_mm
    layer.dispatch = dispatch
    x = torch.randn(3, 11, 32, requires_grad=True)
    fast = results(layer, x, lambda x_: layer(x_)[0])
    assert max(errors(fast, reference(layer, x))) < 1e-5


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_dispatch_under_bf16_autocast_matches_reference(dispatch):
    layer = make_layer()
    layer.dispatch = dispatch
    x = torch.randn(2, 16, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = results(layer, x, lambda x_: layer(x_)[0])
    assert max(errors(fast, reference(layer, x))) < 3e-2


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("routing", ["topk", "dynamic"])
def test_step_matches_reference(dispatch, routing):
    layer = make_layer(moe_routing=routing, moe_top_k=2).eval()
    layer.dispatch = dispatch
    x = torch.randn(3, 32, requires_grad=True)  # 3 tokens x top-2 = 6 slots <= 6 experts: the step path
    fast = results(layer, x, layer.step)
    assert max(errors(fast, reference(layer, x))) < 1e-5


def test_grouped_dispatch_statistics_equal_loop_dispatch():
    layer = make_layer(moe_routing="dynamic", moe_top_k=4, moe_threshold=0.6)
    x = torch.randn(2, 9, 32)
    stats = {}
    for dispatch in DISPATCHES:
        layer.dispatch = dispatch
        with torch.no_grad():
            _, aux = layer(x)
        stats[dispatch] = (layer.last_utilisation.clone(), layer.last_experts_per_token.clone(), aux)
    for a, b in zip(stats["loop"], stats["grouped"], strict=True):
        assert torch.allclose(a, b)


@settings(max_examples=20, deadline=None, database=None)  # no example database: every run draws afresh
@given(
    tokens=st.integers(1, 40),
    experts=st.integers(1, 6),
    top_k=st.integers(1, 3),
    routing=st.sampled_from(["topk", "dynamic"]),
    dispatch=st.sampled_from(DISPATCHES),
)
def test_dispatch_matches_reference_for_any_routing(tokens, experts, top_k, routing, dispatch):
    top_k = min(top_k, experts)
    torch.manual_seed(tokens * 10 + experts)
    layer = make_layer(n_experts=experts, moe_top_k=top_k, moe_routing=routing)
    layer.dispatch = dispatch
    x = torch.randn(1, tokens, 32, requires_grad=True)
    fast = results(layer, x, lambda x_: layer(x_)[0])
    assert max(errors(fast, reference(layer, x))) < 1e-5
