"""Reference workloads for the overhead benchmark: each builds its model and makes its own data.

A workload is a model, an optimizer, a pool of pre-made batches and a ``step(extra)`` function that
runs one optimizer step as a plain training script writes it::

    opt.zero_grad(set_to_none=True)
    for micro-batch in the step:           # 2 for the GPT (gradient accumulation), else 1
        loss = model(batch) / k
        loss.backward()
    extra()                                # the variant's per-step snippet, or nothing
    opt.step()

Nothing here knows about gradscope: the recorder sees these steps through its global hooks, exactly
as it sees an unmodified script's. Sizes are chosen so that every workload runs on two CPU threads
in seconds; ``quick`` shrinks them to prove the harness works (``make test``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TailTimer:
    """Times the part of a step after its last backward (the snippet, or the recorder's hooks, and
    ``opt.step()``) while ``clock`` is set: what reading the gradients adds or moves, without the
    forward and backward passes whose noise would hide it."""

    clock: Callable[[], float] | None = None
    last: float = 0.0  # seconds, the last step's


@dataclass
class Workload:
    """One reference workload, ready to step."""

    name: str
    title: str  # shown in the table
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[Callable[[], object] | None], None]  # one optimizer step, running extra() before opt.step()
    block: int  # steps per timed block (each variant runs one block per round)
    rounds: int = 9  # interleaved rounds in a full run
    tail: TailTimer = field(default_factory=TailTimer)  # the TailTimer `step` reports to

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def n_tensors(self) -> int:
        return sum(1 for _ in self.model.parameters())


def _cycle(batches: list) -> Callable[[], object]:
    state = [0]

    def next_batch() -> object:
        batch = batches[state[0] % len(batches)]
        state[0] += 1
        return batch

    return next_batch


def _make_step(model: nn.Module, opt: torch.optim.Optimizer, loss_of: Callable[[object], torch.Tensor],
               next_batch: Callable[[], object], tail: TailTimer,
               accumulate: int = 1) -> Callable[[Callable[[], object] | None], None]:
    def step(extra: Callable[[], object] | None = None) -> None:
        opt.zero_grad(set_to_none=True)
        for _ in range(accumulate):
            loss = loss_of(next_batch())
            if accumulate > 1:
                loss = loss / accumulate
            loss.backward()
        clock = tail.clock
        t0 = clock() if clock is not None else 0.0
        if extra is not None:
            extra()
        opt.step()
        if clock is not None:
            tail.last = clock() - t0

    return step


# --------------------------------------------------------------------------------------------------
# LSTM language model (~5M parameters, SGD)
# --------------------------------------------------------------------------------------------------


class LSTMLM(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, num_layers=layers, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out)


def lstm(quick: bool = False, device: str = "cpu") -> Workload:
    vocab, dim, layers, batch, bptt = (500, 32, 1, 4, 8) if quick else (8000, 256, 2, 20, 35)
    model = LSTMLM(vocab, dim, layers).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (batch, bptt + 1), generator=gen).to(device) for _ in range(8)]

    def loss_of(tokens: torch.Tensor) -> torch.Tensor:
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))

    tail = TailTimer()
    return Workload("lstm", "LSTM LM, SGD", model, opt, _make_step(model, opt, loss_of, _cycle(batches), tail),
                    block=3 if quick else 5, rounds=7, tail=tail)


# --------------------------------------------------------------------------------------------------
# GPT-style transformer (~6M parameters, AdamW, gradient accumulation 2)
# --------------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (y.view(b, t, self.heads, d // self.heads).transpose(1, 2) for y in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, block: int, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(block, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied, as GPT-2 does

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def gpt(quick: bool = False, device: str = "cpu") -> Workload:
    vocab, block_size, dim, layers, heads, batch = (256, 16, 32, 2, 2, 2) if quick else (4096, 64, 256, 6, 4, 2)
    model = GPT(vocab, block_size, dim, layers, heads).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (batch, block_size + 1), generator=gen).to(device) for _ in range(8)]

    def loss_of(tokens: torch.Tensor) -> torch.Tensor:
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))

    tail = TailTimer()
    return Workload("gpt", "GPT, AdamW, accum 2", model, opt,
                    _make_step(model, opt, loss_of, _cycle(batches), tail, accumulate=2), block=2 if quick else 3, rounds=5, tail=tail)


# --------------------------------------------------------------------------------------------------
# Tiny MLP (steps well under a millisecond: per-step fixed cost dominates)
# --------------------------------------------------------------------------------------------------


def tiny_mlp(quick: bool = False, device: str = "cpu") -> Workload:
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(64, 32, generator=gen).to(device), torch.randint(0, 10, (64,), generator=gen).to(device))
               for _ in range(8)]

    def loss_of(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    tail = TailTimer()
    return Workload("mlp", "tiny MLP, SGD", model, opt, _make_step(model, opt, loss_of, _cycle(batches), tail),
                    block=20 if quick else 300, rounds=11, tail=tail)


# --------------------------------------------------------------------------------------------------
# ~400 small parameter tensors (per-tensor cost dominates)
# --------------------------------------------------------------------------------------------------


class Residual(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(self.norm(x))


class ManyTensors(nn.Module):
    def __init__(self, dim: int, blocks: int) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.blocks = nn.Sequential(*(Residual(dim) for _ in range(blocks)))
        self.out = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.inp(x)))


def many_tensors(quick: bool = False, device: str = "cpu") -> Workload:
    dim, blocks = (16, 9) if quick else (16, 99)  # 4 tensors per block + 4: 400 tensors at full size
    model = ManyTensors(dim, blocks).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, dim, generator=gen).to(device), torch.randint(0, 10, (32,), generator=gen).to(device))
               for _ in range(8)]

    def loss_of(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    tail = TailTimer()
    return Workload("many", "~400 tensors, SGD+mom", model, opt, _make_step(model, opt, loss_of, _cycle(batches), tail),
                    block=5 if quick else 20, rounds=11, tail=tail)


WORKLOADS: dict[str, Callable[..., Workload]] = {"lstm": lstm, "gpt": gpt, "mlp": tiny_mlp, "many": many_tensors}

__all__ = ["WORKLOADS", "Workload"]
