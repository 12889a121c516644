"""Where the fla-core parity tests run: on CUDA when there is one, else on the CPU through Triton's interpreter.

`fla_device()` is "cuda" with a GPU and fla-core, "cpu" in a process started with TRITON_INTERPRET=1
(tests/test_kernels.py starts one for the fla tests), else the test is skipped. Triton 3.7's interpreter
runs fla-core 0.6's kernels once two gaps are bridged, neither of which changes what a kernel computes:
- the autotuner times its configurations with the GPU driver's benchmarker, and without a GPU there is no
  driver: every configuration is reported as equally fast, so the first one runs;
- compiled Triton hands a kernel's `for i in range(n)` counters over as tensors and fla calls `i.to(tl.int64)`
  on them, while the interpreter hands out Python ints: fla's kernel modules get a `range` whose ints
  (and sums and products of them) accept `.to()`;
- the interpreter stores bf16 values but cannot make a bf16 constant (`InterpreterBuilder.get_bf16` is
  missing), which bf16 kernels need for a Python scalar: it is made as fp32 and cast with the interpreter's
  own fp32 -> bf16 conversion.
"""

from __future__ import annotations

import builtins
import importlib.util
import os
import sys

import pytest
import torch

FLA_MODULES = ("fla.ops.simple_gla", "fla.ops.hgrn", "fla.modules.convolution", "fla.modules.l2norm")
FLA_MODULES += ("fla.modules.fused_norm_gate",)


class _LoopIndex(int):
    """A Python int that takes compiled Triton's `.to(dtype)`, also after arithmetic with other ints
    (`(i_t * BT).to(tl.int64)`)."""

    def to(self, *args, **kwargs):
        return self


def _closed(op):
    def apply(self, other):
        result = op(self, other)
        return _LoopIndex(result) if type(result) is int else result  # NotImplemented: a tensor's turn

    return apply


for _name in ("add", "radd", "sub", "rsub", "mul", "rmul", "floordiv", "rfloordiv", "mod", "rmod"):
    setattr(_LoopIndex, f"__{_name}__", _closed(getattr(int, f"__{_name}__")))


def _kernel_range(*args):
    return (_LoopIndex(i) for i in builtins.range(*args))


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def fla_importable() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("fla", "triton"))


def bridge_interpreter_gaps() -> None:
    """Import fla's kernels and bridge the two gaps above (only in an interpreted test process)."""
    import triton.language as tl
    import triton.runtime.autotuner as autotuner
    from triton.runtime.interpreter import InterpreterBuilder

    autotuner.Autotuner.do_bench = property(lambda self: lambda kernel_call, quantiles: [0.0, 0.0, 0.0])
    if not hasattr(InterpreterBuilder, "get_bf16"):
        InterpreterBuilder.get_bf16 = lambda self, value: self.cast_impl(self.get_fp32(value), tl.bfloat16)
    for name in FLA_MODULES:
        __import__(name)
    for name, module in list(sys.modules.items()):
        if name.startswith("fla.") and module is not None and hasattr(module, "triton"):
            module.range = _kernel_range


def fla_device() -> str:
    """The device for a test of the fla path; skips the test where there is none."""
    if not fla_importable():
        pytest.skip("fla-core is not installed")
    if torch.cuda.is_available():
        return "cuda"
    if not interpreted():
        pytest.skip("no CUDA: tests/test_kernels.py runs these through Triton's interpreter on the CPU")
    bridge_interpreter_gaps()
    return "cpu"
