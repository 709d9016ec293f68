"""The norm read plans of gradscope.record.measure against torch's own norms, on real tensors in-process."""

from __future__ import annotations

import pytest
import torch

from gradscope.record.measure import (
    FEW_SINGLES,
    STACK_MAX_NUMEL,
    STACK_MIN_TENSORS,
    NormPlan,
    plan_norms,
    tensor_norms,
    write_norms,
)
from gradscope.record.rows import RowBlocks

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]  # CI has no GPU; the device machine does


def _grads(shapes: list[tuple[int, ...]], dtype: torch.dtype = torch.float32, device: str = "cpu") -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen).mul_(1 + i).to(device, dtype) for i, shape in enumerate(shapes)]


def _read(plan: NormPlan, grads: list[torch.Tensor], loss: torch.Tensor | None) -> torch.Tensor:
    """The norms of ``grads`` (and ``loss``) written into a fresh vector of their own, in ``plan.cols`` order."""
    out = torch.empty(plan.n + (loss is not None), dtype=torch.float32, device=plan.device)
    write_norms(plan, grads, loss, out.split(plan.part_sizes(loss is not None)))
    return out


def _placed(plan: NormPlan, values: torch.Tensor, with_loss: bool) -> torch.Tensor:
    """The values of a read put back in parameter order (the loss, if any, last)."""
    out = torch.empty(plan.n + 1, dtype=torch.float64)
    out[torch.as_tensor(plan.cols(with_loss))] = values.double().cpu()
    return out


MANY = [(16, 16), (16,), (16,), (16,)] * 12 + [(4096,)] * 9 + [(4097,)] * 9 + [(), (), (64, 64), (3, 5)]
# The three ways a plan reads its one-of-a-kind tensors: one _foreach_norm beside the groups (MANY has 13),
# one vector_norm each (a few beside the groups, as in bench/run.py's "many"), or the list as it is.
FEW = [(16, 16), (16,), (16,)] * 10 + [(10, 16), (10,), ()]
ONLY_SINGLES = [(64, 32), (64,), (10, 64), (10,), ()]
LAYOUTS = {"many": MANY, "few": FEW, "only-singles": ONLY_SINGLES}


def test_cpu_plan_groups_many_small_same_shape_tensors_only() -> None:
    plan = plan_norms(MANY, torch.device("cpu"))
    grouped = {MANY[idx[0]] for idx, _ in plan.groups}
    assert grouped == {(16, 16), (16,), (4096,)}  # 12, 36 and 9 tensors of at most STACK_MAX_NUMEL elements
    assert all(len(idx) >= STACK_MIN_TENSORS and torch.Size(MANY[idx[0]]).numel() <= STACK_MAX_NUMEL
               for idx, _ in plan.groups)
    singles = {MANY[i] for i in plan.singles}
    assert singles == {(4097,), (), (64, 64), (3, 5)}
    assert sorted(plan.cols(False).tolist()) == list(range(len(MANY)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("with_loss", [False, True])
@pytest.mark.parametrize("preallocated", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_planned_norms_equal_torch_vector_norm(device: str, dtype: torch.dtype, with_loss: bool, preallocated: bool,
                                             layout: str) -> None:
    shapes = LAYOUTS[layout]
    grads = _grads(shapes, dtype, device)
    plan = plan_norms(shapes, grads[0].device, {dtype})
    singles = len(plan.singles)
    assert {"many": singles > FEW_SINGLES and plan.groups, "few": 0 < singles <= FEW_SINGLES and plan.groups,
            "only-singles": plan.all_single}[layout]
    loss = torch.tensor(2.5, device=device) if with_loss else None
    if preallocated:  # as the recorder does: a row of a RowBlocks block, written part by part
        values, parts, block, pos = RowBlocks(plan.part_sizes(with_loss), grads[0].device, rows_per_block=4).claim()
        block.fill_(float("nan"))
        write_norms(plan, grads, loss, parts)
        assert values.data_ptr() == block[pos].data_ptr() and not values.isnan().any()
    else:
        values = _read(plan, grads, loss)
    placed = _placed(plan, values, with_loss)
    expected = torch.stack([torch.linalg.vector_norm(g.double().cpu()) for g in grads])
    torch.testing.assert_close(placed[: plan.n], expected, rtol=1e-5, atol=0)
    total = torch.nn.utils.get_total_norm([g.double().cpu() for g in grads])
    torch.testing.assert_close(torch.linalg.vector_norm(placed[: plan.n]), total, rtol=1e-5, atol=0)
    if with_loss:
        assert placed[plan.n].item() == 2.5


def test_a_planned_read_raises_on_sparse_so_the_recorder_falls_back() -> None:
    shapes = [(50, 8)] * 9
    grads = _grads(shapes)
    grads[3] = grads[3].to_sparse()
    with pytest.raises((RuntimeError, NotImplementedError)):
        _read(plan_norms(shapes, torch.device("cpu")), grads, None)
    norms = tensor_norms(grads)  # the general path handles it
    assert torch.isclose(norms[3], torch.linalg.vector_norm(grads[3].to_dense()))


def test_a_plan_for_cuda_is_made_without_touching_the_device() -> None:
    plan = plan_norms(MANY, torch.device("cuda", 1))
    assert plan.device_index == 1 and plan.groups == plan_norms(MANY, torch.device("cpu")).groups
