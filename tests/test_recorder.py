"""The recorder records what torch computes: real training scripts, checked against torch's own numbers.

Every fixture script (tests/scripts/rec_*.py) is a plain training script with no gradscope import
(but rec_api_early.py, the Python API case).
Besides training it prints ``REF {json}`` lines computed with ``get_total_norm`` / ``vector_norm`` on
the gradients exactly as the optimizer consumes them (before the script's clip, after unscaling,
after the first closure evaluation...). Each test runs the script under
``python -m gradscope profile`` in a subprocess and compares the recorded run with those lines:
the number of records with the number of updates, ``grad_norm`` and every per-layer ``norm``
(relative 1e-5), ``loss``, and the case's own columns. No expected norm is written in this file.

Several sub-cases share one script and one subprocess (each pays ~3-5 s of interpreter, torch and
gradscope start-up): each sub-case gives its model a root attribute named after it, so its
parameter names start with ``<case>.`` and its optimizer is found by those names.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import pytest

REL = 1e-5


# --------------------------------------------------------------------------------------------------
# Helpers: find a sub-case's optimizer and compare its records with the script's REF lines
# --------------------------------------------------------------------------------------------------


def close(actual: Any, expected: Any, rel: float = REL) -> bool:
    """Equal within ``rel``; None / NaN match only None / NaN, and inf matches an inf of the same sign."""
    a = math.nan if actual is None or pd.isna(actual) else float(actual)
    e = math.nan if expected is None else float(expected)
    if math.isnan(e) or math.isnan(a):
        return math.isnan(e) and math.isnan(a)
    if math.isinf(e) or math.isinf(a):
        return a == e
    return math.isclose(a, e, rel_tol=rel, abs_tol=1e-12)


def optimizer_indices(run: Any, prefix: str) -> list[int]:
    """Indices (meta ``optimizers``) of the optimizers whose parameters all live under ``prefix``."""
    return [o.index for o in run.meta.optimizers if o.names and all(n.startswith(prefix) for n in o.names)]


def optimizer_of(run: Any, prefix: str) -> int:
    """The one optimizer index whose parameter names all start with ``prefix``."""
    found = optimizer_indices(run, prefix)
    assert len(found) == 1, f"expected one optimizer under {prefix!r}, found {found} in {run.meta.optimizers}"
    return found[0]


def steps_of(run: Any, index: int) -> pd.DataFrame:
    return run.steps[run.steps.optimizer == index].sort_values("step").reset_index(drop=True)


def layer_norms(run: Any, index: int, step: int) -> dict[str, float]:
    layers = run.layers
    rows = layers[(layers.optimizer == index) & (layers.step == step)]
    return {str(name): float(norm) for name, norm in zip(rows.layer, rows.norm, strict=True)}


def check_records(run: Any, index: int, refs: list[dict[str, Any]], *, rel: float = REL, first_step: int = 0,
                  exact_nonfinite: bool = True) -> pd.DataFrame:
    """One record per REF line, in order: step index, grad_norm, every per-layer norm and the loss.

    With ``exact_nonfinite=False`` a REF step whose norm is not finite only needs a non-finite
    recorded grad_norm (its per-layer norms are not compared).
    """
    steps = steps_of(run, index)
    assert refs, "the script printed no REF line for this case"
    assert len(steps) == len(refs), f"{len(steps)} records for {len(refs)} updates"
    assert list(steps.step) == list(range(first_step, first_step + len(refs)))
    for (_, row), ref in zip(steps.iterrows(), refs, strict=True):
        where = f"optimizer {index} step {row.step}"
        if not exact_nonfinite and not math.isfinite(ref["norm"]):
            assert not math.isfinite(row.grad_norm), f"{where}: grad_norm {row.grad_norm} should be non-finite"
            assert close(row.loss, ref["loss"]), f"{where}: loss {row.loss} != {ref['loss']}"
            continue
        assert close(row.grad_norm, ref["norm"], rel), f"{where}: grad_norm {row.grad_norm} != {ref['norm']}"
        recorded = layer_norms(run, index, int(row.step))
        assert set(recorded) == set(ref["layers"]), f"{where}: layer names {sorted(recorded)} != {sorted(ref['layers'])}"
        for name, expected in ref["layers"].items():
            assert close(recorded[name], expected, rel), f"{where} {name}: {recorded[name]} != {expected}"
        assert close(row.loss, ref["loss"]), f"{where}: loss {row.loss} != {ref['loss']}"
    return steps


# --------------------------------------------------------------------------------------------------
# Optimizers: SGD / Adam / AdamW x foreach / for-loop / fused, wrappers, closures
# --------------------------------------------------------------------------------------------------

OPTIMIZER_CASES = [f"{k}-{i}" for k in ("sgd", "adam", "adamw") for i in ("foreach", "forloop", "fused")] + ["adam-tensorlr"]
WRAPPER_CASES = ["subclass", "outer", "noinit"]
CLOSURE_CASES = ["lbfgs", "adam-closure"]
ALL_OPTIMIZER_CASES = OPTIMIZER_CASES + WRAPPER_CASES + CLOSURE_CASES


optimizers_run = pytest.mark.profiled("rec_optimizers.py", *ALL_OPTIMIZER_CASES)


@optimizers_run
@pytest.mark.parametrize("case", OPTIMIZER_CASES)
def test_optimizer_implementations_record_torch_norms(profiled: Any, case: str) -> None:
    run, refs = profiled.run, profiled.ref(case)
    index = optimizer_of(run, f"{case}.")
    steps = check_records(run, index, refs)
    assert run.meta.optimizers[index].class_name == {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}[case.split("-")[0]]
    assert list(steps.n_backward) == [1] * len(refs)
    # lr of the update itself (read before the scheduler halves it), never the next one
    assert [close(a, r["lr"]) for a, r in zip(steps.lr, refs, strict=True)] == [True] * len(refs)
    assert not steps.skipped.any() and not steps.nonfinite.any()
    assert (steps.clip_source == "none").all() and steps.max_norm.isna().all()
    assert (steps.applied_norm == steps.grad_norm).all()


@optimizers_run
@pytest.mark.parametrize(("case", "cls"), [("subclass", "SGDSub"), ("outer", "Outer"), ("noinit", "Adam")])
def test_wrapping_optimizers_record_once_per_step(profiled: Any, case: str, cls: str) -> None:
    """super().step() and an Optimizer stepping an inner one: one record (the outermost), not two.
    A wrapper that skips Optimizer.__init__ is invisible to torch's hooks: its inner optimizer records."""
    run, refs = profiled.run, profiled.ref(case)
    index = optimizer_of(run, f"{case}.")
    check_records(run, index, refs)
    assert run.meta.optimizers[index].class_name == cls


