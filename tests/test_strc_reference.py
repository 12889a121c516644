"""The STRC fast path (chunked linear-space scan, fused gates with a hand-written backward) against the
plain loop in `apertis_core.model.naive`: outputs, last state and every gradient, odd lengths, with and
without a start state, fp32 (against fp64) and under bf16 autocast; the cell on fla-core's HGRN kernels the
same way, on CUDA or through Triton's interpreter on a CPU (tests/test_kernels.py)."""

import pytest
import torch
from fla_interpreter import fla_device
from hypothesis import given, settings
from hypothesis import strategies as st

from apertis_core.model import naive
from apertis_core.model.strc import StateTrackingCell, _scan_, gated_recurrence

from conftest import tiny_config

LENGTHS = [1, 7, 63, 100, 128]


def rel(fast, ref):
    return float((fast.detach().double() - ref.detach().double()).norm() / ref.detach().double().norm().clamp_min(1.0))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("start", [False, True])
@pytest.mark.parametrize("length", LENGTHS + [1000])
def test_scan_matches_loop(length, start, reverse):
    a, b = torch.rand(3, length, 5), torch.randn(3, length, 5)
    h0 = torch.randn(3, 5) if start else None
    flip = (lambda t: t.flip(1)) if reverse else (lambda t: t)  # reversed: the loop over the flipped sequence
    expected = flip(naive.linear_recurrence(flip(a.double()), flip(b.double()), h0.double() if start else None))
    assert rel(_scan_(a, b.clone(), h0, reverse=reverse), expected) < 1e-6


def cell_and_input(length, width=24, d_model=32, batch=2):
    cell = StateTrackingCell(tiny_config("apertis-nano", d_model=d_model, strc_hidden=width))
    torch.nn.init.normal_(cell.in_proj.weight, std=0.5)  # gates across their whole range, both candidate branches
    x = torch.randn(batch, length, d_model)
    return cell, x


def run_with_grads(fn, cell, x, h0, seed=1):
    """fn(x, h0) -> (y, last); gradients of a fixed random loss on both w.r.t. x, the weights and h0."""
    y, last = fn(x, h0)
    generator = torch.Generator().manual_seed(seed)
    grad_y = torch.randn(y.shape, generator=generator).to(y.device)
    grad_last = torch.randn(last.shape, generator=generator).to(last.device)
    loss = (y.double() * grad_y.double()).sum() + (last.double() * grad_last.double()).sum()
    inputs = [x, cell.in_proj.weight, cell.out_proj.weight] + ([h0] if h0 is not None else [])
    return [y, last, *torch.autograd.grad(loss, inputs)]


def fast_cell(cell):
    def run(x, h0):
        y, state = cell(x, {"h": h0} if h0 is not None else cell.init_state(x.shape[0], x.device, x.dtype))
        return y, state["h"]

    return run


@pytest.mark.parametrize("start", [False, True])
@pytest.mark.parametrize("length", LENGTHS)
def test_cell_matches_reference_fp32(length, start):
    cell, x = cell_and_input(length)
    x.requires_grad_()
    h0 = torch.rand(2, 24).requires_grad_() if start else None
    fast = run_with_grads(fast_cell(cell), cell, x, h0)
    wide = cell.double()
    x64 = x.detach().double().requires_grad_()
    h064 = h0.detach().double().requires_grad_() if start else None
    ref = run_with_grads(lambda x_, h_: naive.strc_cell(wide, x_, h_), wide, x64, h064)
    cell.float()
    errors = [rel(f, r) for f, r in zip(fast, ref, strict=True)]
    assert max(errors) < 2e-6, errors


def test_cell_under_bf16_autocast_matches_reference():
    cell, x = cell_and_input(100)
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = run_with_grads(fast_cell(cell), cell, x, None)
    ref = run_with_grads(lambda x_, h_: naive.strc_cell(cell, x_, h_), cell, x, None)
    errors = [rel(f, r) for f, r in zip(fast, ref, strict=True)]
    assert max(errors) < 2e-2, errors


def test_step_matches_forward():
    cell, x = cell_and_input(9)
    h0 = torch.rand(2, 24)
    with torch.no_grad():
        y, state = cell(x, {"h": h0})
        stepped, h = [], {"h": h0}
        for t in range(x.shape[1]):
            out, h = cell.step(x[:, t], h)
            stepped.append(out)
    assert rel(torch.stack(stepped, 1), y) < 1e-6 and rel(h["h"], state["h"]) < 1e-6


def test_gated_recurrence_without_state_gradient():
    projected = torch.randn(2, 10, 3 * 4, requires_grad=True)
    y, _ = gated_recurrence(projected)
    y.sum().backward()  # the last state unused: its gradient is None
    assert torch.isfinite(projected.grad).all()


@settings(max_examples=30, deadline=None, database=None)  # no example database: every run draws afresh
@given(length=st.integers(1, 300), width=st.integers(1, 6), start=st.booleans(), reverse=st.booleans())
def test_scan_matches_loop_for_any_length(length, width, start, reverse):
    torch.manual_seed(length)
    a, b = torch.rand(2, length, width), torch.randn(2, length, width)
    h0 = torch.randn(2, width) if start else None
    flip = (lambda t: t.flip(1)) if reverse else (lambda t: t)
    expected = flip(naive.linear_recurrence(flip(a.double()), flip(b.double()), h0.double() if start else None))
    assert rel(_scan_(a, b.clone(), h0, reverse=reverse), expected) < 1e-6


@pytest.mark.parametrize("start", [False, True])
@pytest.mark.parametrize("length", [1, 7, 100])
def test_cell_on_fla_kernels_matches_reference(length, start):
    """Without a state (training) the cell runs chunk_hgrn and only y counts; with one, fused_recurrent_hgrn,
    whose backward also takes the last state's gradient and gives the start state's."""
    device = fla_device()
    cell, x = cell_and_input(length)
    cell.kernels = "fla"
    cell.to(device)
    x = x.to(device).requires_grad_()
    h0 = torch.rand(2, 24, device=device).requires_grad_() if start else None

    def fla(x_, h_):
        y, state = cell(x_, {"h": h_} if start else None)
        return y, state["h"] if start else torch.zeros((), device=device)

    def plain(x_, h_):
        y, last = naive.strc_cell(wide, x_, h_)
        return y, last if start else torch.zeros((), device=device, dtype=y.dtype)

    fast = run_with_grads(fla, cell, x, h0)
    wide = cell.double()
    x64 = x.detach().double().requires_grad_()
    h064 = h0.detach().double().requires_grad_() if start else None
    ref = run_with_grads(plain, wide, x64, h064)
    cell.float()
    errors = [rel(f, r) for f, r in zip(fast, ref, strict=True)]
    assert max(errors) < {"cuda": 1e-4, "cpu": 2e-6}[device], errors
