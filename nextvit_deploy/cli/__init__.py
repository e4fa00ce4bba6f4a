"""The ``nextvit-deploy`` command line. The app is wired in :mod:`.app`; this module stays import-light
so that :func:`main` is running before typer, rich or torch are imported, and a Ctrl-C at any moment,
imports included, ends with one line and exit code 130."""
from __future__ import annotations

import sys
from typing import Any

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the ``nextvit-deploy`` script."""
    try:
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