@optimizers_run
@pytest.mark.parametrize("case", CLOSURE_CASES)
def test_closure_steps_measure_after_the_first_evaluation(profiled: Any, case: str) -> None:
    """Norms from the grads after the first closure call (the pre hook sees stale ones), the loss of
    the first evaluation (LBFGS re-evaluates 4 times a step), exactly one record per step."""
    run, refs = profiled.run, profiled.ref(case)
    evals = [r["evals"] for r in profiled.ref(case + ":evals")]
    assert len(evals) == len(refs)
    if case == "lbfgs":
        assert min(evals) > 1, "the LBFGS case must re-evaluate the closure, or it tests nothing"
    steps = check_records(run, optimizer_of(run, f"{case}."), refs)
    assert list(steps.n_backward) == [1] * len(refs)


# --------------------------------------------------------------------------------------------------
# Gradients: accumulation, missing grads, bf16, sparse
# --------------------------------------------------------------------------------------------------

GRAD_CASES = ["accum-div", "accum-nodiv", "frozen", "bf16", "sparse-sgd", "sparse-adam", "stacked", "stacked-bf16",
              "stacked-f64", "backward-forms", "create-graph"]


grads_run = pytest.mark.profiled("rec_grads.py", *GRAD_CASES)


@grads_run
@pytest.mark.parametrize("case", ["accum-div", "accum-nodiv"])
def test_accumulation_loss_is_the_sum_of_the_backwarded_scalars(profiled: Any, case: str) -> None:
    """k=4 micro-batches per update: one record per update, loss = sum of what was backward'ed
    (the mean micro loss with loss/4, four times larger without), n_backward = 4."""
    run, refs = profiled.run, profiled.ref(case)
    steps = check_records(run, optimizer_of(run, f"{case}."), refs)
    assert list(steps.n_backward) == [4] * len(refs)


@grads_run
def test_backward_of_several_losses_as_a_generator_or_a_list(profiled: Any) -> None:
    """torch.autograd.backward(generator or list of a 0-dim and a (1,) float64 loss): the script's
    grads are those of both (the generator is read once, for torch and the recorder alike), and the
    recorded loss is their sum."""
    run, refs = profiled.run, profiled.ref("backward-forms")
    steps = check_records(run, optimizer_of(run, "backward-forms."), refs)
    assert list(steps.n_backward) == [1] * len(refs) == [1] * 4
    assert (steps.grad_norm > 0).all()  # a generator read up by the recorder would leave torch nothing to do


@grads_run
def test_grads_that_require_grad_are_recorded(profiled: Any) -> None:
    """backward(create_graph=True) leaves grads that require grad: the planned read refuses them (out=
    under autograd), and the general path must read them without keeping a graph the flush would choke on."""
    run, refs = profiled.run, profiled.ref("create-graph")
    steps = check_records(run, optimizer_of(run, "create-graph."), refs)
    assert len(steps) == 3 and run.meta.status == "complete"


