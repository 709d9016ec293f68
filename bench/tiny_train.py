"""A tiny training script for ``bench/run.py --quick``: proves the end-to-end harness in seconds."""

import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(32, 8), torch.randn(32, 1)
for _ in range(50):
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
