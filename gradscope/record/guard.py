"""Nothing the recorder does may raise into the user's training loop: failures become one warning each.

The one exception raised on purpose is :class:`~gradscope.errors.StopRun` (``--max-steps`` /
``--max-time``), which always passes through.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from gradscope.errors import StopRun


class Guard:
    """Runs recorder code on the user's behalf and turns its failures into one stderr line per site."""

    def __init__(self) -> None:
        self.warned: set[str] = set()  # sites that have printed their warning

    def call(self, site: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, or None after warning once for ``site`` when it raised (StopRun passes)."""
        try:
            return fn(*args)
        except StopRun:
            raise
        except Exception as exc:
            self.failed(site, exc)
            return None

    def failed(self, site: str, exc: Exception) -> None:
        """Say once that recording failed at ``site``; training goes on."""
        self.warn(site, f"recording failed in {site} ({type(exc).__name__}: {exc}); training goes on")

    def warn(self, site: str, message: str) -> None:
        """Print ``gradscope: warning: message`` on stderr, the first time ``site`` warns only."""
        if site not in self.warned:
            self.warned.add(site)
            print(f"gradscope: warning: {message}", file=sys.stderr)