@grads_run
def test_params_without_grad_are_nan_and_left_out_of_the_global_norm(profiled: Any) -> None:
    """Frozen params (in the optimizer, requires_grad=False) and a layer used only on odd steps."""
    run, refs = profiled.run, profiled.ref("frozen")
    index = optimizer_of(run, "frozen.")
    check_records(run, index, refs)  # REF's global norm is get_total_norm over the existing grads only
    for ref in refs:
        recorded = layer_norms(run, index, ref["step"])
        assert math.isnan(recorded["frozen.frozen.weight"]) and math.isnan(recorded["frozen.frozen.bias"])
        assert math.isnan(recorded["frozen.sometimes.weight"]) == (ref["step"] % 2 == 0)
        assert not math.isnan(recorded["frozen.body.weight"])


@grads_run
def test_bf16_grads_are_accumulated_in_fp32(profiled: Any) -> None:
    """Compared with a float64 reference at 1e-5: a norm accumulated in bf16 misses by ~1e-3."""
    run, refs = profiled.run, profiled.ref("bf16")
    check_records(run, optimizer_of(run, "bf16."), refs)
    assert any(not close(r["bf16_norm"], r["norm"]) for r in refs), "the bf16 case must be able to fail"


@grads_run
@pytest.mark.parametrize("case", ["stacked", "stacked-bf16", "stacked-f64"])
def test_small_same_shape_tensors_read_by_stacking(profiled: Any, case: str) -> None:
    """On CPU, small tensors of one shape are read by one stack and one reduction per shape: every norm
    still matches torch's (float64 reference), in float32 and bf16, with 0-dim params, a large tensor
    read apart, and grads missing on even steps (the general path) then present again (the planned one).
    float64 grads are read in float64 (vector_norm refuses to narrow them: nothing was recorded before)."""
    run, refs = profiled.run, profiled.ref(case)
    index = optimizer_of(run, f"{case}.")
    check_records(run, index, refs)
    assert len(run.meta.optimizers[index].names) == 40
    for ref in refs:
        recorded = layer_norms(run, index, ref["step"])
        assert math.isnan(recorded[f"{case}.sometimes.weight"]) == (ref["step"] % 2 == 0)
        assert not math.isnan(recorded[f"{case}.gain"])


@grads_run
@pytest.mark.parametrize("case", ["sparse-sgd", "sparse-adam"])
def test_sparse_embedding_grads(profiled: Any, case: str) -> None:
    """nn.Embedding(sparse=True) with uncoalesced duplicate rows; SGD mixing sparse and dense grads,
    and SparseAdam + Adam stepping after one backward (both records carry that backward's loss)."""
    run = profiled.run
    groups = ["emb", "head"] if case == "sparse-adam" else [""]
    for g, part in enumerate(groups):
        steps = check_records(run, optimizer_of(run, f"{case}.{part}"), profiled.ref(f"{case}/{g}"))
        assert list(steps.n_backward) == [1] * len(steps)
    if case == "sparse-adam":
        classes = {o.class_name for o in run.meta.optimizers if o.names[0].startswith(case)}
        assert classes == {"SparseAdam", "Adam"}


# --------------------------------------------------------------------------------------------------
# GradScaler (CPU): unscaled norms and losses, the loss scale, the skipped step
# --------------------------------------------------------------------------------------------------

AMP_CASES = ["plain", "plain-unscale", "fused", "fused-unscale"]


@pytest.mark.profiled("rec_amp.py", *AMP_CASES)
@pytest.mark.parametrize("case", AMP_CASES)
def test_grad_scaler_records_unscaled_values_and_the_skipped_step(profiled: Any, case: str) -> None:
    """An inf at step 1: GradScaler skips the update (a non-fused optimizer's step is never called, a
    fused one skips inside its kernel); the record is there with skipped=True and nonfinite, and the
    next record's loss scale is halved. Norms and losses are the unscaled ones (fused optimizers see
    still-scaled grads in the pre hook), the loss scale is the scaler's at each step."""
    run, refs = profiled.run, profiled.ref(case)
    clipped = case.endswith("unscale")
    # unscale_ + clip on the overflow step: clip_grad_norm_ multiplies by 0 and the pre-clip per-layer
    # norms cannot be divided back out of 0 * inf = NaN. The step is skipped anyway; only "non-finite" is asserted.
    steps = check_records(run, optimizer_of(run, f"{case}."), refs, exact_nonfinite=not clipped)
    inf_at = [i for i, r in enumerate(refs) if not math.isfinite(r["norm"])]
    assert inf_at == [1]
    assert list(steps.skipped) == [i in inf_at for i in range(len(refs))]
    assert list(steps.nonfinite) == list(steps.skipped)
    assert [close(a, r["scale"]) for a, r in zip(steps.loss_scale, refs, strict=True)] == [True] * len(refs)
    assert steps.loss_scale[2] == steps.loss_scale[1] / 2
    if clipped:
        finite = [i for i in range(len(refs)) if i not in inf_at]
        assert (steps.clip_source[finite] == "script").all() and (steps.max_norm[finite] == 0.5).all()
        for i in finite:
            assert close(steps.grad_norm[i], refs[i]["returned"])  # what the script's clip_grad_norm_ returned
            assert close(steps.applied_norm[i], refs[i]["applied"])


