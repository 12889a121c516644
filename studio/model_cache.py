"""The chat models a studio keeps loaded, so a conversation does not reload weights every turn."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any


class ModelCache:
    """The most recently used models (two, for side-by-side), reloaded when their weights file changes."""

    def __init__(self, capacity: int = 2):
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, float], Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, folder: str):
        from apertis_core.bundle import load_bundle  # torch: only once a model is asked for

        weights = Path(folder) / "model.safetensors"
        key = (str(folder), weights.stat().st_mtime if weights.exists() else 0.0)
        with self._lock:
            if key not in self._items:
                self._items[key] = load_bundle(folder)
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
            self._items.move_to_end(key)
            return self._items[key]
