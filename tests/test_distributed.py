"""Sharded models on 2 CPU ranks (gloo): each rank records its own sub-run with no collective, and the job's
reader (``store.combine.join_ranks``) gives the full model's norms, as an unsharded replica computes them.

One torchrun launch (tests/scripts/dist_shard.py) trains five cases one after the other, one optimizer
each: FSDP2 (the script clips with clip_grad_norm_, which returns a DTensor), FSDP1 with flat parameters
(model.clip_grad_norm_), FSDP1 with use_orig_params, tensor parallel with a plain replicated head, DDP.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import SCRIPTS, assert_exit_ok, clean_env, parse_refs

import gradscope
from gradscope.store import AGREEMENT_TOLERANCE, job_scopes, join_ranks, rank_disagreement

CASES = ("fsdp2", "fsdp1", "fsdp1-orig", "tp", "ddp")
SCOPES = {"fsdp2": "sharded", "fsdp1": "sharded", "fsdp1-orig": "sharded", "tp": "sharded", "ddp": "global"}
REL = 1e-4


class Job:
    """One torchrun launch recorded as one job run, read through the job reader, and the fixture's truth."""

    def __init__(self, runs_dir: Path, stdout: str, cases: tuple[str, ...] = CASES) -> None:
        self.refs = parse_refs(stdout)
        pids = {r["pid"]: r["rank"] for r in self.refs if r["case"] == "rank"}
        self.run = gradscope.load_run(runs_dir=runs_dir)
        assert self.run.world_size == len(pids)
        assert all(pids[r.meta.pid] == r.rank == r.meta.rank for r in self.run.ranks)  # the recorded rank is right
        self.per_rank = [(r.rank, r.meta, r) for r in self.run.ranks]
        self.metas = [meta for _, meta, _ in self.per_rank]
        self.steps = self.run.read_table("steps")
        self.layers = self.run.read_table("layers")
        # the cases' optimizers in the order they first stepped, as slots are numbered
        self.index = {case: i for i, case in enumerate(cases)}

    def truth(self, case: str, rank: int) -> list[dict[str, Any]]:
        return [r for r in self.refs if r["case"] == case and r["rank"] == rank and "grad_norm" in r]


def launch(tmp_path_factory: pytest.TempPathFactory, nproc: int, cases: tuple[str, ...]) -> Job:
    """``torchrun --nproc-per-node NPROC -m gradscope profile dist_shard.py CASES``: one job run."""
    runs_dir = tmp_path_factory.mktemp("dist") / "runs"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "gradscope", "profile", "--runs-dir", str(runs_dir), "dist_shard.py", *cases]
    proc = subprocess.run(argv, cwd=SCRIPTS, env=clean_env({"OMP_NUM_THREADS": "1"}), capture_output=True,
                          text=True, timeout=600)
    assert_exit_ok(proc)
    return Job(runs_dir, proc.stdout, cases)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Job:
    return launch(tmp_path_factory, 2, CASES)


def _assert_truth(job: Job, case: str, ranks: range) -> None:
    """Every rank's combined global and per-layer norms equal the unsharded replica's."""
    index = job.index[case]
    for rank in ranks:
        truth = job.truth(case, rank)
        steps = _rows(job.steps, optimizer=index, rank=rank)
        assert len(steps["step"]) == len(truth) == 3
        np.testing.assert_allclose(steps["grad_norm"], [t["grad_norm"] for t in truth], rtol=REL)
        layers = _rows(job.layers, optimizer=index, rank=rank)
        got = {(int(s), str(name)): float(v) for s, name, v in zip(layers["step"], layers["layer"], layers["norm"],
                                                                   strict=True)}
        for t in truth:
            for name, value in t["layers"].items():
                assert got[(t["step"], name)] == pytest.approx(value, rel=REL, abs=1e-7), (case, rank, t["step"], name)


def _rows(table: Any, **where: int) -> dict[str, np.ndarray]:
    frame = table.to_pandas()
    for key, value in where.items():
        frame = frame[frame[key] == value]
    return {c: frame[c].to_numpy() for c in frame.columns}


def test_each_rank_records_its_scope_and_weights(job: Job) -> None:
    for meta in job.metas:
        by_index = {o.index: o for o in meta.optimizers}
        for case, scope in SCOPES.items():
            opt = by_index[job.index[case]]
            assert opt.norm_scope == scope, (case, opt)
            assert (opt.shard_weights is None) == (scope != "sharded")
    tp = {o.index: o for o in job.metas[0].optimizers}[job.index["tp"]]
    weights = dict(zip(tp.names, tp.shard_weights or (), strict=True))
    # colwise weight and bias, rowwise weight: pieces; rowwise bias (Replicate) and the plain head: whole
    assert weights == {"fc1.weight": 1, "fc1.bias": 1, "fc2.weight": 1, "fc2.bias": None,
                       "head.weight": None, "head.bias": None}
    assert job_scopes(job.metas) == {job.index[c]: s for c, s in SCOPES.items()}