# --------------------------------------------------------------------------------------------------
# The script's own clipping: grad_norm is the pre-clip norm
# --------------------------------------------------------------------------------------------------

CLIP_CASES = ["norm", "deprecated", "value", "two", "with-norm"]


clip_run = pytest.mark.profiled("rec_clip.py", *CLIP_CASES)


@clip_run
@pytest.mark.parametrize("case", CLIP_CASES)
def test_script_clipping_records_pre_clip_and_applied_norms(profiled: Any, case: str) -> None:
    """clip_grad_norm_ (and the deprecated clip_grad_norm), clip_grad_value_, two clip_grad_norm_ calls
    on disjoint params, get_total_norm + clip_grads_with_norm_: grad_norm and the per-layer norms are the
    pre-clip ones (= what clip_grad_norm_ returned), applied_norm what the optimizer consumed."""
    run, refs = profiled.run, profiled.ref(case)
    steps = check_records(run, optimizer_of(run, f"{case}."), refs)
    for (_, row), ref in zip(steps.iterrows(), refs, strict=True):
        if ref["returned"] is not None:
            assert close(row.grad_norm, ref["returned"])
        assert close(row.applied_norm, ref["applied"]), f"step {row.step}: applied {row.applied_norm} != {ref['applied']}"
        assert close(row.clip_coef, ref["applied"] / ref["norm"])
        assert row.clip_source == "script"
        if case == "value":  # a clip value is no norm threshold: max_norm stays null (recommend reads it as one)
            assert pd.isna(row.max_norm)
        else:
            assert row.max_norm == ref["threshold"]
    if case in ("norm", "deprecated", "with-norm"):  # one call over all params: min(1, max_norm / (norm + 1e-6))
        threshold = refs[0]["threshold"]
        assert [close(a, min(n, threshold)) for a, n in zip(steps.applied_norm, steps.grad_norm, strict=True)] == [True] * len(refs)
        assert (steps.grad_norm <= threshold).any() and (steps.grad_norm > threshold).any()  # both kinds of step


@clip_run
def test_script_clipping_is_described_in_meta(profiled: Any) -> None:
    clipping = profiled.run.meta.clipping
    assert clipping.script_clip_calls == sum(2 if r["case"] == "two" else 1 for r in profiled.refs)
    assert clipping.script_clip_function == "clip_grads_with_norm_"  # the last call: CLIP_CASES ends with with-norm
    assert clipping.script_max_norm == profiled.refs[-1]["threshold"]


# --------------------------------------------------------------------------------------------------
# Two optimizers (GAN)
# --------------------------------------------------------------------------------------------------


@pytest.mark.profiled("rec_gan.py")
def test_gan_discriminator_and_generator_are_two_series(profiled: Any) -> None:
    """D (two backward calls per update) and G each get their own optimizer index, norms and losses,
    even though both are nn.Sequential with the same parameter names (only the shapes differ)."""
    run = profiled.run
    assert len(run.meta.optimizers) == 2, run.meta.optimizers
    for net, n_backward in (("D", 2), ("G", 1)):
        refs = profiled.ref(net)
        index = [o.index for o in run.meta.optimizers if [list(s) for s in o.shapes] == refs[0]["shapes"]]
        assert len(index) == 1, f"{net}: {run.meta.optimizers}"
        steps = check_records(run, index[0], refs)
        assert list(steps.n_backward) == [n_backward] * len(refs)


# --------------------------------------------------------------------------------------------------
# Naming: tied weights, wrappers, bare params, add_param_group, re-created optimizers
# --------------------------------------------------------------------------------------------------

NAMING_CASES = ["tied", "wrappers", "ddp", "bare", "add-group", "recreate"]


naming_run = pytest.mark.profiled("rec_naming.py", *NAMING_CASES)


@naming_run
@pytest.mark.parametrize("case", ["tied", "wrappers", "ddp", "bare"])
def test_parameter_names(profiled: Any, case: str) -> None:
    """Names are module paths as the script's own named_parameters()/state_dict() give them: wrapper
    attributes (DataParallel's and DDP's ``module``, checkpoint_wrapper's) dropped, a user's submodule
    called ``module`` kept, a tied weight once (its other name an alias), a bare Parameter by position."""
    run, refs = profiled.run, profiled.ref(case)
    if case == "bare":  # the bare Parameter's fallback name is param_groups.0.2, not under "bare."
        index = next(o.index for o in run.meta.optimizers if o.names[0].startswith("bare."))
    else:
        index = optimizer_of(run, f"{case}.")
    check_records(run, index, refs)
    entry = run.meta.optimizers[index]
    assert list(entry.names) == list(refs[0]["layers"])
    assert not any("_orig_mod" in n or "_checkpoint_wrapped_module" in n for n in entry.names)
    if case == "tied":
        assert entry.aliases == {"tied.encoder.weight": ("tied.decoder.weight",)}
    if case == "wrappers":
        assert "wrappers.0.module.weight" in entry.names


