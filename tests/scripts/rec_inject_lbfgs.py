"""LBFGS (a closure optimizer whose line search re-evaluates the closure), to be run under ``--max-norm``.

Each step prints REF with ``evals`` (closure calls in that step) and ``after`` (get_total_norm of the
grads left by the step's last closure evaluation: gradscope clips after every evaluation, so the line
search, and these, see clipped grads).
"""

import torch
from rec_common import emit, mlp
from torch.nn.utils import get_total_norm

STEPS = 3

torch.manual_seed(0)
model = mlp()
opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4, history_size=5)
x, y = torch.randn(16, 8), torch.randn(16, 4) * 3

for i in range(STEPS):
    evals = 0

    def closure():
        global evals
        evals += 1
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    after = get_total_norm([p.grad for p in model.parameters()]).item()
    emit("lbfgs", i, evals=evals, after=after)
