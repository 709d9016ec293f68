"""A tiny GAN for gradscope compare's tests: D and G in one module, two Adam optimizers, own losses.

    python cmp_gan.py --steps 12      # optimizer 0 updates D (parameters D.*), optimizer 1 updates G (G.*)
"""
import argparse

import torch
from torch import nn

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=12)
args = parser.parse_args()


class GAN(nn.Module):
    def __init__(self):
        super().__init__()
        self.G = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        self.D = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))


torch.set_num_threads(1)
torch.manual_seed(0)
gan = GAN()
optD = torch.optim.Adam(gan.D.parameters(), lr=1e-3, betas=(0.5, 0.999))
optG = torch.optim.Adam(gan.G.parameters(), lr=1e-3, betas=(0.5, 0.999))
criterion = nn.BCEWithLogitsLoss()
ones, zeros = torch.ones(16, 1), torch.zeros(16, 1)
for i in range(args.steps):
    optD.zero_grad()
    fake = gan.G(torch.randn(16, 4))
    errD = criterion(gan.D(torch.randn(16, 2) * 3 + 2), ones) + criterion(gan.D(fake.detach()), zeros)
    errD.backward()
    optD.step()
    optG.zero_grad()
    errG = criterion(gan.D(fake), ones)
    errG.backward()
    optG.step()
    print(f"[{i}] Loss_D {errD.item():.4f} Loss_G {errG.item():.4f}", flush=True)