@naming_run
def test_add_param_group_mid_run(profiled: Any) -> None:
    """The names are resolved again when the layout changes (2 -> 4 tensors). The new layout is a new
    optimizer entry, and its step index goes on from the old one's, so a series joined by layer name
    has one row per update."""
    run, refs = profiled.run, profiled.ref("add-group")
    before, after = optimizer_indices(run, "add-group.")
    assert len(run.meta.optimizers[before].names) == 2 and len(run.meta.optimizers[after].names) == 4
    check_records(run, before, refs[:2])
    check_records(run, after, refs[2:], first_step=2)
    head = run.layers[(run.layers.layer == "add-group.2.weight")]
    assert sorted(head.step) == [0, 1, 2, 3]


@naming_run
def test_optimizer_recreated_every_epoch_joins_one_series(profiled: Any) -> None:
    """A new Adam (and scheduler, which keeps the old one alive in a reference cycle) every epoch."""
    run, refs = profiled.run, profiled.ref("recreate")
    check_records(run, optimizer_of(run, "recreate."), refs)


# --------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------


@pytest.mark.profiled("rec_compile.py", "model", "step")
@pytest.mark.parametrize("case", ["model", "step"])
def test_torch_compile(profiled: Any, case: str) -> None:
    """torch.compile(model): names without ``_orig_mod.``; torch.compile(opt.step): the hooks run
    (eagerly, at a graph break) and the script does not crash. See rec_compile.py for the backends."""
    run, refs = profiled.run, profiled.ref(case)
    index = optimizer_of(run, f"{case}.")
    check_records(run, index, refs)
    assert not any("_orig_mod" in n for n in run.meta.optimizers[index].names)


def test_hooks_run_eagerly_inside_a_compiled_function() -> None:
    """The hook wrapper (hooks.eager, a leaner torch.compiler.disable, marked by mark_eager once dynamo is
    loaded): dynamo calls the hook at a graph break instead of tracing it, and compiles nothing the hook
    calls; a plain function is traced."""
    import warnings

    import torch

    from gradscope.record.hooks import eager, mark_eager

    def eager_marked(fn: Any) -> Any:
        hook = eager(fn)  # made before dynamo is loaded, as the recorder makes its hooks
        import torch._dynamo  # noqa: F401

        assert mark_eager([hook])
        return hook

    def compiling_inside(wrap: Any) -> list[bool]:
        seen: list[bool] = []

        def callee() -> None:
            seen.append(torch.compiler.is_compiling())

        def hook(x: torch.Tensor) -> None:
            seen.append(torch.compiler.is_compiling())
            callee()

        hooked = wrap(hook)

        def train_step(x: torch.Tensor) -> torch.Tensor:
            y = x * 2
            hooked(y)
            return y + 1

        torch._dynamo.reset()
        out = torch.compile(train_step, backend="eager")(torch.ones(3))
        assert out.tolist() == [3.0, 3.0, 3.0]
        return seen

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert compiling_inside(eager_marked) == [False, False]
    assert not [w for w in caught if "dynamo" in str(w.filename) or "graph break" in str(w.message).lower()]
    assert compiling_inside(lambda fn: fn) == [True, True]  # the control: unwrapped, dynamo traces it



def test_a_step_with_a_missing_grad_leaves_the_read_plan_in_place(tmp_path: Any) -> None:
    """A step where some params got no grad is read by the general path (the plan's stack raises on the
    None), and the next full step by the plan again: one such step must not cost every later step."""
    import torch

    from gradscope.record.recorder import Recorder

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(10)])  # two groups of 10: read by stacking
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = Recorder(runs_dir=tmp_path, label="plan").start()
    planned, expected = [], []
    try:
        for i in range(4):
            opt.zero_grad()
            x = torch.randn(3, 4)
            (model[1:](x) if i == 2 else model(x)).pow(2).mean().backward()  # step 2: no grad for model[0]
            expected.append(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
            before = rec.stats.general_reads
            opt.step()
            planned.append(rec.stats.general_reads == before)  # not read norm by norm: read by the plan
        stats = rec.stats
    finally:
        rec.stop()
    assert planned == [True, True, False, True]
    assert stats.planned_failures == 1 and stats.plans_dropped == 0 and stats.n_steps == 4
    steps = pd.read_parquet(tmp_path / "latest" / "steps.parquet")
    assert steps["grad_norm"].tolist() == pytest.approx([float(n) for n in expected], rel=1e-5)



def test_a_param_never_given_a_grad_costs_one_failed_planned_read_only(tmp_path: Any) -> None:
    """A frozen or unused param the optimizer holds has no grad on any step: after the first step shows it,
    the planned read checks for a None before reading, rather than stacking every group in vain every step."""
    import torch

    from gradscope.record.recorder import Recorder

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(10)])
    unused = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD([*model.parameters(), *unused.parameters()], lr=0.01)
    rec = Recorder(runs_dir=tmp_path, label="unused").start()
    expected = []
    try:
        for _ in range(20):
            opt.zero_grad()
            model(torch.randn(3, 4)).pow(2).mean().backward()
            expected.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
            opt.step()
        stats = rec.stats
    finally:
        rec.stop()
    assert stats.plans_dropped == 0  # the plan stays: a step with every grad would use it
    assert stats.planned_failures == 1  # the first step's attempt only
    assert stats.general_reads == 20
    steps = pd.read_parquet(tmp_path / "latest" / "steps.parquet")
    assert steps["grad_norm"].tolist() == pytest.approx(expected, rel=1e-5)


