"""Tiny causal transformer trained with a high learning rate and no warmup.

What it shows
-------------
A 2-layer post-LayerNorm transformer language model learns a synthetic
"reverse the prefix" task. It uses AdamW with a large constant learning rate and
*no warmup*, plus gradient accumulation over ``--accum`` micro-batches (each
micro-batch loss is divided by ``accum`` and backpropagated; one
``opt.step()`` per accumulated batch). Post-LN transformers are known to be
unstable early in training without warmup (Xiong et al., 2020): Adam's
second-moment estimates are still tiny, so the first updates are large and the
gradient norm spikes during the first few dozen steps.

Run it
------
    python sample_runs/transformer_no_warmup.py
    python sample_runs/transformer_no_warmup.py --clip 1.0
    gradscope profile sample_runs/transformer_no_warmup.py

No data is downloaded: every batch is generated from a seeded
``torch.Generator``, so a run is deterministic for a given ``--seed`` on CPU.
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 16  # token ids 0..13 are content, 14 is the separator, 15 is unused
SEP = 14
PREFIX_LEN = 15  # sequence = prefix, SEP, reversed prefix  -> 31 tokens


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (no warmup)")
    p.add_argument("--clip", type=float, default=None, help="clip_grad_norm_ max_norm (default: no clipping)")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch")
    p.add_argument("--log-every", type=int, default=20)
    return p.parse_args()


def make_batch(gen, batch_size):
    """Prefix of random tokens, a separator, then the prefix reversed.

    Returns (inputs, targets, loss_mask). Only the reversed half is predictable,
    so the loss is taken on those positions only.
    """
    prefix = torch.randint(0, SEP, (batch_size, PREFIX_LEN), generator=gen)
    sep = torch.full((batch_size, 1), SEP)
    seq = torch.cat([prefix, sep, prefix.flip(1)], dim=1)
    inputs, targets = seq[:, :-1], seq[:, 1:]
    mask = torch.zeros_like(targets, dtype=torch.bool)
    mask[:, PREFIX_LEN:] = True  # positions whose next token is in the reversed half
    return inputs, targets, mask


class TinyLM(nn.Module):
    def __init__(self, d_model=64, n_heads=4, n_layers=2, max_len=64):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        # norm_first=False is the original post-LN layout, the one that needs warmup.
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, dim_feedforward=4 * d_model, dropout=0.0,
            batch_first=True, norm_first=False,
        )
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, VOCAB)

    def forward(self, x):
        t = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(t))
        causal = nn.Transformer.generate_square_subsequent_mask(t)
        h = self.blocks(h, mask=causal, is_causal=True)
        return self.head(h)


def micro_batch_loss(model, gen, batch_size):
    inputs, targets, mask = make_batch(gen, batch_size)
    logits = model(inputs)
    return F.cross_entropy(logits[mask], targets[mask])


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # tiny model: one thread is as fast and fully deterministic
    gen = torch.Generator().manual_seed(args.seed)

    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)

    for step in range(args.steps):
        opt.zero_grad()
        for _ in range(args.accum):
            loss = micro_batch_loss(model, gen, args.batch_size) / args.accum
            loss.backward()
        if args.clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            # reports the last micro-batch's loss, rescaled to a per-sequence mean
            print(f"step {step} loss {loss.item() * args.accum:.6f}")

    with torch.no_grad():
        final = sum(micro_batch_loss(model, gen, args.batch_size).item() for _ in range(4)) / 4
    print(f"final loss {final:.6f}")


if __name__ == "__main__":
    main()
