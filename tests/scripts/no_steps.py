"""Computes gradients but never steps an optimizer: gradscope must warn, not fail."""
import torch

x = torch.ones(3, requires_grad=True)
(x * 2).sum()
print("no training here")
