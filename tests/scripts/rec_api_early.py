"""The Python API case: the model and optimizer exist before gradscope records anything.

The one fixture script that imports gradscope: an optimizer created before the recorder installs its
hooks can only happen through the API (``gradscope profile`` installs them before the script runs).
The run goes to $GRADSCOPE_DIR. The script clips before each step, and the first clip call comes
before the first step: it must not be mistaken for a hand-written update loop.
"""

import torch
from rec_common import mlp, ref

import gradscope

torch.manual_seed(0)
model = mlp()
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

with gradscope.Recorder(label="api"):
    for i in range(3):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(torch.randn(6, 8)), torch.randn(6, 4) * 3)
        loss.backward()
        ref("api", i, model.named_parameters(), loss)  # pre-clip
        returned = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        print(f"step {i} loss {loss.item():.4f} grad norm {returned.item():.4f}")
        opt.step()
