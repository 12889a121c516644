"""The chat models a studio keeps loaded, and the scheduler that lets concurrent chats share decode steps.

Each loaded model (fp32 and int8 weights are loaded, and kept, apart) has one BatchScheduler. A chat
request hands it a prompt and reads its tokens from a queue; one worker thread per model admits new
requests between steps, advances all of them with one batched step (apertis_core.generation.DecodeBatch)
and drops those that ended or whose reader went away (Stop). Every request gets what it would get alone.
Two models (side by side) have two workers: they run at the same time, but cannot share a step.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_BATCH = 16  # requests one model decodes together; more wait for a free row (measured in docs/INFERENCE.md)
_END = object()  # in a request's queue: the reply is complete


@dataclass
class _Request:
    prompt_ids: list[int]
    config: Any  # GenerationConfig
    images: list | None
    tokens: queue.Queue = field(default_factory=queue.Queue)  # token ids, then _END or the exception
    cancelled: bool = False  # set by the reader; the worker drops the request at its next step


class BatchScheduler:
    """Concurrent generation requests to one model, merged into batched decode steps (thread-safe)."""

    def __init__(self, model, max_batch: int = MAX_BATCH):
        from apertis_core.generation import can_batch

        self.model, self.max_batch = model, max_batch
        self.batchable = can_batch(model)
        self._lock = threading.Lock()
        self._pending: list[_Request] = []
        self._worker: threading.Thread | None = None

    def generate(self, prompt_ids, config, images=None) -> Iterator[int]:
        """Yield the reply's token ids as `apertis_core.generation.generate` would; closing the iterator
        cancels the request."""
        from apertis_core import generation

        if not self.batchable:  # each request decodes alone, in its caller's thread, as before batching
            yield from generation.generate(self.model, prompt_ids, config, images=images)
            return
        request = _Request(list(prompt_ids), config, images)
        with self._lock:
            self._pending.append(request)
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="apertis-decode", daemon=True)
                self._worker.start()
        try:
            while (item := request.tokens.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.cancelled = True

    def _run(self) -> None:
        """The worker: admit, drop the cancelled, step, hand out tokens; exits when nothing is left."""
        from apertis_core.generation import DecodeBatch

        batch, requests = DecodeBatch(self.model), {}
        while True:
            with self._lock:
                room = self.max_batch - len(batch)
                admitted, self._pending = self._pending[:room], self._pending[room:]
                if not admitted and not requests:
                    self._worker = None  # under the lock: a request arriving now starts a new worker
                    return
            for request in admitted:
                try:
                    requests[batch.add(request.prompt_ids, request.config, request.images)] = request
                except Exception as exc:  # this request's own fault (its prompt or image): it alone fails
                    request.tokens.put(exc)
            for key in [key for key, request in requests.items() if request.cancelled]:
                batch.remove(key)
                del requests[key]
            if not len(batch):
                continue
            try:
                produced = batch.step()
            except Exception as exc:  # the model failed mid-step: every reader hears it, the worker goes on
                for request in requests.values():
                    request.tokens.put(exc)
                batch, requests = DecodeBatch(self.model), {}
                continue
            for key, token in produced.items():
                requests[key].tokens.put(_END if token is None else token)
                if token is None:
                    del requests[key]


@dataclass
class LoadedModel:
    model: Any  # ApertisModel
    tokenizer: Any  # Tokenizer
    scheduler: BatchScheduler


class ModelCache:
    """The most recently used models (two, for side-by-side), reloaded when their weights file changes."""

    def __init__(self, capacity: int = 2):
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, float, str], LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def load(self, folder: str, weights: str = "fp32") -> LoadedModel:
        """The model in `folder` with "fp32" or "int8" weights (an int8 bundle is int8 either way)."""
        from apertis_core.bundle import load_bundle  # torch: only once a model is asked for
        from apertis_core.quantize import prepare_for_inference

        if weights not in ("fp32", "int8"):
            raise ValueError(f"weights must be fp32 or int8, not {weights!r}")
        path = Path(folder) / "model.safetensors"
        key = (str(folder), path.stat().st_mtime if path.exists() else 0.0, weights)
        with self._lock:
            if key not in self._items:
                model, tokenizer = load_bundle(folder)
                model = prepare_for_inference(model, "int8" if weights == "int8" else "none", "fp32")
                self._items[key] = LoadedModel(model, tokenizer, BatchScheduler(model))
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)  # a scheduler still decoding keeps its model until done
            self._items.move_to_end(key)
            return self._items[key]

    def get(self, folder: str, weights: str = "fp32"):
        """(model, tokenizer)."""
        loaded = self.load(folder, weights)
        return loaded.model, loaded.tokenizer
