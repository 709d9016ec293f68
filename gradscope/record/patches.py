"""Monkeypatching with a record of what was replaced, so that every patch can be undone."""

from __future__ import annotations

from typing import Any


class Patcher:
    """Replaces attributes on modules or classes and restores them in reverse order."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []

    def replace(self, owner: Any, name: str, new: Any) -> Any:
        """Set ``owner.name = new`` and return the original (``None`` if it did not exist)."""
        original = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
        self._saved.append((owner, name, original))
        setattr(owner, name, new)
        return original

    def restore(self) -> None:
        """Put every replaced attribute back, newest first."""
        while self._saved:
            owner, name, original = self._saved.pop()
            if original is None:
                try:
                    delattr(owner, name)
                except AttributeError:
                    pass
            else:
                setattr(owner, name, original)
