"""Plain training under torch.compile (argv: the sub-cases).

model: torch.compile(model) (parameter names gain ``_orig_mod.``).
step: torch.compile(opt.step) (dynamo traces the optimizer step, and would trace global hooks).

Inductor works on this CPU but costs ~30 s to compile even a tiny MLP, so the model is compiled with
backend="aot_eager" (dynamo + AOTAutograd, the same module wrapper and graph capture, no codegen)
and the step with backend="eager" (dynamo only). The wrapper, the names and the hooks are the same.
REC_COMPILE_BACKEND=inductor runs both with inductor (slow; checked by hand).
"""

import os
import sys

import torch
from rec_common import mlp, named, ref

STEPS = 3


def run(case):
    model = named(case, mlp())
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    forward, step = model, opt.step
    if case == "model":
        forward = torch.compile(model, backend=os.environ.get("REC_COMPILE_BACKEND", "aot_eager"))
        assert all(n.startswith("_orig_mod.") for n, _ in forward.named_parameters())
    else:
        step = torch.compile(opt.step, backend=os.environ.get("REC_COMPILE_BACKEND", "eager"))
    for i in range(STEPS):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(forward(torch.randn(6, 8)), torch.randn(6, 4))
        loss.backward()
        ref(case, i, model.named_parameters(), loss)  # the uncompiled module's names: no _orig_mod.
        step()


if __name__ == "__main__":
    torch.manual_seed(0)
    for case in sys.argv[1:]:
        run(case)
