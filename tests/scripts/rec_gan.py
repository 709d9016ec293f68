"""A plain GAN (DCGAN's loop on 2-D points): D and G, two Adam optimizers, each with its own losses.

Both networks are nn.Sequential with the same layout, so their parameter names are the same
("0.weight", ..., as in DCGAN's ``main.0.weight``); only the shapes differ.
"""

import torch
from rec_common import ref
from torch import nn

STEPS = 3

torch.manual_seed(0)
netG = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
netD = nn.Sequential(nn.Linear(2, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
optD = torch.optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
optG = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
criterion = nn.BCEWithLogitsLoss()
ones, zeros = torch.ones(8, 1), torch.zeros(8, 1)

for i in range(STEPS):
    # (1) update D: maximize log(D(x)) + log(1 - D(G(z))), two backward calls
    netD.zero_grad()
    errD_real = criterion(netD(torch.randn(8, 2) + 2), ones)
    errD_real.backward()
    fake = netG(torch.randn(8, 4))
    errD_fake = criterion(netD(fake.detach()), zeros)
    errD_fake.backward()
    ref("D", i, netD.named_parameters(), errD_real.item() + errD_fake.item(),
        shapes=[list(p.shape) for p in netD.parameters()])
    optD.step()
    # (2) update G: maximize log(D(G(z)))
    netG.zero_grad()
    errG = criterion(netD(fake), ones)
    errG.backward()
    ref("G", i, netG.named_parameters(), errG, shapes=[list(p.shape) for p in netG.parameters()])
    optG.step()
    print(f"[{i}] Loss_D: {errD_real.item() + errD_fake.item():.4f} Loss_G: {errG.item():.4f}")
