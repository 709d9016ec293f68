"""Plain training with many optimizer flavours, one sub-case after another (argv: the sub-cases).

Sub-cases: {sgd,adam,adamw}-{foreach,forloop,fused}; adam-tensorlr (lr as a Tensor); subclass (SGD subclass whose step calls
super().step()); outer (an Optimizer that wraps and steps another); noinit (a wrapper that never
calls Optimizer.__init__, like accelerate's AcceleratedOptimizer); lbfgs (step(closure), max_iter=4);
adam-closure (Adam.step(closure=...)).
"""

import sys

import torch
from rec_common import emit, mlp, named, ref

STEPS = 3
KINDS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
IMPLS = {"foreach": {"foreach": True}, "forloop": {"foreach": False}, "fused": {"fused": True}}


class SGDSub(torch.optim.SGD):
    def step(self, closure=None):
        return super().step(closure)


class Outer(torch.optim.Optimizer):
    """Lookahead-style: a real Optimizer whose step runs an inner optimizer's step."""

    def __init__(self, inner):
        self.inner = inner
        super().__init__([p for g in inner.param_groups for p in g["params"]], {"lr": inner.param_groups[0]["lr"]})

    def step(self, closure=None):
        return self.inner.step(closure)


class NoInit(torch.optim.Optimizer):
    """accelerate's AcceleratedOptimizer pattern: an Optimizer subclass that skips Optimizer.__init__."""

    def __init__(self, inner):
        self.optimizer = inner

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def step(self, closure=None):
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none)


def make_optimizer(case, params):
    if "-" in case and case.split("-")[0] in KINDS and case.split("-")[1] in IMPLS:
        kind, impl = case.split("-")
        return KINDS[kind](params, lr=0.05, **IMPLS[impl])
    if case == "adam-tensorlr":  # a Tensor lr: schedulers change it in place (fill_)
        return torch.optim.Adam(params, lr=torch.tensor(0.05))
    if case == "subclass":
        return SGDSub(params, lr=0.05, momentum=0.9)
    if case == "outer":
        return Outer(torch.optim.SGD(params, lr=0.05))
    if case == "noinit":
        return NoInit(torch.optim.Adam(params, lr=0.05))
    raise SystemExit(f"unknown case {case}")


def plain(case):
    model = named(case, mlp())
    opt = make_optimizer(case, model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt.optimizer if case == "noinit" else opt, step_size=1, gamma=0.5)
    for i in range(STEPS):
        x, y = torch.randn(6, 8), torch.randn(6, 4)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        ref(case, i, model.named_parameters(), loss, lr=float(opt.param_groups[0]["lr"]))
        opt.step()
        sched.step()
        print(f"{case} step {i} loss {loss.item():.6f}")


def closure_case(case):
    model = named(case, mlp())
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    if case == "lbfgs":
        opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for i in range(STEPS):
        evals = [0]

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            evals[0] += 1
            if evals[0] == 1:  # the step's gradient: the first evaluation (LBFGS re-evaluates in its loop)
                ref(case, i, model.named_parameters(), loss, lr=opt.param_groups[0]["lr"])
            return loss

        if case == "lbfgs":
            opt.step(closure)
        else:
            opt.step(closure=closure)
        emit(case + ":evals", i, evals=evals[0])


if __name__ == "__main__":
    torch.manual_seed(0)
    for case in sys.argv[1:]:
        if case in ("lbfgs", "adam-closure"):
            closure_case(case)
        else:
            plain(case)
