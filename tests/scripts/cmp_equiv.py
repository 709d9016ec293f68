"""A small seeded training loop that clips *in the script*, for the compare-mode equivalence test.

    python cmp_equiv.py --mode plain --clip 0.05 --out a.pt                       # the script clips
    python -m gradscope profile --max-norm 0.05 cmp_equiv.py --mode plain --out b.pt  # gradscope clips

Both must end with bit-identical parameters. Each mode clips the way its recipe says to:
plain       backward, clip, step
accum       4 micro-batches of loss/4, clip the accumulated gradient, step
scaler      GradScaler: scale(loss).backward(), unscale_, clip, scaler.step, update
fused       as scaler, with AdamW(fused=True)
lbfgs       LBFGS: clip inside the closure, after backward
"""
import argparse

import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--mode", choices=["plain", "accum", "scaler", "fused", "lbfgs"], required=True)
parser.add_argument("--clip", type=float, default=0.0, help="max_norm for clip_grad_norm_; 0 = no clipping")
parser.add_argument("--steps", type=int, default=12)
parser.add_argument("--out", required=True)
args = parser.parse_args()

torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
data_x = torch.randn(64, 6)
data_y = data_x.sum(dim=1, keepdim=True) * 3.0  # large targets: big gradients, so clipping acts


def clip() -> None:
    if args.clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(i * 8, i * 8 + 8) % len(data_x)
    return data_x[rows], data_y[rows]


def loss_of(i: int) -> torch.Tensor:
    x, y = batch(i)
    return nn.functional.mse_loss(model(x), y)


if args.mode in ("plain", "accum"):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    micro = 4 if args.mode == "accum" else 1
    for step in range(args.steps):
        opt.zero_grad()
        for k in range(micro):
            (loss_of(step * micro + k) / micro).backward()
        clip()
        opt.step()
elif args.mode in ("scaler", "fused"):
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=args.mode == "fused")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    for step in range(args.steps):
        opt.zero_grad()
        scaler.scale(loss_of(step)).backward()
        if args.clip > 0:
            scaler.unscale_(opt)
            clip()
        scaler.step(opt)
        scaler.update()
else:
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4, history_size=5)
    for step in range(args.steps):

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = loss_of(step)
            loss.backward()
            clip()
            return loss

        opt.step(closure)

torch.save(model.state_dict(), args.out)