def test_a_failed_planned_read_warns_once_and_falls_back(tmp_path: Any, capsys: Any) -> None:
    """A planned read that fails for a reason plans are not known for (here a param resized mid-run breaks
    the stack of its shape group) says so once on stderr, turns the plan off, and every step is still
    recorded with torch's norms; the cases plans are known not to cover (sparse...) stay silent."""
    import torch

    from gradscope.record.recorder import Recorder

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(10)]  # one stacked group of 10
    opt = torch.optim.SGD(params, lr=0.01)
    rec = Recorder(runs_dir=tmp_path, label="resized").start()
    expected = []
    try:
        for i in range(4):
            if i == 2:
                params[0].data = torch.randn(5)  # the plan was made for (4,): its stack now raises
            opt.zero_grad()
            sum((p * p).sum() for p in params).backward()
            expected.append(float(torch.nn.utils.get_total_norm([p.grad for p in params])))
            opt.step()
        stats = rec.stats
    finally:
        rec.stop()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gradscope: warning:")]
    assert len(warnings) == 1 and "planned norm read" in warnings[0] and "RuntimeError" in warnings[0], warnings
    assert stats.plans_dropped == 1 and stats.general_reads == 2
    steps = pd.read_parquet(tmp_path / "latest" / "steps.parquet")
    assert steps["grad_norm"].tolist() == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------------------------------
# Hand-written update loops (no torch.optim): the classic word-language-model RNN
# --------------------------------------------------------------------------------------------------


handwritten_run = pytest.mark.profiled("rec_handwritten.py", "clip", "zerograd", "value")


@handwritten_run
@pytest.mark.parametrize("mode", ["clip", "zerograd"])
def test_hand_written_update_loop(profiled: Any, mode: str) -> None:
    """clip_grad_norm_ then p.data.add_(p.grad, alpha=-lr), with model.zero_grad() at the top of each
    iteration (and the same loop without clipping): one record per update, the last one included; the
    decoder tied to the encoder is one tensor with an alias."""
    run, refs = profiled.run, profiled.ref(mode)
    index = optimizer_of(run, f"{mode}.")
    assert run.meta.optimizers[index].class_name == "manual"
    assert run.meta.optimizers[index].aliases == {f"{mode}.encoder.weight": (f"{mode}.decoder.weight",)}
    steps = check_records(run, index, refs)
    assert list(steps.n_backward) == [1] * len(refs)
    assert [close(a, r["applied"]) for a, r in zip(steps.applied_norm, refs, strict=True)] == [True] * len(refs)
    if mode == "clip":
        assert [close(a, r["returned"]) for a, r in zip(steps.grad_norm, refs, strict=True)] == [True] * len(refs)
        assert (steps.clip_source == "script").all() and (steps.max_norm == 0.25).all()
        assert (steps.grad_norm > 0.25).all()  # every step clipped: applied is the max_norm
    else:
        assert (steps.clip_source == "none").all() and (steps.applied_norm == steps.grad_norm).all()


@handwritten_run
def test_hand_written_loop_clipping_by_value(profiled: Any) -> None:
    """clip_grad_value_ in a hand-written loop: pre-clip norms and max |g| per layer, the applied norm of
    the clamped grads, clip_source script with no max_norm (a clip value is no norm threshold)."""
    run, refs = profiled.run, profiled.ref("value")
    index = optimizer_of(run, "value.")
    steps = check_records(run, index, refs)
    assert (steps.clip_source == "script").all() and steps.max_norm.isna().all()
    assert [close(a, r["applied"]) for a, r in zip(steps.applied_norm, refs, strict=True)] == [True] * len(refs)
    assert (steps.applied_norm < steps.grad_norm).all()
    max_abs = {k: v for k, v in refs[0]["max_abs"].items() if k != "value.decoder.weight"}  # tied: one name
    assert_max_abs(run, index, [{**r, "max_abs": {k: r["max_abs"][k] for k in max_abs}} for r in refs])
    assert run.meta.clipping.script_clip_value == 0.01 and run.meta.clipping.script_max_norm == 0.25


# --------------------------------------------------------------------------------------------------
# The Python API: an optimizer created before the recorder started
# --------------------------------------------------------------------------------------------------


