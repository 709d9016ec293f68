"""On a CUDA machine: no host synchronisation per recorded step, and the overhead ratio on the GPU.

``sync_check`` runs a workload's steps under ``torch.cuda.set_sync_debug_mode("error")``, which
raises on any call that waits for the GPU (``.item()``, ``.cpu()``, a blocking copy...). The plain
steps run under it first: a workload that synchronises by itself would make the check meaningless.
Then a default ``Recorder`` records its steps: the first recorded step (naming) runs before the
check, and the check stops before the first flush (``flush_every`` steps), the one place where the
recorder copies to the host on purpose. Untested here: no GPU is lent to this project's CPU
machines; ``bench/run.py`` prints that instead of a result.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from workloads import WORKLOADS

from gradscope.store import load_run


def available() -> bool:
    return torch.cuda.is_available()


def sync_check(name: str, quick: bool, steps: int = 50) -> dict[str, Any]:
    """Run ``steps`` plain steps, then ``steps`` recorded steps, each under sync-debug "error"."""
    from gradscope.record.config import RecorderConfig
    from gradscope.record.recorder import Recorder

    w = WORKLOADS[name](quick, device="cuda")
    steps = min(steps, RecorderConfig().flush_every - 5)
    for _ in range(3):
        w.step(None)
    torch.cuda.synchronize()
    out: dict[str, Any] = {"workload": name, "steps": steps}
    try:
        torch.cuda.set_sync_debug_mode("error")
        for _ in range(steps):
            w.step(None)
    except RuntimeError as exc:
        out["plain_syncs"] = str(exc).splitlines()[0]
        return out
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    with tempfile.TemporaryDirectory(prefix="gradscope-gpu-") as tmp:
        rec = Recorder(runs_dir=tmp, label="gpu-sync", config=RecorderConfig())
        rec.start()
        try:
            for _ in range(2):
                w.step(None)  # the first recorded step names the parameters
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(steps):
                    w.step(None)
                out["recorder_syncs"] = None
            except RuntimeError as exc:
                out["recorder_syncs"] = str(exc).splitlines()[0]
            finally:
                torch.cuda.set_sync_debug_mode(0)
        finally:
            rec.stop()
        out["recorded_steps"] = rec.n_steps
        # The last step's grads are still there (opt.step() leaves them): torch's own norm of them must
        # equal the recorded one (SGD and AdamW do not change grads).
        grads = [p.grad for p in w.model.parameters() if p.grad is not None]
        out["torch_last_norm"] = float(torch.nn.utils.get_total_norm(grads))
        steps = load_run(rec.run_dir).steps
        out["recorded_last_norm"] = float(steps.grad_norm.iloc[-1])
    return out
