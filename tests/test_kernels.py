"""Kernel choice (model/kernels.py): PyTorch on a CPU without importing fla, fla-core's kernels where asked for
and possible, clear errors where not; the fla path against the PyTorch path for a whole model; and, without a
GPU, every fla parity test run through Triton's interpreter in a process of its own."""

import os
import re
import subprocess
import sys

import pytest
import torch
from fla_interpreter import fla_device, fla_importable, interpreted

from apertis_core import ApertisModel
from apertis_core.generation import GenerationConfig, generate
from apertis_core.model import kernels

from conftest import HANG_GUARD_S, REPO, tiny_config

CPU_RUN = """
import sys, torch
sys.path.insert(0, "tests")
from conftest import tiny_config
from apertis_core import ApertisModel
from apertis_core.generation import GenerationConfig, generate
from apertis_core.model import kernels

model = ApertisModel(tiny_config("apertis-hybrid-nano", strc_every=1))
out = model(torch.randint(0, 97, (2, 20)))
(out.logits.mean() + out.aux_loss).backward()
tokens = list(generate(model, [1, 2, 3], GenerationConfig(max_new_tokens=4, seed=0)))
assert not kernels.use_fla(model.config.kernels, out.logits) and len(tokens) == 4
print("fla imported:", "fla" in sys.modules)
"""


def test_cpu_runs_the_pytorch_path_and_never_imports_fla():
    # A process of its own: other tests here import fla on purpose.
    env = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", kernels.ENV_VAR)}
    done = subprocess.run(
        [sys.executable, "-c", CPU_RUN], cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fla imported: False" in done.stdout


def test_auto_and_torch_pick_pytorch_on_a_cpu_even_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # only a forced "fla" takes the interpreter
    x = torch.zeros(2, 3)
    assert not kernels.use_fla("auto", x) and not kernels.use_fla("torch", x)


def test_forced_fla_on_a_cpu_says_what_is_missing_and_what_to_do(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    model = ApertisModel(tiny_config("apertis-nano", kernels="fla"))
    with pytest.raises(RuntimeError, match="kernels='fla' was asked for, but the tensors are on cpu .* need CUDA"):
        model(torch.randint(0, 97, (1, 5)))
    with pytest.raises(RuntimeError, match=f"kernels to 'auto' \\(or {kernels.ENV_VAR}=auto\\)"):
        kernels.use_fla("fla", torch.zeros(1))


def test_environment_variable_overrides_the_model_field(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    assert kernels.chosen("fla") == "torch" and not kernels.use_fla("fla", x)
    monkeypatch.setenv(kernels.ENV_VAR, " FLA ")
    assert kernels.chosen("torch") == "fla"
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    with pytest.raises(
        ValueError, match="APERTIS_KERNELS='triton' is not a kernel choice: use one of auto, torch, fla"
    ):
        kernels.use_fla("auto", x)
    monkeypatch.delenv(kernels.ENV_VAR)
    assert kernels.chosen("auto") == "auto"


def test_every_reason_why_fla_cannot_run_is_named(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # past the device check, to reach the others
    assert "need CUDA" in kernels.fla_unusable(torch.zeros(1))  # the interpreter only when "fla" is forced
    assert "not torch.float64" in kernels.fla_unusable(torch.zeros(1, dtype=torch.float64), allow_interpreter=True)
    assert "head dimension 512 is above fla's 256" in kernels.fla_unusable(torch.zeros(1), 512, allow_interpreter=True)
    monkeypatch.setattr(kernels, "fla_installed", lambda: False)
    reason = kernels.fla_unusable(torch.zeros(1), allow_interpreter=True)
    assert "fla-core is not installed" in reason and "apertis-studio[cuda]" in reason


def test_conv_weight_is_exactly_fla_short_convolution_parameter():
    """Bundles stay interchangeable: the SLA conv's only parameter loads into fla's ShortConvolution as is, and
    the model's state dict does not depend on the kernel choice."""
    if not fla_importable():
        pytest.skip("fla-core is not installed")
    from fla.modules import ShortConvolution

    cfg = tiny_config("apertis-nano")
    layer = ApertisModel(cfg).blocks[0].mixer
    short = ShortConvolution(3 * layer.inner, cfg.sla_conv_size, bias=False, activation="silu")
    short.load_state_dict(layer.conv.state_dict(), strict=True)
    assert torch.equal(short.weight, layer.conv.weight)
    shapes = {name: p.shape for name, p in ApertisModel(cfg).state_dict().items()}
    assert shapes == {name: p.shape for name, p in ApertisModel(cfg.replace(kernels="fla")).state_dict().items()}


def test_model_on_fla_kernels_matches_the_pytorch_path():
    """A whole model (SLA with conv, experts, STRC): logits, auxiliary loss and every gradient, then greedy
    generation (prefill through chunk_simple_gla, steps through fused_recurrent_simple_gla)."""
    device = fla_device()
    torch.manual_seed(0)
    model = ApertisModel(tiny_config("apertis-nano", n_layers=2, strc_every=1)).to(device)
    ids = torch.randint(0, 97, (2, 37), device=device)
    results = {}
    for choice in ("torch", "fla"):
        model.config.kernels = choice
        for module in model.modules():
            if hasattr(module, "kernels"):
                module.kernels = choice
        model.zero_grad()
        out = model(ids)
        (out.logits.square().mean() + out.aux_loss).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        tokens = list(generate(model, [5, 6, 7], GenerationConfig(max_new_tokens=6, temperature=0)))
        results[choice] = (out.logits.detach(), out.aux_loss.detach(), grads, tokens)
    (logits, aux, grads, tokens), (fla_logits, fla_aux, fla_grads, fla_tokens) = results["torch"], results["fla"]
    tolerance = {"cuda": 5e-3, "cpu": 5e-5}[device]
    assert (fla_logits - logits).norm() / logits.norm() < tolerance
    assert torch.allclose(fla_aux, aux, rtol=tolerance)
    for name, (p, q) in zip([n for n, _ in model.named_parameters()], zip(fla_grads, grads, strict=True), strict=True):
        assert (p - q).norm() / q.norm().clamp_min(1e-8) < 10 * tolerance, name
    assert fla_tokens == tokens


def test_fla_parity_tests_pass_through_triton_interpreter():
    """Without a GPU: every fla test (here and in the SLA and STRC reference tests) in a process where
    Triton interprets the kernels on the CPU (tests/fla_interpreter.py). bf16 needs CUDA."""
    if torch.cuda.is_available() or interpreted():
        pytest.skip("the fla tests run directly in this process")
    if not fla_importable():
        pytest.skip("fla-core is not installed")
    files = ["tests/test_kernels.py", "tests/test_sla_reference.py", "tests/test_strc_reference.py"]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning"]
    command += ["-k", "on_fla_kernels and not bf16", *files]
    done = subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert done.returncode == 0 and passed and int(passed[1]) >= 14, done.stdout[-4000:]
