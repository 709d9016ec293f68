"""Plain training whose parameters are hard to name, one sub-case after another (argv: the sub-cases).

tied: an LM with decoder.weight tied to encoder.weight (one tensor in the optimizer, two names).
wrappers: DataParallel (CPU) around a model holding a checkpoint_wrapper'd block whose own
    submodule is called ``module`` (a user's name, which must be kept).
ddp: DistributedDataParallel (gloo, world size 1).
bare: a bare nn.Parameter that belongs to no module, next to a module's params.
add-group: an optimizer over the head only, then add_param_group(body) after 2 steps.
recreate: a new optimizer (and scheduler) every epoch over the same model.
"""

import os
import sys
import tempfile

import torch
from rec_common import mlp, named, ref
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper


def optimizer_params(model, opt):
    """model.named_parameters() restricted to what ``opt`` holds: the REF covers what it steps."""
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    return [(n, p) for n, p in model.named_parameters() if id(p) in held]


def train(case, model, opt, steps, d_in=8, d_out=4, start=0, forward=None):
    for i in range(start, start + steps):
        opt.zero_grad()
        out = (forward or model)(torch.randn(6, d_in))
        loss = torch.nn.functional.mse_loss(out, torch.randn(*out.shape))
        loss.backward()
        ref(case, i, optimizer_params(model, opt), loss)
        opt.step()


class TiedLM(nn.Module):
    def __init__(self, vocab=20, dim=8):
        super().__init__()
        self.encoder = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.decoder = nn.Linear(dim, vocab)
        self.decoder.weight = self.encoder.weight

    def forward(self, idx):
        return self.decoder(torch.tanh(self.hidden(self.encoder(idx))))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.module = nn.Linear(8, 8)  # a user's submodule that happens to be called "module"

    def forward(self, x):
        return torch.tanh(self.module(x))


def run(case):
    if case == "tied":
        model = named(case, TiedLM())
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        for i in range(3):
            opt.zero_grad()
            idx = torch.randint(0, 20, (4, 6))
            loss = torch.nn.functional.cross_entropy(model(idx).reshape(-1, 20), idx.reshape(-1))
            loss.backward()
            ref(case, i, model.named_parameters(), loss)
            opt.step()
    elif case == "wrappers":
        inner = named(case, nn.Sequential(checkpoint_wrapper(Block()), nn.Linear(8, 4)))
        model = nn.DataParallel(inner)  # no GPU: DataParallel just calls the module
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        # Reference names as torch's own state_dict() gives them: checkpoint_wrapper's prefix removed,
        # the user's "module" kept.
        names = [(n.replace("_checkpoint_wrapped_module.", ""), p) for n, p in inner.named_parameters()]
        assert {n for n, _ in names} == set(inner.state_dict())
        for i in range(3):
            opt.zero_grad()
            loss = model(torch.randn(6, 8)).pow(2).mean()
            loss.backward()
            ref(case, i, names, loss)
            opt.step()
    elif case == "ddp":
        import torch.distributed as dist

        store = os.path.join(tempfile.mkdtemp(), "store")
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: no hostname lookup (a rare hang in CI-like sandboxes)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        inner = named(case, mlp())
        model = nn.parallel.DistributedDataParallel(inner)
        train(case, inner, torch.optim.SGD(model.parameters(), lr=0.1), 3, forward=model)
        dist.destroy_process_group()
    elif case == "bare":
        model = named(case, nn.Linear(8, 4))
        scale = nn.Parameter(torch.ones(4))  # belongs to no module: named by its place in param_groups
        opt = torch.optim.SGD([*model.parameters(), scale], lr=0.1)
        for i in range(3):
            opt.zero_grad()
            loss = (model(torch.randn(6, 8)) * scale).pow(2).mean()
            loss.backward()
            ref(case, i, [*model.named_parameters(), ("param_groups.0.2", scale)], loss)
            opt.step()
    elif case == "add-group":
        model = named(case, mlp())
        net = getattr(model, case)
        opt = torch.optim.SGD(net[2].parameters(), lr=0.1)  # the head first
        train(case, model, opt, 2)
        opt.add_param_group({"params": net[0].parameters(), "lr": 0.01})  # then unfreeze the body
        train(case, model, opt, 2, start=2)
    elif case == "recreate":
        model = named(case, mlp())
        for epoch in range(3):
            opt = torch.optim.Adam(model.parameters(), lr=0.01)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)  # keeps the old optimizer alive (a cycle)
            train(case, model, opt, 2, start=2 * epoch)
            sched.step()
    else:
        raise SystemExit(f"unknown case {case}")


if __name__ == "__main__":
    torch.manual_seed(0)
    for case in sys.argv[1:]:
        run(case)
