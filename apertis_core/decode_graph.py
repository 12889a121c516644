"""The decode step replayed as one CUDA graph (opt-in: APERTIS_CUDA_GRAPH=1; see docs/KERNELS.md).

A decode step of a small model is dozens of tiny kernels, so on a GPU its time goes to launching them; a
captured CUDA graph launches them all at once. That needs a step that reads and writes the same memory every
time and never waits for the host: a fixed-size state (SLA, STRC) updated in place and the tokens in a fixed
buffer. `graph_unfit` says why a model and state cannot be graphed (a softmax-attention cache grows, looped
depth decides on the host how many passes a token gets, ...); generation then steps as usual.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import torch

from .model.experts import AdaptiveExpertSystem

ENV_VAR = "APERTIS_CUDA_GRAPH"


def wanted() -> bool:
    """Whether APERTIS_CUDA_GRAPH asks for graphed decode steps ("1", "on", "true" or "yes")."""
    return os.environ.get(ENV_VAR, "").strip().lower() in ("1", "on", "true", "yes")


def _leaves(tree) -> Iterator:
    """The leaves of nested lists and dicts (a model state)."""
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _leaves(item)
    else:
        yield tree


def graph_unfit(model: torch.nn.Module, state: list[dict]) -> str | None:
    """Why `model.step` over `state` cannot be captured as a CUDA graph, or None when it can."""
    if getattr(model, "loop", None) is not None:
        return "looped depth decides on the host how many passes a token gets"
    leaves = list(_leaves(state))
    if any(hasattr(module, "stack_states") for module in model.modules()) or not all(map(torch.is_tensor, leaves)):
        return "a layer's state grows with every token (a softmax or cross-attention cache)"
    batch = leaves[0].shape[0]
    for module in model.modules():
        if isinstance(module, AdaptiveExpertSystem):
            sorted_dispatch = batch * module.top_k > module.n_experts  # what step runs for a wide batch
            if module.dispatch == "loop" or (sorted_dispatch and module.dispatch is None):
                return f"at batch size {batch} the expert layers read expert ids on the host (set dispatch='grouped')"
    if not model.lm_head.weight.is_cuda:
        return "CUDA graphs need a CUDA device"
    return None


def _copy_into(buffers, values) -> None:
    """Write a step's new state into the old one's tensors (same nesting and shapes), skipping tensors the
    step already updated in place."""
    if isinstance(buffers, dict):
        for key, buffer in buffers.items():
            _copy_into(buffer, values[key])
    elif isinstance(buffers, (list, tuple)):
        for buffer, value in zip(buffers, values, strict=True):
            _copy_into(buffer, value)
    elif values is not buffers:
        buffers.copy_(values)


def _clone(tree):
    if isinstance(tree, dict):
        return {key: _clone(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_clone(item) for item in tree]
    return tree.clone()


class GraphedStep:
    """`model.step` over fixed buffers: the state it is built with (advanced in place by every call) and a
    token buffer. With `capture` (CUDA) the step is recorded once and replayed; without it the same buffer
    discipline runs eagerly, on any device (the CPU tests check it that way)."""

    def __init__(self, model: torch.nn.Module, state: list[dict], capture: bool = True):
        self.model, self.state = model, state
        self.tokens = torch.zeros(next(_leaves(state)).shape[0], dtype=torch.long, device=model.lm_head.weight.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        if capture:
            self._capture()

    def _advance(self, state: list[dict]) -> torch.Tensor:
        logits, new_state = self.model.step(self.tokens, state)
        _copy_into(state, new_state)
        return logits

    def _capture(self) -> None:
        # Warm-up runs the kernels (and fla's autotuning, which must not happen while capturing) on a copy of
        # the state, on a side stream as CUDA graphs require; capturing records kernels without running them.
        spare = _clone(self.state)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._advance(spare)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._advance(self.state)

    def __call__(self, tokens: torch.Tensor, state: list[dict]) -> tuple[torch.Tensor, list[dict]]:
        """tokens (B,) -> (logits (B, V), the state), like model.step; the logits are overwritten by the next
        call, and `state` must be the one this step was built with."""
        if state is not self.state:
            raise ValueError("a GraphedStep advances the state it was built with; build a new one for another state")
        self.tokens.copy_(tokens)
        if self.graph is None:
            return self._advance(self.state), self.state
        self.graph.replay()
        return self.logits, self.state


def graphed(model: torch.nn.Module, state: list[dict], current: GraphedStep | None) -> GraphedStep | None:
    """The graph to advance `state` with when APERTIS_CUDA_GRAPH asks for one: `current` while it serves this
    state, else a new capture; None (with a warning saying why) where the step cannot be graphed."""
    if not wanted():
        return None
    if current is not None and current.state is state:
        return current
    reason = graph_unfit(model, state)
    if reason is not None:
        warnings.warn(f"{ENV_VAR} is set, but the decode step cannot be a CUDA graph: {reason}", stacklevel=3)
        return None
    return GraphedStep(model, state)
