"""DDP started by the script itself with torch.multiprocessing.spawn, in the shape of pytorch/examples'
ddp-tutorial-series multigpu.py (gloo, CPU, 2 ranks).

Each rank prints ``REF {json}`` with what clip_grad_norm_ returned at each step.
Args: ``STEPS PORT``.
"""

import json
import os
import sys

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from datautils import MyTrainDataset


def ddp_setup(rank: int, world_size: int, port: str) -> None:
    os.environ["MASTER_ADDR"] = "localhost"
    os.environ["MASTER_PORT"] = port
    init_process_group(backend="gloo", rank=rank, world_size=world_size)


def main(rank: int, world_size: int, steps: int, port: str, batch_size: int = 4) -> None:
    ddp_setup(rank, world_size, port)
    torch.manual_seed(0)
    dataset = MyTrainDataset(steps * batch_size * world_size)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(20, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=DistributedSampler(dataset))
    for step, (source, targets) in enumerate(loader):
        optimizer.zero_grad()
        F.mse_loss(model(source), targets).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
        # one write per line: the ranks share the pipe (print writes the text and its newline apart under -u)
        sys.stdout.write("REF " + json.dumps({"case": "ddp", "rank": rank, "step": step, "norm": norm.item()}) + "\n")
        sys.stdout.flush()
        optimizer.step()
    destroy_process_group()


if __name__ == "__main__":
    mp.spawn(main, args=(2, int(sys.argv[1]), sys.argv[2]), nprocs=2)
