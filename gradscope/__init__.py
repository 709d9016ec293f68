"""gradscope: measure what your gradients do, and choose ``clip_grad_norm_``'s ``max_norm`` from it.

Public API (usable without the CLI)::

    import gradscope
    with gradscope.Recorder(label="notebook"):   # records every optimizer step to .gradscope/
        train()
    run = gradscope.load_run()                    # the latest run: run.steps, run.layers, run.meta

``load_run`` never imports torch; ``Recorder`` does, on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"  # the one place it is kept: pyproject.toml reads it from here

if TYPE_CHECKING:
    from gradscope.record.recorder import Recorder
    from gradscope.store import Run, load_run

__all__ = ["Recorder", "Run", "__version__", "load_run"]


def __getattr__(name: str) -> Any:
    # Lazy: `import gradscope` (and so the CLI and the reporters) must not pay for torch.
    if name == "Recorder":
        from gradscope.record.recorder import Recorder

        return Recorder
    if name in ("load_run", "Run"):
        from gradscope import store

        return getattr(store, name)
    raise AttributeError(f"module 'gradscope' has no attribute {name!r}")
