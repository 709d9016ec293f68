"""Sharded training on 2 CPU ranks (gloo), in the shapes of public examples, with the full-model truth.

    torchrun --standalone --nproc-per-node 2 dist_shard.py [CASE ...]     (the first five cases by default)
    torchrun --standalone --nproc-per-node 4 dist_shard.py fsdp-tp hsdp

Cases, each with its own model and optimizer, one after the other in one process group:
  fsdp2       fully_shard on each block, then on the root (pytorch/examples distributed/FSDP2); the script
              clips with clip_grad_norm_, which returns a DTensor
  fsdp1       FullyShardedDataParallel with an auto-wrap policy, use_orig_params=False (flat parameters);
              the script clips with model.clip_grad_norm_
  fsdp1-orig  the same with use_orig_params=True, no clipping
  tp          parallelize_module with ColwiseParallel / RowwiseParallel, plus a plain replicated head
  ddp         DistributedDataParallel (whole gradients on every rank)
  fsdp-tp     (4 ranks) tensor parallel within pairs of ranks, FSDP2 across them: a 2-D mesh
  hsdp        (4 ranks) FSDP2 on a (replicate, shard) mesh: duplicate shards weigh 0

The truth: an unsharded replica with the same initial weights, fed every rank's batch (tensor parallel:
the one shared batch), its gradients taken with torch.autograd.grad (no backward hook, no optimizer) and
stepped by hand as the sharded model is. Every rank prints ``REF {json}`` lines with the replica's global
and per-layer pre-clip norms; ``REF {"case": "rank", ...}`` ties a rank to its process id.
"""

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import clip_grad_norm_, get_total_norm

torch.set_num_threads(1)
LR, CLIP, STEPS, BATCH = 0.1, 0.05, 3, 4


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        return torch.tanh(self.lin(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([Block(16) for _ in range(2)])
        self.head = nn.Linear(16, 1)  # a (1, 16) weight: FSDP2 leaves one rank's shard empty

    def forward(self, x):
        x = self.emb(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class TPNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 8)
        self.head = nn.Linear(8, 1)  # not parallelized: a plain tensor, the same on every rank

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def batches(step, world):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(world * BATCH, 8, generator=gen)
    return x, x.sum(dim=1, keepdim=True) * 0.3


def ref(**values):
    """One REF line in one write: both ranks share the pipe, and a write under PIPE_BUF is not interleaved."""
    os.write(1, ("REF " + json.dumps(values) + "\n").encode())


def truth_step(case, step, replica, x, y, clip):
    """The replica's pre-clip norms (printed), then its update as the sharded model's (clipped by ``clip``)."""
    names = [n for n, _ in replica.named_parameters()]
    loss = nn.functional.mse_loss(replica(x), y)
    grads = torch.autograd.grad(loss, list(replica.parameters()))
    total = get_total_norm(grads).item()
    ref(case=case, step=step, rank=dist.get_rank(), grad_norm=total,
        layers={n: torch.linalg.vector_norm(g).item() for n, g in zip(names, grads)})
    coef = min(1.0, clip / (total + 1e-6)) if clip else 1.0
    with torch.no_grad():
        for p, g in zip(replica.parameters(), grads):
            p.sub_(LR * coef * g)


def train(case, model, replica, shared_input=False, clip=None, data=None):
    """``data``: (this rank's batch index, batches per step); every rank its own batch by default."""
    rank, world = dist.get_rank(), dist.get_world_size()
    index, count = data or (rank, world)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        x, y = batches(step, count)
        mine = slice(None) if shared_input else slice(index * BATCH, (index + 1) * BATCH)
        loss = nn.functional.mse_loss(model(x[mine]), y[mine])
        loss.backward()
        if clip == "function":
            total = clip_grad_norm_(model.parameters(), CLIP)  # a DTensor under FSDP2
            full = total.full_tensor() if hasattr(total, "full_tensor") else total
            ref(case=case, step=step, rank=rank, clip_total=full.item())
        elif clip == "method":
            model.clip_grad_norm_(CLIP)  # FSDP1's own: all-reduces the shards' norms
        truth_step(case, step, replica, x, y, CLIP if clip else None)
        opt.step()
        opt.zero_grad()


def run_fsdp2():
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Net()
    replica = copy.deepcopy(model)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    train("fsdp2", model, replica, clip="function")


def run_fsdp1(use_orig_params):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    torch.manual_seed(0)
    net = Net()
    replica = copy.deepcopy(net)
    model = FSDP(net, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=use_orig_params,
                 device_id=torch.device("cpu"))  # CPU + gloo; a GPU script passes its cuda device
    train("fsdp1-orig" if use_orig_params else "fsdp1", model, replica, clip=None if use_orig_params else "method")


def run_tp():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    model = TPNet()
    replica = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    parallelize_module(model, mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    train("tp", model, replica, shared_input=True)


def run_ddp():
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    net = Net()
    replica = copy.deepcopy(net)
    train("ddp", DDP(net), replica)


def run_fsdp_tp():
    """2-D: tensor parallel inside each pair of ranks, FSDP2 across the pairs (torchtitan's layout)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    model = TPNet()
    replica = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    train("fsdp-tp", model, replica, data=(mesh.get_coordinate()[0], 2))


def run_hsdp():
    """2-D: FSDP2 with a (replicate, shard) mesh: each shard held by two ranks, counted once."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Net()
    replica = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("replicate", "shard"))
    fully_shard(model, mesh=mesh)
    train("hsdp", model, replica)


CASES = {"fsdp2": run_fsdp2, "fsdp1": lambda: run_fsdp1(False), "fsdp1-orig": lambda: run_fsdp1(True),
         "tp": run_tp, "ddp": run_ddp, "fsdp-tp": run_fsdp_tp, "hsdp": run_hsdp}  # the last two: 4 ranks

if __name__ == "__main__":
    dist.init_process_group("gloo")
    sys.stdout.flush()
    ref(case="rank", rank=dist.get_rank(), pid=os.getpid())
    for name in sys.argv[1:] or ["fsdp2", "fsdp1", "fsdp1-orig", "tp", "ddp"]:
        CASES[name]()
    dist.destroy_process_group()
