"""A vanilla RNN whose gradients explode: the classic case for gradient clipping.

The task is a flip-flop memory. The input is a stream of rare pulses (+1 or -1, about one step in
20, zeros in between), and at every step the target is the sign of the most recent pulse, as a
binary label (chance: a loss of 0.69 nats). A tanh RNN (32 units, recurrent matrix started at
spectral radius 1) reads sequences of 120 steps and is trained with plain SGD at a constant lr, with
binary cross-entropy on every step.

To hold a bit across gaps of tens of steps the network has to grow its recurrent weights until it
becomes bistable. That crossing is a bifurcation of its dynamics, and there the loss surface has a
cliff: the gradient through 120 steps jumps to 10-50x its usual size (~0.2), at steps all through
training, not only at the start (Doya 1993; Pascanu, Mikolov & Bengio 2013). Without clipping, each
such step throws the weights off the cliff: SGD at lr 0.4 stays near chance for the whole run while
the spikes keep inflating the recurrent matrix (spectral radius 1 -> ~2). With clip_grad_norm_ at the
p95 of the unclipped norms (what `gradscope recommend` gives, ~1), the same lr crosses over (radius
~1.4) and learns the task, to a loss near 0.004 in 500 steps. `gradscope compare --max-norm auto`
shows it over paired seeds.

Data is generated in the script (no downloads); everything is seeded.

    python sample_runs/rnn_exploding.py                 # train, printing the loss every 50 steps
    python sample_runs/rnn_exploding.py --clip 1        # the same, with clip_grad_norm_(..., 1)
    gradscope profile sample_runs/rnn_exploding.py      # record every step's gradient norms
"""

import argparse

import torch
from torch import nn

HIDDEN = 32
LENGTH = 120  # steps per sequence: the gradient flows back through all of them
BATCH = 24
PULSE_RATE = 1 / 20  # one pulse every ~20 steps: the bit must be held across gaps of tens of steps


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=0, help="seed for the weights and the data")
    parser.add_argument("--lr", type=float, default=0.4, help="SGD learning rate")
    parser.add_argument("--clip", type=float, default=None, help="clip_grad_norm_ max_norm (default: no clipping)")
    parser.add_argument("--log-every", type=int, default=50, help="print the loss every this many steps")
    return parser.parse_args()


class FlipFlopRNN(nn.Module):
    """tanh RNN -> linear head: one logit per step, "the last pulse was +1"."""

    def __init__(self, hidden: int = HIDDEN, radius: float = 1.0) -> None:
        super().__init__()
        self.rnn = nn.RNN(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)
        with torch.no_grad():
            # Spectral radius 1: at the edge between forgetting and the expanding dynamics that
            # holding a bit needs, and that make gradients grow through time.
            weight = torch.randn(hidden, hidden)
            self.rnn.weight_hh_l0.copy_(weight / torch.linalg.eigvals(weight).abs().max() * radius)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)  # (B, T, H)
        return self.head(out)  # (B, T, 1) logits


def flip_flop_batch(gen: torch.Generator, batch: int = BATCH,
                    length: int = LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Pulse streams (B, T, 1) and the sign of the latest pulse as 0/1 labels (B, T, 1)."""
    pulse = torch.rand(batch, length, generator=gen) < PULSE_RATE
    pulse[:, 0] = True  # every sequence starts with a pulse, so every step has a label
    sign = torch.randint(0, 2, (batch, length), generator=gen).float() * 2 - 1
    inputs = pulse.float() * sign
    latest = torch.cummax(torch.arange(length).expand(batch, length) * pulse.long(), dim=1).values
    target = torch.gather(inputs, 1, latest)  # the sign of the most recent pulse, +-1
    return inputs[..., None], (target[..., None] + 1) / 2


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)  # tiny model: one thread is fastest and keeps runs reproducible
    torch.manual_seed(args.seed)
    data = torch.Generator().manual_seed(args.seed)
    model = FlipFlopRNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    for step in range(args.steps):
        inputs, targets = flip_flop_batch(data)
        loss = nn.functional.binary_cross_entropy_with_logits(model(inputs), targets)
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
