"""Tiny 2-D GAN with two optimizers: discriminator gradient spikes.

What it shows
-------------
A generator and a discriminator (small MLPs) play the usual minimax game on a
synthetic mixture of 8 sharp Gaussians arranged on a ring. Each iteration does
one discriminator step (``d_opt.step()``) and then one generator step
(``g_opt.step()``), each with its own Adam optimizer, so a profiler sees two
optimizer steps per iteration.

The modes are very narrow and both players use a fairly high learning rate
with no gradient penalty, so the discriminator keeps becoming over-confident
around some modes. When the generator then moves samples across one of those
steep decision boundaries the discriminator loss jumps and its gradient norm
spikes far above its running median.

Run it
------
    python sample_runs/gan_two_optimizers.py
    python sample_runs/gan_two_optimizers.py --clip 1.0
    gradscope profile sample_runs/gan_two_optimizers.py

With ``--clip X`` the script clips each network's gradients to norm X right
before its own optimizer step. Data comes from a seeded ``torch.Generator``:
nothing is downloaded and a run is deterministic for a given ``--seed``.
"""

import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

NOISE_DIM = 8


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1500, help="iterations (one D step + one G step each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate for both players")
    p.add_argument("--clip", type=float, default=None, help="clip_grad_norm_ max_norm (default: no clipping)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--log-every", type=int, default=100)
    return p.parse_args()


def sample_real(gen, n, modes=8, radius=2.0, std=0.02):
    """Mixture of `modes` narrow Gaussians evenly spaced on a circle."""
    k = torch.randint(0, modes, (n,), generator=gen)
    angle = 2 * math.pi * k.float() / modes
    centers = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    return centers + std * torch.randn(n, 2, generator=gen)


def mlp(d_in, d_out, hidden=128):
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, d_out),
    )


def maybe_clip(params, max_norm):
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # tiny MLPs: one thread is as fast and fully deterministic
    gen = torch.Generator().manual_seed(args.seed)

    G = mlp(NOISE_DIM, 2)
    D = mlp(2, 1)
    # beta1=0.5 is the usual GAN setting; the high lr is what makes D overshoot.
    g_opt = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.5, 0.999))
    d_opt = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(0.5, 0.999))
    ones = torch.ones(args.batch_size, 1)
    zeros = torch.zeros(args.batch_size, 1)

    for step in range(args.steps):
        # --- discriminator step: real -> 1, fake -> 0 ---
        real = sample_real(gen, args.batch_size)
        fake = G(torch.randn(args.batch_size, NOISE_DIM, generator=gen)).detach()
        d_loss = (F.binary_cross_entropy_with_logits(D(real), ones)
                  + F.binary_cross_entropy_with_logits(D(fake), zeros))
        d_opt.zero_grad()
        d_loss.backward()
        maybe_clip(D.parameters(), args.clip)
        d_opt.step()

        # --- generator step (non-saturating loss): make D call fakes real ---
        fake = G(torch.randn(args.batch_size, NOISE_DIM, generator=gen))
        g_loss = F.binary_cross_entropy_with_logits(D(fake), ones)
        g_opt.zero_grad()
        g_loss.backward()
        maybe_clip(G.parameters(), args.clip)
        g_opt.step()

        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step} loss {d_loss.item():.6f} g_loss {g_loss.item():.6f}")

    print(f"final loss {d_loss.item():.6f} g_loss {g_loss.item():.6f}")


if __name__ == "__main__":
    main()