@pytest.mark.profiled("rec_api_early.py", plain=True)
def test_optimizer_created_before_the_recorder(profiled: Any) -> None:
    """torch's global step hooks reach an optimizer made before they were registered; its clip call
    before the first step is the script's clipping (an optimizer exists), not a hand-written update."""
    run, refs = profiled.run, profiled.ref("api")
    assert [o.class_name for o in run.meta.optimizers] == ["SGD"]
    steps = check_records(run, 0, refs)
    assert (steps.clip_source == "script").all() and (steps.max_norm == 0.5).all()
    assert (steps.grad_norm > 0.5).all() and [close(a, 0.5) for a in steps.applied_norm] == [True] * len(refs)


# --------------------------------------------------------------------------------------------------
# Injection (--max-norm, --clip-value: what compare's arms run): every kind of loop, or "not injected"
# --------------------------------------------------------------------------------------------------

F32 = 1e-6  # a clipped norm may exceed max_norm by float32 rounding, no more


def assert_capped(steps: pd.DataFrame, max_norm: float) -> None:
    """Every update clipped as torch's clip_grad_norm_(params, max_norm) would: applied = min(1, max_norm /
    (grad_norm + 1e-6)) * grad_norm, never above max_norm."""
    assert (steps.clip_source == "injected").all() and (steps.max_norm == max_norm).all()
    assert (steps.applied_norm <= max_norm * (1 + F32)).all(), steps.applied_norm
    expected = [g * min(1.0, max_norm / (g + 1e-6)) for g in steps.grad_norm]
    assert [close(a, e) for a, e in zip(steps.applied_norm, expected, strict=True)] == [True] * len(steps)


@pytest.mark.profiled("rec_inject_loops.py", "clip", options=("--max-norm", "0.1", "--max-steps", "3"))
def test_injection_at_a_hand_written_loops_own_clip_call(profiled: Any) -> None:
    """The word-language-model loop with its own clip_grad_norm_(params, 0.25): gradscope clips there at
    0.1 instead; --max-steps 3 of 4 stops cleanly. grad_norm and the layers are the pre-clip ones (torch's,
    from autograd.grad), what clip_grad_norm_ returned; the update consumed the clipped grads."""
    run, refs = profiled.run, profiled.ref("clip")
    assert run.status == "complete" and "Traceback" not in profiled.proc.stderr
    steps = check_records(run, 0, refs[:3])
    assert len(refs) == 3  # the 4th update never ran
    assert_capped(steps, 0.1)
    assert [close(a, r["applied"]) for a, r in zip(steps.applied_norm, refs, strict=True)] == [True] * 3
    assert [close(g, r["returned"]) for g, r in zip(steps.grad_norm, refs, strict=True)] == [True] * 3
    clipping = run.meta.clipping
    assert clipping.injection == "applied" and clipping.injected_max_norms == (0.1,)
    assert clipping.injected_max_norm == 0.1 and clipping.script_max_norm == 0.25


@pytest.mark.profiled("rec_inject_loops.py", "noclip", options=("--max-norm", "0.1", "--max-steps", "4"))
def test_injection_after_the_backward_of_a_hand_written_loop_without_clip_call(profiled: Any) -> None:
    """No clip call: one backward per update, so gradscope clips when it returns, from the first update on;
    --max-steps reached on the loop's last update ends it cleanly (exit 0, complete, every update)."""
    run, refs = profiled.run, profiled.ref("noclip")
    assert run.status == "complete" and "Traceback" not in profiled.proc.stderr
    steps = check_records(run, 0, refs)
    assert len(steps) == 4 and run.meta.n_steps == 4
    assert_capped(steps, 0.1)
    assert (steps.grad_norm > 0.1).all()  # every update was clipped: a no-op would show applied = grad_norm
    assert [close(a, r["applied"]) for a, r in zip(steps.applied_norm, refs, strict=True)] == [True] * 4
    assert run.meta.clipping.injection == "applied"


@pytest.mark.profiled("rec_inject_loops.py", "accum", options=("--max-norm", "0.1"))
def test_hand_written_accumulation_is_not_injected_and_says_so(profiled: Any) -> None:
    """Two backward calls per update and no clip call: no point is correct. Nothing is clipped (the clip
    made after the first backward, before the second showed up, is divided back out) and the run says why."""
    run, refs = profiled.run, profiled.ref("accum")
    steps = steps_of(run, 0)
    assert len(steps) == len(refs) == 4 and list(steps.n_backward) == [2] * 4
    assert (steps.clip_source == "none").all() and steps.max_norm.isna().all()
    assert [close(g, r["applied"]) for g, r in zip(steps.grad_norm, refs, strict=True)] == [True] * 4
    assert (steps.applied_norm == steps.grad_norm).all() and (steps.grad_norm > 0.1).all()
    assert run.meta.clipping.injection == ("not injected: a hand-written update loop with 2 backward calls per "
                                           "update and no clip call")


