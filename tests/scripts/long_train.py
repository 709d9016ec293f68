"""Train a tiny model until killed (or for argv[1] steps), printing a heartbeat every step."""
import sys
import time

import torch

torch.set_num_threads(1)
torch.manual_seed(0)
limit = int(sys.argv[1]) if len(sys.argv) > 1 else 10**9
model = torch.nn.Linear(8, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
for step in range(limit):
    x = torch.randn(16, 8)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    print("STEP", step, flush=True)
    time.sleep(0.01)
