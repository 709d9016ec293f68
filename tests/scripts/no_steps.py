"""Computes gradients but never steps an optimizer: gradscope must warn, not fail.

Its REF line: which costly modules the process holds at the script's end. torch alone loads neither
torch._dynamo nor pandas, so a profiled run must not either (gradscope marks its hooks for dynamo only
once something loads it, and never imports pandas in the training process)."""
import json
import sys

import torch

x = torch.ones(3, requires_grad=True)
(x * 2).sum()
print("no training here")
print("REF " + json.dumps({name: name in sys.modules for name in ("torch._dynamo", "pandas")}))
