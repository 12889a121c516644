"""What the studio's web server lets through, on top of Gradio's own checks.

- The file route (`/gradio_api/file=PATH`) serves only files in Gradio's upload folder. That folder holds
  what the page needs: uploads, and the copies Gradio makes of every file a handler returns (dataset
  previews, exported zips, CSVs, saved conversations). Everything else in the workspace, the registry
  (`studio.db` and its `-wal`/`-shm` files) first, gets 404, even on loopback: Gradio itself would serve any
  file under `allowed_paths`, which must name the folders handlers return files from.
- Sign-in attempts with `--auth` are throttled per client address: a few wrong passwords are checked at
  once, then each further attempt waits twice as long as the one before (up to 5 minutes), so guessing a
  password is slowed to a crawl. A correct password clears the count.

Both are one ASGI middleware (`StudioGuard`) that app.launch() installs through Gradio's `app_kwargs`.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

FILE_ROUTES = ("/gradio_api/file=", "/gradio_api/file/")  # the second is Gradio's deprecated spelling
# Gradio's reverse proxy to other Gradio apps: the studio loads none, so nothing may go through it.
CLOSED_ROUTES = ("/gradio_api/proxy=",)
LOGIN_ROUTES = ("/login", "/login/")
REGISTRY_FILES = ("studio.db", "studio.db-wal", "studio.db-shm", "studio.db-journal")


class LoginThrottle:
    """Failed sign-ins per client address: the first `free_attempts` are checked at once; after that each
    attempt must wait base_delay_s * 2**(extra failures) since the last one (at most max_delay_s). A client
    with no failure for forget_after_s starts afresh. Every attempt counts as failed until it succeeds, so
    attempts sent all at once cannot slip through together."""

    def __init__(
        self,
        free_attempts: int = 5,
        base_delay_s: float = 1.0,
        max_delay_s: float = 300.0,
        forget_after_s: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = 10_000,
    ):
        self.free_attempts = free_attempts
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.forget_after_s = forget_after_s
        self.clock = clock
        self.max_clients = max_clients  # bounds memory against attempts from many addresses
        self._failures: dict[str, tuple[int, float]] = {}  # client -> (failures, time of the last)
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> float:
        """Seconds before `client` may try again (0: now)."""
        with self._lock:
            failures, last = self._current(client)
            return max(0.0, last + self._delay(failures) - self.clock()) if failures else 0.0

    def attempt(self, client: str) -> float:
        """Start an attempt: 0 if it may be checked (it counts as a failure until `succeeded`), else the
        seconds to wait, and the attempt is refused without counting."""
        with self._lock:
            failures, last = self._current(client)
            now = self.clock()
            wait = max(0.0, last + self._delay(failures) - now) if failures else 0.0
            if wait > 0:
                return wait
            if len(self._failures) >= self.max_clients:
                self._forget_old(now)
            self._failures[client] = (failures + 1, now)
            return 0.0

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)

    def _current(self, client: str) -> tuple[int, float]:
        failures, last = self._failures.get(client, (0, 0.0))
        if failures and self.clock() - last > self.forget_after_s:
            del self._failures[client]
            return 0, 0.0
        return failures, last

    def _delay(self, failures: int) -> float:
        """The wait after `failures` failed attempts in a row."""
        extra = failures - self.free_attempts
        if extra < 0:
            return 0.0
        return min(self.max_delay_s, self.base_delay_s * math.pow(2, min(extra, 60)))

    def _forget_old(self, now: float) -> None:
        for client, (_, last) in list(self._failures.items()):
            if now - last > self.forget_after_s:
                del self._failures[client]
        while len(self._failures) >= self.max_clients:  # still full: drop the oldest
            del self._failures[min(self._failures, key=lambda c: self._failures[c][1])]


def file_allowed(requested: str, roots: Iterable[str | os.PathLike]) -> bool:
    """Whether the file route may serve `requested` (as Gradio reads it: relative to the working folder):
    only a local path that resolves, links followed, to inside one of `roots`, and no registry file."""
    if "://" in requested or "\x00" in requested:  # remote URLs: the studio never needs Gradio to fetch one
        return False
    try:
        target = Path(os.path.abspath(requested)).resolve()
    except (OSError, ValueError, RuntimeError):  # a name the OS rejects, a link loop
        return False
    if target.name.lower() in REGISTRY_FILES:
        return False
    for root in roots:
        try:
            if target.is_relative_to(Path(root).resolve()):
                return True
        except (OSError, ValueError, RuntimeError):
            continue
    return False


def gradio_file_roots() -> list[str]:
    """The folders the page fetches files from: Gradio's upload folder (uploads and the copies of returned
    files), and the few files Gradio itself marked static (icons)."""
    from gradio import utils

    roots = [utils.get_upload_folder()]
    try:
        from gradio.data_classes import _StaticFiles  # private: its absence only costs the icons

        roots += [str(path) for path in _StaticFiles.all_paths]
    except (ImportError, AttributeError):
        pass
    return roots


class StudioGuard:
    """ASGI middleware: the file-route policy and the sign-in throttle (see the module docstring)."""

    def __init__(
        self,
        app,
        throttle: LoginThrottle | None = None,
        roots: Callable[[], Iterable[str | os.PathLike]] = gradio_file_roots,
    ):
        self.app = app
        self.throttle = throttle
        self.roots = roots

    async def __call__(self, scope: dict[str, Any], receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if _route_value(path, CLOSED_ROUTES) is not None:
            await _respond(send, 404, {"detail": "Not found"})
            return
        requested = _route_value(path, FILE_ROUTES)
        if requested is not None and not file_allowed(requested, self.roots()):
            await _respond(send, 404, {"detail": "Not found"})
            return
        if self.throttle is not None and scope.get("method") == "POST" and _is_login(path):
            await self._login(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _login(self, scope, receive, send) -> None:
        client = (scope.get("client") or ("unknown", 0))[0]
        wait = self.throttle.attempt(client)
        if wait > 0:
            seconds = math.ceil(wait)
            await _respond(
                send,
                429,
                {"detail": f"Too many failed sign-ins from this address; wait {seconds} s and try again."},
                {"retry-after": str(seconds)},
            )
            return

        async def watch(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and message["status"] == 200:
                self.throttle.succeeded(client)
            await send(message)

        await self.app(scope, receive, watch)


def _route_value(path: str, prefixes: tuple[str, ...]) -> str | None:
    """What follows the first of `prefixes` in `path` (a mount point may come before it), or None."""
    for prefix in prefixes:
        at = path.find(prefix)
        if at >= 0:
            return path[at + len(prefix) :]
    return None


def _is_login(path: str) -> bool:
    return any(path.endswith(route) for route in LOGIN_ROUTES)


async def _respond(send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode("utf-8")
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(key.encode(), value.encode()) for key, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})
