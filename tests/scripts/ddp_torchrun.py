"""DDP under torchrun, in the shape of pytorch/examples' ddp-tutorial-series multigpu_torchrun.py (gloo, CPU).

Rank 0 saves a snapshot after each epoch, and there is no barrier before destroy_process_group: the
ranks reach their end at different moments, as in most real scripts. With ``--ref`` each rank prints
``REF {json}`` with what clip_grad_norm_ returned at each step.
Args: ``EPOCHS STEPS_PER_EPOCH [--ref]``.
"""

import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from datautils import MyTrainDataset


def ddp_setup() -> None:
    init_process_group(backend="gloo")


class Trainer:
    def __init__(self, model: torch.nn.Module, train_data: DataLoader, optimizer: torch.optim.Optimizer,
                 snapshot_path: str, ref: bool) -> None:
        self.rank = int(os.environ["RANK"])
        self.model = DDP(model)
        self.train_data = train_data
        self.optimizer = optimizer
        self.snapshot_path = snapshot_path
        self.ref = ref
        self.step = 0

    def _run_batch(self, source: torch.Tensor, targets: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        output = self.model(source)
        loss = F.cross_entropy(output, targets)
        loss.backward()
        if self.ref:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1e9)
            line = json.dumps({"case": "ddp", "rank": self.rank, "step": self.step, "norm": norm.item()})
            sys.stdout.write(f"REF {line}\n")  # one write: torchrun runs python -u and the ranks share the pipe
        self.optimizer.step()
        self.step += 1

    def _run_epoch(self, epoch: int) -> None:
        b_sz = len(next(iter(self.train_data))[0])
        print(f"[RANK{self.rank}] Epoch {epoch} | Batchsize: {b_sz} | Steps: {len(self.train_data)}")
        self.train_data.sampler.set_epoch(epoch)
        for source, targets in self.train_data:
            self._run_batch(source, targets)

    def _save_snapshot(self, epoch: int) -> None:
        torch.save({"MODEL_STATE": self.model.module.state_dict(), "EPOCHS_RUN": epoch}, self.snapshot_path)
        print(f"Epoch {epoch} | Training snapshot saved at {self.snapshot_path}")

    def train(self, max_epochs: int) -> None:
        for epoch in range(max_epochs):
            self._run_epoch(epoch)
            if self.rank == 0:
                self._save_snapshot(epoch)


def main(epochs: int, steps: int, ref: bool, batch_size: int = 32) -> None:
    ddp_setup()
    torch.manual_seed(0)
    dataset = MyTrainDataset(steps * batch_size * 2)  # two ranks: `steps` batches each per epoch
    model = torch.nn.Linear(20, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loader = DataLoader(dataset, batch_size=batch_size, pin_memory=True, shuffle=False,
                        sampler=DistributedSampler(dataset))
    snapshot = os.path.join(os.environ.get("SNAPSHOT_DIR", "."), "snapshot.pt")
    trainer = Trainer(model, loader, optimizer, snapshot, ref)
    trainer.train(epochs)
    destroy_process_group()  # the DDP model (and its reducer, which holds the group) is freed after it


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), "--ref" in sys.argv[3:])
