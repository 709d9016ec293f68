"""Train with DataLoader workers under a given start method; the Dataset class lives in __main__."""
import sys

import torch
from torch.utils.data import DataLoader, Dataset


class Squares(Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        x = torch.full((4,), float(i) / 32)
        return x, x.pow(2).sum(0, keepdim=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.manual_seed(0)
    method = sys.argv[1]
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(Squares(), batch_size=8, num_workers=2, multiprocessing_context=method)
    steps = 0
    for x, y in loader:
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    print("STEPS", steps)