@pytest.mark.parametrize("case", CASES)
def test_combined_norms_equal_the_full_model(job: Job, case: str) -> None:
    _assert_truth(job, case, range(2))


def test_two_dimensional_meshes_on_four_ranks(tmp_path_factory: pytest.TempPathFactory) -> None:
    """FSDP2 x tensor parallel on a (dp, tp) mesh (a plain layer sharded on the dp slice: every tp rank holds the
    same piece, counted once) and HSDP's (replicate, shard) mesh (the second replica's shards weigh 0)."""
    four = launch(tmp_path_factory, 4, ("fsdp-tp", "hsdp"))
    for case in ("fsdp-tp", "hsdp"):
        _assert_truth(four, case, range(4))
    hsdp = [{o.index: o for o in meta.optimizers}[four.index["hsdp"]].shard_weights for meta in four.metas]
    assert [set(w or ()) for w in hsdp] == [{1}, {1}, {0}, {0}]
    assert max(rank_disagreement(four.steps, job_scopes(four.metas)).values()) <= AGREEMENT_TOLERANCE


def test_script_clipping_of_sharded_models_is_divided_out(job: Job) -> None:
    # FSDP2's clip_grad_norm_ returned a DTensor: its full value is the truth, and the applied norm is the clip
    for case in ("fsdp2", "fsdp1"):
        steps = _rows(job.steps, optimizer=job.index[case], rank=1)
        assert (steps["clip_source"] == "script").all()
        assert (steps["clip_coef"] < 1).all()
        np.testing.assert_allclose(steps["applied_norm"], 0.05, rtol=1e-3)
    totals = [r["clip_total"] for r in job.refs if r["case"] == "fsdp2" and "clip_total" in r and r["rank"] == 0]
    np.testing.assert_allclose(_rows(job.steps, optimizer=job.index["fsdp2"], rank=0)["grad_norm"], totals, rtol=REL)


def test_replicated_values_agree_across_ranks(job: Job) -> None:
    spread = rank_disagreement(job.steps, job_scopes(job.metas))
    assert set(spread) == {job.index[c] for c in CASES}
    assert max(spread.values()) <= AGREEMENT_TOLERANCE


def test_recommend_reads_a_job_once_per_step(job: Job) -> None:
    from gradscope.recommend import recommend

    recs = {rec.optimizer: rec for rec in recommend(job.run)}
    for case in CASES:
        rec = recs[job.index[case]]
        assert (rec.n_ranks, rec.norm_scope) == (2, SCOPES[case])
        truth = [t["grad_norm"] for t in job.truth(case, 0)]
        assert rec.distribution.n_used == 3
        assert rec.distribution.max == pytest.approx(max(truth), rel=REL)
        assert {s.layer for s in rec.layers} == set(job.truth(case, 0)[0]["layers"])
        assert "ranks-disagree" not in {n.slug for n in rec.notes}


def test_a_step_one_rank_lacks_is_not_combined(job: Job) -> None:
    """Rank 1 without its last step (it died before writing it): that step's combined norms are null on rank 0,
    never rank 0's pieces alone; the other steps combine as before (the row-by-row path)."""
    import pyarrow.compute as pc

    index, last = job.index["fsdp2"], 2
    tables = {kind: [] for kind in ("steps", "layers")}
    for rank, meta, run in job.per_rank:
        for kind in tables:
            table = run.read_table(kind)
            if rank == 1:
                table = table.filter(pc.invert(pc.and_(pc.equal(table["optimizer"], index), pc.equal(table["step"], last))))
            tables[kind].append((rank, meta, table))
    steps = _rows(join_ranks("steps", tables["steps"]), optimizer=index, rank=0)
    layers = _rows(join_ranks("layers", tables["layers"]), optimizer=index, rank=0)
    truth = job.truth("fsdp2", 0)
    assert np.isnan(steps["grad_norm"][-1])
    np.testing.assert_allclose(steps["grad_norm"][:-1], [t["grad_norm"] for t in truth[:-1]], rtol=REL)
    assert np.isnan(layers["norm"][layers["step"] == last]).all()
    first = layers["step"] == 0
    got = dict(zip(layers["layer"][first], layers["norm"][first], strict=True))
    assert got == pytest.approx(truth[0]["layers"], rel=REL)


def test_one_ranks_run_read_alone_is_rank_local(job: Job) -> None:
    from gradscope.recommend import recommend

    recs = {rec.optimizer: rec for rec in recommend(gradscope.load_run(job.per_rank[1][2].path), with_layers=False)}
    for case, scope in SCOPES.items():
        rec = recs[job.index[case]]
        assert rec.norm_scope == ("rank-local" if scope == "sharded" else "global")
        assert ("rank-local" in {n.slug for n in rec.notes}) == (scope == "sharded")
