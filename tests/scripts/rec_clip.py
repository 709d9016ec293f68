"""Plain training that clips its own gradients, one sub-case after another (argv: the sub-cases).

norm: clip_grad_norm_(params, 1.5) (some steps clip, some do not).
deprecated: the deprecated torch.nn.utils.clip_grad_norm.
value: clip_grad_value_(params, 0.05).
Each REF line also has ``max_abs`` (every layer's pre-clip max |g|) and ``clamped`` (the global norm of
the grads clamped to +-INJECTED_VALUE, what ``--clip-value INJECTED_VALUE`` leaves the optimizer).
two: two clip_grad_norm_ calls on disjoint parameter sets.
with-norm: get_total_norm, then clip_grads_with_norm_ (the two-step API).
"""

import sys
import warnings

import torch
from rec_common import emit, grad_norms, mlp, named
from torch.nn.utils import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm

STEPS = 4
MAX_NORM = 1.5
CLIP_VALUE = 0.05
INJECTED_VALUE = 0.01  # the --clip-value tests/test_recorder.py injects


def clip(case, model):
    params = list(model.parameters())
    if case == "norm":
        return clip_grad_norm_(params, MAX_NORM).item(), MAX_NORM
    if case == "deprecated":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.nn.utils.clip_grad_norm(params, MAX_NORM).item(), MAX_NORM
    if case == "value":
        clip_grad_value_(params, CLIP_VALUE)
        return None, CLIP_VALUE
    if case == "two":
        first = clip_grad_norm_(params[:2], MAX_NORM / 2).item()
        second = clip_grad_norm_(params[2:], MAX_NORM / 2).item()
        return (first**2 + second**2) ** 0.5, MAX_NORM / 2
    if case == "with-norm":
        total = get_total_norm([p.grad for p in params])
        clip_grads_with_norm_(params, MAX_NORM, total)
        return total.item(), MAX_NORM
    raise SystemExit(f"unknown case {case}")


def train(case):
    model = named(case, mlp())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(STEPS):
        opt.zero_grad()
        x, y = torch.randn(6, 8), torch.randn(6, 4) * (1 + i)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        norm, layers = grad_norms(model.named_parameters())  # pre-clip
        max_abs = {name: p.grad.abs().max().item() for name, p in model.named_parameters()}
        clamped = get_total_norm([p.grad.clamp(-INJECTED_VALUE, INJECTED_VALUE) for p in model.parameters()]).item()
        returned, threshold = clip(case, model)
        applied, _ = grad_norms(model.named_parameters())  # what the optimizer consumes
        emit(case, i, norm=norm, layers=layers, loss=loss.item(), returned=returned, applied=applied,
             threshold=threshold, max_abs=max_abs, clamped=clamped)
        opt.step()


if __name__ == "__main__":
    torch.manual_seed(0)
    for case in sys.argv[1:]:
        train(case)
