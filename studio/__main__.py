"""`python -m studio`: parse the command line, check it is safe to listen where asked, and run the studio
until Ctrl+C, SIGTERM or SIGHUP asks it to shut down; a requested shutdown exits 0.

Gradio reads GRADIO_TEMP_DIR when it is imported, so the workspace is settled and the variable set before
anything imports gradio (uploads then stay inside the workspace, the only folder the app serves).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from .store import DEFAULT_WORKSPACE

AUTH_ENV = "APERTIS_AUTH"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m studio", description="Apertis Studio: train, chat with and export small models."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this computer only)")
    parser.add_argument("--port", type=int, default=7860, help="first port to try; the next free one is used if taken")
    parser.add_argument(
        "--workspace", default=str(DEFAULT_WORKSPACE), help="folder for datasets, runs, models and the registry"
    )
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    parser.add_argument("--auth", default=None, help=f"USER:PASSWORD required to open the page (or set {AUTH_ENV})")
    parser.add_argument("--max-upload", default="2gb", help="largest file one upload may be (default 2gb)")
    return parser.parse_args(argv)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_auth(host: str, auth: str | None, env: dict[str, str]) -> tuple[str, str] | None:
    """(user, password), or None on loopback without credentials; raises SystemExit with what to do."""
    text = auth or env.get(AUTH_ENV) or ""
    if not text:
        if is_loopback(host):
            return None
        raise SystemExit(
            f"studio: refusing to listen on {host} without a password: anyone on the network could use it.\n"
            f"Add --auth USER:PASSWORD (or set {AUTH_ENV}=USER:PASSWORD), or keep the default --host 127.0.0.1."
        )
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise SystemExit("studio: credentials must look like USER:PASSWORD (both parts non-empty)")
    return user, password


def free_port(host: str, first: int, tries: int = 100) -> int:
    """The first port from `first` on that nobody listens on."""
    bind_host = "127.0.0.1" if host in ("localhost", "") else host
    for port in range(first, first + tries):
        with socket.socket(socket.AF_INET6 if ":" in bind_host else socket.AF_INET) as sock:
            if os.name != "nt":
                # As the server itself binds: after a crash the port keeps connections in TIME_WAIT or
                # FIN_WAIT for a minute, and without this the probe would call a free port taken. (On
                # Windows the option means "share a port someone listens on", so it stays off there.)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((bind_host, port))
                return port
            except OSError:
                continue
    raise SystemExit(f"studio: ports {first}-{first + tries - 1} are all taken; pass --port with a free one")


def port_notice(asked: int, got: int) -> str | None:
    """The line that says why the studio is not on the port asked for (None when it is)."""
    if got == asked:
        return None
    taken = f"port {asked} is" if got == asked + 1 else f"ports {asked}-{got - 1} are"
    # No URL in this line: the launcher opens the first URL the studio prints, which must be the ready line's.
    return f"studio: {taken} in use (another program, or a studio that did not shut down); serving on {got} instead"


class ShutdownRequest:
    """Ctrl+C, SIGTERM and SIGHUP (closing the terminal) become a request the main thread waits for, so the
    studio shuts down in order and exits 0 instead of dying of the signal (exit code 130 or 143). A third
    signal during a shutdown that hangs ends the process at once."""

    NAMES = {"SIGINT": "Ctrl+C", "SIGBREAK": "Ctrl+Break"}

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason = ""
        self._count = 0

    def install(self) -> ShutdownRequest:
        for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), self._handle)
        return self

    def _handle(self, signum: int, _frame) -> None:
        self._count += 1
        if self._count == 1:
            name = signal.Signals(signum).name
            self.reason = self.NAMES.get(name, name)
            self.event.set()
        elif self._count == 2:
            say("studio: still shutting down; press Ctrl+C once more to quit at once")
        else:
            os._exit(1)  # asked three times: not a clean shutdown, so not 0

    def wait(self) -> str:
        """Block until a shutdown is requested; returns what asked for it ("Ctrl+C", "SIGTERM", ...)."""
        while not self.event.wait(0.5):  # a timed wait: Windows delivers Ctrl+C only between waits
            pass
        return self.reason


def say(line: str) -> None:
    """Print a line to the console; a closed terminal (the reason for a SIGHUP) must not stop a shutdown."""
    try:
        print(line, flush=True)
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    auth = resolve_auth(args.host, args.auth, dict(os.environ))
    shutdown = ShutdownRequest().install()  # before the slow imports: a Ctrl+C during them shuts down cleanly too
    workspace = Path(args.workspace).expanduser().resolve()
    temp = workspace / "tmp" / "gradio"
    temp.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(temp)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    port = free_port(args.host, args.port)
    notice = port_notice(args.port, port)
    if notice:
        say(notice)

    from .app import launch  # imports gradio: only now that GRADIO_TEMP_DIR is set

    launch(
        workspace,
        host=args.host,
        port=port,
        auth=auth,
        open_browser=not args.no_browser,
        max_upload=args.max_upload,
        shutdown=shutdown,
        say=say,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
