"""A hand-written update loop for gradscope compare's tests (word_language_model's loop, no torch.optim).

    python cmp_handwritten.py --steps 20              # backward, then p.data.add_(p.grad, alpha=-lr)
    python cmp_handwritten.py --steps 20 --clip 0.25  # clip_grad_norm_(params, 0.25) before the update
    python cmp_handwritten.py --accum 2               # two backward passes per update, no clip call
"""
import argparse

import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--clip", type=float, default=0.0, help="the script's own clip_grad_norm_ max_norm; 0 = none")
parser.add_argument("--accum", type=int, default=1, help="backward passes (micro-batches) per update")
args = parser.parse_args()

torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1))
for step in range(args.steps):
    model.zero_grad()
    for _ in range(args.accum):
        x = torch.randn(16, 6) * 2.0
        y = x[:, :3].sum(dim=1, keepdim=True)
        loss = nn.functional.mse_loss(model(x), y) / args.accum
        loss.backward()
    if args.clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    for p in model.parameters():
        p.data.add_(p.grad, alpha=-args.lr)
    print(f"step {step} loss {loss.item():.4g}", flush=True)
