"""DDP training in the shape of pytorch/examples' ddp-tutorial-series multigpu_torchrun.py, on CPU (gloo).

Run by torchrun (RANK/WORLD_SIZE in the environment) or, with ``spawn``, by torch.multiprocessing.spawn.
Prints ``REF {"rank": r, "step": s, "norm": n}`` with what clip_grad_norm_ returned on each rank.
Arguments: [steps] [crash-rank] [spawn]. A crash rank raises at step 3.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


class Trainer:
    def __init__(self, model: nn.Module, rank: int) -> None:
        self.rank = rank
        self.model = DDP(model)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05)

    def _run_batch(self, step: int, source: torch.Tensor, targets: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        loss = nn.functional.cross_entropy(self.model(source), targets)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=100.0)
        # one write per line: torchrun runs python -u, where print writes the text and its newline apart
        sys.stdout.write("REF " + json.dumps({"rank": self.rank, "step": step, "norm": norm.item()}) + "\n")
        sys.stdout.flush()
        self.optimizer.step()

    def train(self, steps: int, crash_rank: int) -> None:
        gen = torch.Generator().manual_seed(100 + self.rank)
        for step in range(steps):
            if step == 3 and self.rank == crash_rank:
                raise RuntimeError(f"rank {self.rank} fails on purpose")
            source = torch.randn(16, 20, generator=gen)
            targets = torch.randint(0, 4, (16,), generator=gen)
            self._run_batch(step, source, targets)


def main(rank: int, world_size: int, steps: int, crash_rank: int) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    Trainer(model, rank).train(steps, crash_rank)
    dist.destroy_process_group()


if __name__ == "__main__":
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    crash = int(sys.argv[2]) if len(sys.argv) > 2 else -1
    if len(sys.argv) > 3 and sys.argv[3] == "spawn":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        mp.spawn(main, args=(2, steps, crash), nprocs=2)
    else:
        main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), steps, crash)
