"""Hand-written update loops (no torch.optim), to be run under ``--max-norm``: argv is the one mode.

clip: the word-language-model loop: zero_grad, forward, backward, clip_grad_norm_(params, 0.25), p.data.add_
noclip: the same loop without a clip call: gradscope's injection point is the end of the one backward
accum: two backward calls per update (two half batches) and no clip call: no point is correct

Each update prints REF with ``pre`` (get_total_norm and per-layer norms of the update's gradients as
backward will make them, from torch.autograd.grad before the backward; accum: None), ``applied`` (the
global norm of the grads the update consumes) and ``returned`` (what clip_grad_norm_ returned, clip only).
"""

import sys

import torch
from rec_common import emit, named
from rec_handwritten import RNNModel, repackage_hidden
from torch import nn
from torch.nn.utils import get_total_norm

NTOKENS, BPTT, BATCH, STEPS = 30, 5, 4, 4
LR, CLIP = 2.0, 0.25


def pre_clip(loss, named_params):
    """The grads this loss's backward will give (the loop zeroes them first), with torch's own functions."""
    names, params = zip(*named_params, strict=True)
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    layers = {name: torch.linalg.vector_norm(g).item() for name, g in zip(names, grads, strict=True)}
    return get_total_norm(grads).item(), layers


def update(model, data, targets, hidden, criterion, mode):
    if mode == "accum":
        loss = 0.0
        for half in (slice(0, BATCH // 2), slice(BATCH // 2, BATCH)):
            out, _ = model(data[:, half], tuple(h[:, half] for h in hidden))
            part = criterion(out, targets[:, half].reshape(-1)) / 2
            part.backward()
            loss += part.item()
        return loss, None, None, hidden
    output, hidden = model(data, hidden)
    loss = criterion(output, targets.reshape(-1))
    pre = pre_clip(loss, list(model.named_parameters()))
    loss.backward()
    returned = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item() if mode == "clip" else None
    return loss.item(), pre, returned, hidden


def train(mode):
    torch.manual_seed(0)
    model = named(mode, RNNModel(NTOKENS))
    criterion = nn.CrossEntropyLoss()
    corpus = torch.randint(0, NTOKENS, (BPTT * STEPS + 1, BATCH))
    hidden = getattr(model, mode).init_hidden(BATCH)
    for i in range(STEPS):
        data, targets = corpus[i * BPTT:(i + 1) * BPTT], corpus[i * BPTT + 1:(i + 1) * BPTT + 1]
        hidden = repackage_hidden(hidden)
        model.zero_grad()
        loss, pre, returned, hidden = update(model, data, targets, hidden, criterion, mode)
        applied = get_total_norm([p.grad for p in model.parameters()]).item()
        norm, layers = pre if pre is not None else (None, None)
        emit(mode, i, norm=norm, layers=layers, loss=loss, applied=applied, returned=returned)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-LR)


if __name__ == "__main__":
    train(sys.argv[1])
