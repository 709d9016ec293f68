"""The distributed benchmark's workload: DDP over gloo on CPU, a 3-layer MLP (~0.3M parameters) with
clip_grad_norm_, timing its own steps after a warm-up so that start-up is left out.

    torchrun --standalone --nproc-per-node N bench/dist_train.py STEPS

Prints ``STEP_US <rank> <microseconds per step>`` on each rank.
"""

import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

WARMUP = 20


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(rank)
    data = [(torch.randn(32, 256, generator=gen), torch.randint(0, 10, (32,), generator=gen)) for _ in range(8)]
    start = 0.0
    for step in range(WARMUP + steps):
        if step == WARMUP:
            start = time.perf_counter()
        x, y = data[step % len(data)]
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    sys.stdout.write(f"STEP_US {rank} {(time.perf_counter() - start) / steps * 1e6:.1f}\n")  # one write: python -u
    sys.stdout.flush()
    dist.barrier()  # plain gloo can abort a rank whose peer tears down first; the benchmark times steps, not that
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
