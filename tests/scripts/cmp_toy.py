"""A tiny regression for gradscope compare's tests: fast, seeded, and able to misbehave on request.

    python cmp_toy.py --steps 40 --lr 0.01            # trains quietly
    python cmp_toy.py --lr 0.6                        # unclipped SGD blows up to inf/NaN; clipped does not
    python cmp_toy.py --crash-seed 1                  # raises at step 3 when torch was seeded with 1
    python cmp_toy.py --slow-seed 1                   # 0.2 s per step when seeded with 1 (for Ctrl-C tests)
"""
import argparse
import time

import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--lr", type=float, default=0.01)
parser.add_argument("--clip", type=float, default=0.0, help="the script's own clip_grad_norm_ max_norm; 0 = none")
parser.add_argument("--crash-seed", type=int, default=None)
parser.add_argument("--slow-seed", type=int, default=None)
parser.add_argument("--no-seed", action="store_true", help="never call torch.manual_seed")
args = parser.parse_args()

torch.set_num_threads(1)
if not args.no_seed:
    torch.manual_seed(0)
seed = torch.initial_seed()
model = nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=args.lr)
for step in range(args.steps):
    x = torch.randn(16, 4) * 3.0
    y = x.sum(dim=1, keepdim=True)
    loss = nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    if args.clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    opt.step()
    print(f"step {step} loss {loss.item():.4g}", flush=True)
    if seed == args.crash_seed and step == 3:
        raise RuntimeError(f"simulated crash at step 3 (seed {seed})")
    if seed == args.slow_seed:
        time.sleep(0.2)
