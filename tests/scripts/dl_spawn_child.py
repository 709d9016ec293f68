"""A single-process loop whose DataLoader has spawn workers, and which runs a non-torch Python child.

Prints the child's sys.path and the batches the workers made, trains, and exits with code 3: its
output and exit code must be the same under gradscope as under python. Args: ``STEPS``.
"""

import subprocess
import sys

import torch
from torch.utils.data import DataLoader, Dataset


class Squares(Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.full((4,), float(index * index))


if __name__ == "__main__":
    child = subprocess.run([sys.executable, "-c", "import sys; print(sys.path)"], capture_output=True, text=True)
    print("CHILD", child.returncode, child.stdout.strip(), child.stderr.strip())
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    loader = DataLoader(Squares(), batch_size=4, num_workers=2, multiprocessing_context="spawn")
    for step, batch in zip(range(int(sys.argv[1])), loader):
        print("BATCH", step, batch.sum().item())
        optimizer.zero_grad()
        model(batch).pow(2).mean().backward()
        optimizer.step()
    sys.exit(3)
