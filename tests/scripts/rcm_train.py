"""Small trainings for recommend's caveats, one per run (argv[1] names it; argv[2], when given, the steps).

Prints reference lines ``REF {json}`` computed with torch itself: LBFGS's closure calls, and each
step's largest |gradient| before clip_grad_value_.

lbfgs: LBFGS on a least-squares problem, 2 steps of step(closure), 20 evaluations each at most.
clip-value: SGD on an MLP that clips by value, clip_grad_value_(params, 0.5), every step (some steps exceed it).
constant: SGD at a constant lr.
warmup: the same with a linear lr warm-up over the first 10 steps (LambdaLR).
"""

import json
import sys

import torch
from torch import nn

CLIP_VALUE = 0.5
WARMUP_STEPS = 10


def lbfgs(steps):
    x, w_true = torch.randn(64, 8), torch.randn(8, 1)
    y = x @ w_true
    model = nn.Linear(8, 1)
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=20)

    calls = [0]

    def closure():
        calls[0] += 1
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    print("REF " + json.dumps({"case": "lbfgs", "evaluations": calls[0]}))


def sgd(case, steps):
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    warmup = case == "warmup"
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / WARMUP_STEPS) if warmup else 1.0)
    for _ in range(steps):
        x = torch.randn(32, 8)
        loss = nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        if case == "clip-value":
            largest = max(p.grad.abs().max().item() for p in model.parameters())
            print("REF " + json.dumps({"case": case, "max_abs": largest}))
            nn.utils.clip_grad_value_(model.parameters(), CLIP_VALUE)
        opt.step()
        sched.step()


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    case = sys.argv[1]
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else (2 if case == "lbfgs" else 60)
    if case == "lbfgs":
        lbfgs(steps)
    elif case in ("clip-value", "constant", "warmup"):
        sgd(case, steps)
    else:
        raise SystemExit(f"unknown case {case}")


if __name__ == "__main__":
    main()
