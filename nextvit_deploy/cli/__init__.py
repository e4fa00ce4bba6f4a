"""The ``nextvit-deploy`` command line. The app is wired in :mod:`._app`; this module stays import-light
so that :func:`main` is running before typer, rich or torch are imported, and a Ctrl-C at any moment,
imports included, ends with one line and exit code 130."""
from __future__ import annotations

import importlib
import signal
import sys
import threading
from typing import Any

__all__ = ["app", "main"]

# Native packages every command needs: imported up front with Ctrl-C deferred (see _import_deferring_sigint).
_NATIVE = ("torch", "onnx")


def _import_deferring_sigint(modules: tuple[str, ...]) -> None:
    """Import ``modules`` with SIGINT held back until they are loaded, then act on it.

    A KeyboardInterrupt raised while a native extension initialises (``torch._C``) does not unwind
    cleanly: CPython reports a SystemError and the process dies with SIGSEGV. So during these imports a
    Ctrl-C only sets a flag, and is raised as KeyboardInterrupt once the imports are done.
    """
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return  # SIGINT ignored or handled by an embedding program: leave it alone
    pressed: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        for name in modules:
            try:
                importlib.import_module(name)
            except ImportError:
                continue  # the command that needs it reports the missing package
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pressed:
        raise KeyboardInterrupt


def main() -> None:
    """Entry point of the ``nextvit-deploy`` script."""
    try:
        args = sys.argv[1:]
        if args and not {"--help", "-h"} & set(args):
            _import_deferring_sigint(_NATIVE)
        from ._app import app

        app()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; no artifact was written\n")
        sys.exit(130)


def __getattr__(name: str) -> Any:
    if name == "app":
        from ._app import app

        return app
    raise AttributeError(name)
