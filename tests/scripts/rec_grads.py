"""Plain training with unusual gradients, one sub-case after another (argv: the sub-cases).

accum-div / accum-nodiv: gradient accumulation over 4 micro-batches, with and without loss/4.
frozen: a frozen layer and a layer used only on odd steps, all in the optimizer (grad None).
bf16: a bfloat16 model (bf16 grads), reference norms computed in float64.
sparse-sgd: nn.Embedding(sparse=True) + a dense head in one SGD (sparse and dense grads mixed).
sparse-adam: the sparse embedding in SparseAdam, the dense head in Adam: one backward, two steps.
stacked / stacked-bf16 / stacked-f64: 32 small tensors of two shapes (read by stacking, on CPU), a large one, two 0-dim
    params, and a block used only on odd steps (its grads are None on even steps); float32, bf16, float64.
create-graph: loss.backward(create_graph=True): every grad requires grad.
backward-forms: torch.autograd.backward on two losses at once, a 0-dim one and a (1,)-shaped float64 one,
    passed as a generator on even steps and as a list on odd steps.
"""

import sys

import torch
from rec_common import emit, grad_norms, mlp, named, ref

STEPS = 3
K = 4


def accumulation(case):
    model = named(case, mlp())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for i in range(STEPS):
        opt.zero_grad()
        backwarded = 0.0  # the sum of the scalars backward'ed for this update
        for _ in range(K):
            loss = torch.nn.functional.mse_loss(model(torch.randn(4, 8)), torch.randn(4, 4))
            scalar = loss / K if case == "accum-div" else loss
            scalar.backward()
            backwarded += scalar.item()
        ref(case, i, model.named_parameters(), backwarded)
        opt.step()


class PartlyUsed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Linear(8, 16)
        self.frozen.requires_grad_(False)
        self.body = torch.nn.Linear(16, 4)
        self.sometimes = torch.nn.Linear(4, 4)

    def forward(self, x, step):
        h = self.body(torch.tanh(self.frozen(x)))
        return self.sometimes(h) if step % 2 else h


def frozen(case):
    model = named(case, PartlyUsed())
    opt = torch.optim.Adam(model.parameters(), lr=0.01)  # frozen params are in the optimizer too
    for i in range(4):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(torch.randn(6, 8), i), torch.randn(6, 4))
        loss.backward()
        ref(case, i, model.named_parameters(), loss)
        opt.step()


def bf16(case):
    model = named(case, torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)))
    model.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for i in range(STEPS):
        opt.zero_grad()
        x = torch.randn(32, 256, dtype=torch.bfloat16)
        loss = model(x).float().pow(2).mean() * 1000
        loss.backward()
        named_params = list(model.named_parameters())
        norm64, layers64 = grad_norms(named_params, dtype=torch.float64)
        # The norm accumulated in bf16 (torch's default for bf16 grads): shows the bf16 case can fail.
        bf16_norm = torch.nn.utils.get_total_norm([p.grad for _, p in named_params]).item()
        emit(case, i, norm=norm64, layers=layers64, loss=loss.item(), bf16_norm=bf16_norm)
        opt.step()


class Bag(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8, sparse=True)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, idx):
        return self.head(self.emb(idx).mean(1))


def sparse(case):
    model = named(case, Bag())
    inner = getattr(model, case)
    if case == "sparse-sgd":
        opts = [torch.optim.SGD(model.parameters(), lr=0.1)]
        groups = [list(model.named_parameters())]
    else:
        opts = [torch.optim.SparseAdam([inner.emb.weight], lr=0.01), torch.optim.Adam(inner.head.parameters(), lr=0.01)]
        groups = [[(n, p) for n, p in model.named_parameters() if ".emb." in n],
                  [(n, p) for n, p in model.named_parameters() if ".head." in n]]
    for i in range(STEPS):
        for opt in opts:
            opt.zero_grad()
        idx = torch.randint(0, 50, (6, 5))
        idx[:, 0] = idx[0, 1]  # repeated rows: the sparse grad is uncoalesced, with duplicate indices
        loss = model(idx).pow(2).mean()
        loss.backward()
        assert not inner.emb.weight.grad.is_coalesced()
        for g, group in enumerate(groups):
            ref(f"{case}/{g}", i, group, loss)
        for opt in opts:
            opt.step()


class ManySmall(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8))
                                          for _ in range(8))
        self.big = torch.nn.Linear(8, 1024)  # 8192 elements: past the stacking threshold
        self.out = torch.nn.Linear(1024, 4)
        self.gain = torch.nn.Parameter(torch.tensor(1.5))
        self.shift = torch.nn.Parameter(torch.tensor(-0.5))
        self.sometimes = torch.nn.Linear(8, 8)

    def forward(self, x, step):
        for block in self.blocks:
            x = x + block(x)
        if step % 2:
            x = self.sometimes(x)
        return self.out(torch.tanh(self.big(x))) * self.gain + self.shift


def stacked(case):
    model = named(case, ManySmall())
    if case == "stacked-bf16":
        model.to(torch.bfloat16)
    elif case == "stacked-f64":
        model.to(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for i in range(4):
        opt.zero_grad()
        x = torch.randn(16, 8, dtype=next(model.parameters()).dtype)
        loss = model(x, i).float().pow(2).mean()
        loss.backward()
        named_params = list(model.named_parameters())
        norm64, layers64 = grad_norms(named_params, dtype=torch.float64)
        emit(case, i, norm=norm64, layers=layers64, loss=loss.item())
        opt.step()


def backward_forms(case):
    model = named(case, mlp())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for i in range(4):
        opt.zero_grad()
        out = model(torch.randn(6, 8))
        first = torch.nn.functional.mse_loss(out, torch.randn(6, 4))
        second = out.double().pow(2).mean().reshape(1)
        losses = (first, second)
        torch.autograd.backward((x for x in losses) if i % 2 == 0 else list(losses))
        ref(case, i, model.named_parameters(), first.item() + second.item())
        opt.step()


def create_graph(case):
    model = named(case, mlp())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for i in range(3):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(torch.randn(6, 8)), torch.randn(6, 4))
        loss.backward(create_graph=True)  # grads that require grad (higher-order methods)
        ref(case, i, model.named_parameters(), loss.item())
        opt.step()


if __name__ == "__main__":
    torch.manual_seed(0)
    for case in sys.argv[1:]:
        if case.startswith("accum"):
            accumulation(case)
        elif case.startswith("sparse"):
            sparse(case)
        else:
            {"frozen": frozen, "bf16": bf16, "stacked": stacked, "stacked-bf16": stacked,
             "stacked-f64": stacked, "backward-forms": backward_forms, "create-graph": create_graph}[case](case)
