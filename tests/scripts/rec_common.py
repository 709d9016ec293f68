"""Shared by the rec_*.py fixture scripts: reference values computed with torch's own functions.

The scripts are plain training scripts (no gradscope import). Besides training, they print one line
per update, ``REF {json}``, with what gradscope should have recorded, computed at the right moment
on the gradients exactly as the optimizer consumes them. tests/test_recorder.py parses these lines.
"""

import json

import torch
from torch.nn.utils import get_total_norm

torch.set_num_threads(1)


def grad_norms(named_params, scale=None, dtype=None):
    """(global norm, {name: norm or None}) of the current grads, with torch's own functions.

    ``scale`` divides the grads first (a GradScaler's scale: a power of two, so exact); ``dtype``
    casts them first (float64 for a high-precision reference). Sparse grads are densified, because
    ``vector_norm`` and ``get_total_norm`` reject sparse tensors. Params without a grad are None and
    left out of the global norm, as ``get_total_norm`` over the existing grads would.
    """
    layers, grads = {}, []
    for name, p in named_params:
        if p.grad is None:
            layers[name] = None
            continue
        g = p.grad.to_dense() if p.grad.is_sparse else p.grad
        if dtype is not None:
            g = g.to(dtype)
        if scale is not None:
            g = g / scale
        layers[name] = torch.linalg.vector_norm(g).item()
        grads.append(g)
    total = get_total_norm(grads).item() if grads else None
    return total, layers


def emit(case, step, **values):
    """Print one reference line."""
    print("REF", json.dumps({"case": case, "step": step, **values}), flush=True)


def ref(case, step, named_params, loss, **values):
    """Emit the global and per-layer norms of the current grads plus the loss and anything else."""
    named_params = list(named_params)
    total, layers = grad_norms(named_params)
    if isinstance(loss, torch.Tensor):
        loss = loss.detach().item()
    emit(case, step, norm=total, layers=layers, loss=loss, **values)


def mlp(d_in=8, d_hidden=16, d_out=4):
    return torch.nn.Sequential(torch.nn.Linear(d_in, d_hidden), torch.nn.Tanh(), torch.nn.Linear(d_hidden, d_out))


class Named(torch.nn.Module):
    """A root module whose parameter names start with ``case.``: several sub-cases share a process."""

    def __init__(self, case, module):
        super().__init__()
        self.case = case
        self.add_module(case, module)

    def forward(self, *args, **kwargs):
        return getattr(self, self.case)(*args, **kwargs)


def named(case, module):
    return Named(case, module)
