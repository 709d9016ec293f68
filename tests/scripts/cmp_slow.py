"""A tiny seeded training loop whose length and pace come from the environment (compare's signal tests).

    CMP_SLOW_STEPS=5 python cmp_slow.py                        # 5 quick steps
    CMP_SLOW_STEPS=100000 CMP_SLOW_DELAY=0.05 python cmp_slow.py   # trains until stopped
"""
import os
import time

import torch

torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Linear(2, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
delay = float(os.environ.get("CMP_SLOW_DELAY", "0"))
for step in range(int(os.environ.get("CMP_SLOW_STEPS", "5"))):
    loss = model(torch.randn(4, 2)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    time.sleep(delay)
