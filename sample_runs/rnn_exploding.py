"""A vanilla RNN whose gradients explode: the classic case for gradient clipping.

A tanh RNN (64 units) learns to predict the next value of sine waves of random frequency and phase,
60 steps long. Its recurrent matrix starts with a spectral radius of 2 (expanding dynamics), and it
trains with plain SGD: the textbook recipe for exploding gradients through time (Pascanu, Mikolov &
Bengio 2013). At a constant lr, the first ~70 steps are rough: the gradient norm swings between
1 and 40 (10-100x the norm the run later settles at), the updates throw the weights off "cliffs",
and the loss spikes before it recovers; after that the norm stays around 0.1-0.5 with rare jumps.
`gradscope recommend` says so (its early steps hold the steps above max_norm, and the recommended
p95 guards exactly those updates). Clipping with `--clip` (or `gradscope compare`) bounds them and
the loss curve goes smooth.

Data is generated in the script (no downloads); everything is seeded.

    python sample_runs/rnn_exploding.py                 # train, printing the loss every 50 steps
    python sample_runs/rnn_exploding.py --clip 2.5      # the same, with clip_grad_norm_(..., 2.5)
    gradscope profile sample_runs/rnn_exploding.py      # record every step's gradient norms
"""

import argparse

import torch
from torch import nn


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=0, help="seed for the weights and the data")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    parser.add_argument("--clip", type=float, default=None, help="clip_grad_norm_ max_norm (default: no clipping)")
    parser.add_argument("--log-every", type=int, default=50, help="print the loss every this many steps")
    return parser.parse_args()


class SineRNN(nn.Module):
    """tanh RNN -> linear head -> tanh: predicts x[t+1] from x[0..t]."""

    def __init__(self, hidden: int = 64, radius: float = 2.0) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)
        with torch.no_grad():
            # Spectral radius 2 > 1: small perturbations grow through time, and so do gradients.
            weight = torch.randn(hidden, hidden)
            self.rnn.weight_hh_l0.copy_(weight / torch.linalg.eigvals(weight).abs().max() * radius)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)  # (B, T, H)
        return torch.tanh(self.head(out))  # (B, T, 1)


def sine_batch(gen: torch.Generator, batch: int = 64, length: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    """Sine waves of random frequency and phase: inputs (B, T, 2) and next-step targets (B, T, 1)."""
    freq = 0.1 + 0.4 * torch.rand(batch, 1, generator=gen)
    phase = 6.283 * torch.rand(batch, 1, generator=gen)
    wave = torch.sin(freq * torch.arange(length + 1).float() + phase)  # (B, T+1)
    inputs = torch.stack([wave[:, :-1], torch.zeros(batch, length)], dim=-1)
    return inputs, wave[:, 1:, None]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)  # tiny model: one thread is fastest and keeps runs reproducible
    torch.manual_seed(args.seed)
    data = torch.Generator().manual_seed(args.seed)
    model = SineRNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    for step in range(args.steps):
        inputs, targets = sine_batch(data)
        loss = nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        if args.clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.6f}")  # .item() syncs: only on logging steps
    print(f"final loss {loss.item():.6f}")


if __name__ == "__main__":
    main()
