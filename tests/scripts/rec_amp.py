"""Plain GradScaler training on CPU with one overflow (argv: the sub-cases).

plain: SGD (not fused) under torch.amp.GradScaler("cpu"); at step 1 an inf is put into a gradient,
so scaler.step skips optimizer.step() and update() halves the scale.
plain-unscale: the same with the documented AMP clipping recipe: unscale_, then clip_grad_norm_.
fused: AdamW(fused=True), which GradScaler always steps (grads still scaled, found_inf inside).
fused-unscale: fused AdamW with unscale_ + clip_grad_norm_ by the script.
"""

import sys

import torch
from rec_common import emit, grad_norms, mlp, named

STEPS = 4
INF_AT = 1
MAX_NORM = 0.5


def amp(case):
    model = named(case, mlp())
    if case.startswith("fused"):
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    first = next(model.parameters())
    for i in range(STEPS):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(torch.randn(6, 8)), torch.randn(6, 4))
        scaler.scale(loss).backward()
        if i == INF_AT:
            first.grad[0, 0] = float("inf")  # an fp16-style overflow
        scale = scaler.get_scale()
        extra = {}
        if case.endswith("unscale"):
            scaler.unscale_(opt)
            norm, layers = grad_norms(model.named_parameters())  # unscaled now, before the clip
            returned = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
            applied, _ = grad_norms(model.named_parameters())
            extra = {"returned": returned.item(), "applied": applied}
        else:
            norm, layers = grad_norms(model.named_parameters(), scale=scale)  # what the update consumes
        emit(case, i, norm=norm, layers=layers, loss=loss.item(), scale=scale, **extra)
        scaler.step(opt)
        scaler.update()
        print(f"{case} step {i} loss {loss.item():.6f} scale {scale}")


if __name__ == "__main__":
    torch.manual_seed(0)
    for case in sys.argv[1:]:
        amp(case)
