"""A small, fast training loop for the reliability tests: argparse options, a progress file, a no-grad mode."""
import argparse
import time

import torch

parser = argparse.ArgumentParser(description="tiny training loop")
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--layers", type=int, default=2)
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--progress", default=None, help="append 'step seconds' after every step")
parser.add_argument("--no-grad", action="store_true", help="step the optimizer with no gradient at all")
args = parser.parse_args()

torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(args.layers)])
opt = torch.optim.SGD(model.parameters(), lr=0.01)
progress = open(args.progress, "a", buffering=1) if args.progress else None
t0 = time.perf_counter()
for step in range(args.steps):
    opt.zero_grad()
    if args.no_grad:
        with torch.no_grad():
            model(torch.randn(4, 8)).pow(2).mean()
    else:
        model(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()
    if progress is not None:
        progress.write(f"{step + 1} {time.perf_counter() - t0:.4f}\n")
    if args.sleep:
        time.sleep(args.sleep)
print(f"trained {args.steps} steps")
