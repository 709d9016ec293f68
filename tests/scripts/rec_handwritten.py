"""The classic word-language-model loop (pytorch/examples word_language_model): no torch.optim at all.

argv: the sub-cases, run one after the other in one process (still no torch.optim optimizer in it).
clip: model.zero_grad(); forward; backward; clip_grad_norm_(params, 0.25); p.data.add_(p.grad, alpha=-lr)
zerograd: the same loop without clipping: the only trace of an update is the next model.zero_grad()
value: the same loop clipping by value, clip_grad_value_(params, 0.01) (REF max_abs: each layer's pre-clip max |g|)
The LSTM LM ties its decoder to its encoder (--tied).
"""

import sys

import torch
from rec_common import emit, grad_norms, named
from torch import nn

NTOKENS, BPTT, BATCH, STEPS = 30, 5, 4, 4
LR, CLIP, CLIP_VALUE = 2.0, 0.25, 0.01


class RNNModel(nn.Module):
    def __init__(self, ntoken, ninp=16, nhid=16, tie_weights=True):
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, 1)
        self.decoder = nn.Linear(nhid, ntoken)
        if tie_weights:
            self.decoder.weight = self.encoder.weight
        self.nhid = nhid

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        return self.decoder(self.drop(output)).view(-1, self.decoder.out_features), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        return (weight.new_zeros(1, bsz, self.nhid), weight.new_zeros(1, bsz, self.nhid))


def repackage_hidden(h):
    return h.detach() if isinstance(h, torch.Tensor) else tuple(repackage_hidden(v) for v in h)


def train(mode):
    model = named(mode, RNNModel(NTOKENS))
    criterion = nn.CrossEntropyLoss()
    corpus = torch.randint(0, NTOKENS, (BPTT * STEPS + 1, BATCH))
    hidden = getattr(model, mode).init_hidden(BATCH)
    for i in range(STEPS):
        data, targets = corpus[i * BPTT:(i + 1) * BPTT], corpus[i * BPTT + 1:(i + 1) * BPTT + 1].reshape(-1)
        hidden = repackage_hidden(hidden)
        model.zero_grad()
        output, hidden = model(data, hidden)
        loss = criterion(output, targets)
        loss.backward()
        norm, layers = grad_norms(model.named_parameters())  # pre-clip
        max_abs = {name: p.grad.abs().max().item() for name, p in model.named_parameters()}
        returned = None
        if mode == "clip":
            returned = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item()
        elif mode == "value":
            torch.nn.utils.clip_grad_value_(model.parameters(), CLIP_VALUE)
        applied, _ = grad_norms(model.named_parameters())
        emit(mode, i, norm=norm, layers=layers, loss=loss.item(), returned=returned, applied=applied, max_abs=max_abs)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-LR)
        print(f"| {mode} | batch {i} | lr {LR:.2f} | loss {loss.item():5.2f}")


if __name__ == "__main__":
    torch.manual_seed(0)
    for mode in sys.argv[1:]:
        train(mode)