@pytest.mark.profiled("rec_handwritten.py", "zerograd", options=("--max-time", "0"))
def test_max_time_stops_a_hand_written_loop_cleanly(profiled: Any) -> None:
    run = profiled.run
    assert profiled.proc.returncode == 0 and "Traceback" not in profiled.proc.stderr
    assert run.status == "complete" and len(run.steps) == 1 == len(profiled.refs)  # the first update only


@pytest.mark.profiled("rec_inject_lbfgs.py", options=("--max-norm", "0.5"))
def test_injection_into_a_closure_optimizer_after_every_evaluation(profiled: Any) -> None:
    """LBFGS: clipped after each closure evaluation (the grads its line search reads, the last of which the
    script sees after step(), are within max_norm); measured after the first; n_evaluations counts them all."""
    run, refs = profiled.run, profiled.ref("lbfgs")
    steps = steps_of(run, 0)
    assert len(steps) == len(refs) == 3 and list(steps.n_backward) == [1] * 3
    assert_capped(steps, 0.5)
    assert (steps.grad_norm > 0.5).all()
    assert all(r["after"] <= 0.5 * (1 + F32) for r in refs), refs
    entry = run.meta.optimizers[0]
    assert entry.class_name == "LBFGS" and entry.n_evaluations == sum(r["evals"] for r in refs) > len(steps)
    assert run.meta.clipping.injection == "applied"


@pytest.mark.profiled("rec_gan.py", options=("--max-norm", "1/5"))
def test_per_optimizer_thresholds_on_a_gan(profiled: Any) -> None:
    """--max-norm 1/5: D (slot 0, the first to step) clipped at 1, G (slot 1) at 5; each row says its own."""
    run = profiled.run
    for net, index, max_norm in (("D", 0, 1.0), ("G", 1, 5.0)):
        refs = profiled.ref(net)
        assert [list(s) for s in run.meta.optimizers[index].shapes] == refs[0]["shapes"]
        assert_capped(check_records(run, index, refs), max_norm)  # grad_norm: torch's, before the step's clip
    d = steps_of(run, 0)
    assert (d.grad_norm > 1.0).all() and (d.applied_norm < d.grad_norm).all()  # D's threshold bites
    clipping = run.meta.clipping
    assert clipping.injected_max_norms == (1.0, 5.0) and clipping.injected_max_norm is None
    assert clipping.injection == "applied"


@pytest.mark.profiled("rec_clip.py", "norm", "value", options=("--clip-value", "0.01"))
def test_clip_value_injection(profiled: Any) -> None:
    """--clip-value 0.01 replaces the script's own clipping (by norm or by value): the optimizer consumes
    clip_grad_value_(params, 0.01)'s grads; the pre-clip norms and every layer's max |g| are recorded."""
    run = profiled.run
    for case in ("norm", "value"):
        refs = profiled.ref(case)
        index = optimizer_of(run, f"{case}.")
        steps = check_records(run, index, refs)
        assert (steps.clip_source == "injected").all() and steps.max_norm.isna().all()
        assert [close(a, r["clamped"]) for a, r in zip(steps.applied_norm, refs, strict=True)] == [True] * len(refs)
        assert_max_abs(run, index, refs)
    clipping = run.meta.clipping
    assert clipping.injected_clip_value == 0.01 and clipping.injection == "applied"
    assert clipping.script_clip_value == 0.05 and clipping.script_max_norm == 1.5


def assert_max_abs(run: Any, index: int, refs: list[dict[str, Any]]) -> None:
    """Every layer's recorded max_abs is the script's p.grad.abs().max() before any clip."""
    layers = run.layers[run.layers.optimizer == index]
    for ref in refs:
        rows = layers[layers.step == ref["step"]]
        recorded = {str(n): float(m) for n, m in zip(rows.layer, rows.max_abs, strict=True)}
        assert recorded.keys() == ref["max_abs"].keys()
        assert [close(recorded[n], v) for n, v in ref["max_abs"].items()] == [True] * len(recorded), (recorded, ref)


@clip_run
def test_script_value_clipping_records_max_abs_and_its_clip_value(profiled: Any) -> None:
    """A script clipping by value: each layer's pre-clip max |g| on its steps (null on norm-clipped ones),
    its clip_value in meta as script_clip_value (never as a max_norm)."""
    run = profiled.run
    assert_max_abs(run, optimizer_of(run, "value."), profiled.ref("value"))
    norm = run.layers[run.layers.optimizer == optimizer_of(run, "norm.")]
    assert norm.max_abs.isna().all() and len(norm) > 0
    assert run.meta.clipping.script_clip_value == 0.05


@clip_run
def test_meta_names_the_interpreter_and_the_launcher(profiled: Any) -> None:
    """A run knows the python that ran it and how gradscope was started, so compare can rerun it there."""
    import sys

    run = profiled.run
    assert run.meta.provenance.executable == sys.executable
    assert run.meta.provenance.launcher == "python -m gradscope"
    assert run.meta.clipping.injection is None and run.meta.clipping.injected_max_norms == ()
