"""Distributed jobs in `compare` and `merge`: each arm is a torchrun job again, node runs merge into one job.

One 2-rank DDP job (gloo, CPU) is recorded once for the module; compare runs two 2-rank arms of it, and
merge splits it into two "node" runs and joins them again. Every run is a real subprocess of the CLI.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import GRADSCOPE, SCRIPTS, assert_exit_ok, clean_env, parse_refs

import gradscope

STEPS = 4
CLIP = 0.05  # far below this model's norms (0.3-0.6): every step of the clipped arm is clipped


def _run(argv: list[str], cwd: Path = SCRIPTS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> gradscope.Run:
    """A 2-rank DDP job recorded by `gradscope profile --nproc-per-node 2 --standalone`."""
    runs = tmp_path_factory.mktemp("dist") / "runs"
    assert_exit_ok(_run([*GRADSCOPE, "profile", "-q", "--runs-dir", str(runs), "--nproc-per-node", "2",
                         "--standalone", "dist_ddp.py", str(STEPS)]))
    run = gradscope.load_run(runs_dir=runs)
    assert run.world_size == 2 and run.meta.launch is not None and run.meta.launch.via == "gradscope"
    return run


def _edited_copy(run: gradscope.Run, dest: Path, **launch: Any) -> Path:
    """A copy of ``run`` whose job meta.json records another launch (what torchrun itself, or a node, writes)."""
    shutil.copytree(run.path, dest)
    meta = json.loads((dest / "meta.json").read_text())
    meta["launch"].update(launch)
    if launch.get("via") == "torchrun":  # a torchrun rank records its own command: gradscope profile SCRIPT ARGS
        meta["command"] = ["gradscope", "profile", meta["target"], *meta["script_args"]]
    (dest / "meta.json").write_text(json.dumps(meta))
    return dest


def test_compare_reruns_each_arm_as_a_job_of_as_many_ranks(job: gradscope.Run, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    proc = _run([*GRADSCOPE, "compare", str(job.path), "--max-norm", str(CLIP), "--seeds", "1",
                 "--steps", "3", "--json", "--out", str(out)])
    assert_exit_ok(proc)
    doc = json.loads(proc.stdout)
    assert doc["launcher_args"] == ["--nproc-per-node", "2", "--standalone"]
    assert (out / "compare.json").is_file()
    by_arm = {arm["arm"]: arm for arm in doc["arms"]}
    assert set(by_arm) == {"baseline", f"max_norm={CLIP:g}"}
    for key, arm in by_arm.items():
        seed = arm["seeds"][0]
        run = gradscope.load_run(job.path.parent / seed["run_id"])
        steps = run.steps
        assert seed["status"] == "ok" and run.world_size == 2 and sorted(steps["rank"].unique()) == [0, 1]
        assert run.meta.launch is not None and run.meta.launch.via == "gradscope"
        assert (steps.groupby("rank").size() == 3).all()  # --steps 3 on every rank
        by_step = steps.pivot(index="step", columns="rank", values="grad_norm")
        assert np.allclose(by_step[0], by_step[1], rtol=1e-6)  # DDP: the ranks step on the same gradients
        # The loss compare reports is the mean over ranks of each step (final loss: the last step's here).
        last = steps[steps["step"] == steps["step"].max()]["loss"].mean()
        metrics = arm["optimizers"][0]["seeds"][0]
        assert metrics["n_steps"] == 3 and metrics["final_loss"] == pytest.approx(last, rel=1e-9)
        if key == "baseline":
            assert (steps["clip_source"] == "script-disabled").all()
            continue
        assert (steps["clip_source"] == "injected").all()
        assert (steps["applied_norm"] <= CLIP * (1 + 1e-5)).all() and (steps["grad_norm"] > CLIP).all()
        # torch's own clip_grad_norm_ in the script returned the pre-clip norm each rank recorded
        refs = {(r["rank"], r["step"]): r["norm"] for r in parse_refs(Path(seed["log"]).read_text())}
        recorded = {(int(r.rank), int(r.step)): float(r.grad_norm) for r in steps.itertuples()}
        assert recorded.keys() <= refs.keys()
        assert all(recorded[k] == pytest.approx(refs[k], rel=1e-5) for k in recorded)


def test_compare_plans_a_torchrun_job_and_refuses_a_job_across_nodes(job: gradscope.Run, tmp_path: Path) -> None:
    started = _edited_copy(job, tmp_path / "runs" / "by-torchrun", via="torchrun", launcher_args=[])
    proc = _run([*GRADSCOPE, "compare", str(started), "--max-norm", "1", "--seeds", "1", "--dry-run", "--json"])
    assert_exit_ok(proc)
    doc = json.loads(proc.stdout)
    argv = doc["commands"][0]["argv"]
    cut = argv.index("torch.distributed.run")
    assert argv[cut - 1] == "-m" and argv[cut + 1:] == ["--nproc-per-node", "2", "--standalone", "dist_ddp.py",
                                                       str(STEPS)]
    assert any("were not recorded" in note for note in doc["notes"])
    nodes = _edited_copy(job, tmp_path / "runs" / "two-nodes", nproc_per_node=1)
    proc = _run([*GRADSCOPE, "compare", str(nodes), "--max-norm", "1", "--dry-run"])
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "across nodes" in proc.stderr


def _tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _recommendation(run: Path) -> list[dict[str, Any]]:
    proc = _run([*GRADSCOPE, "recommend", str(run), "--json"])
    assert_exit_ok(proc)
    return json.loads(proc.stdout)["recommendations"]


def test_merge_joins_node_runs_into_the_job(job: gradscope.Run, tmp_path: Path) -> None:
    nodes = []
    for rank in (0, 1):  # one "node" run per rank, as two nodes without a shared filesystem leave them
        node = tmp_path / f"node{rank}"
        (node / "ranks").mkdir(parents=True)
        shutil.copy2(job.path / "meta.json", node / "meta.json")
        shutil.copytree(job.path / "ranks" / f"rank-{rank:05d}", node / "ranks" / f"rank-{rank:05d}")
        nodes.append(node)
    before = [_tree_digest(node) for node in nodes]
    merged = tmp_path / "merged"
    proc = _run([*GRADSCOPE, "merge", str(merged), *map(str, nodes)])
    assert_exit_ok(proc)
    assert "merged 2 ranks of 2 runs" in proc.stderr
    run = gradscope.load_run(merged)
    assert run.world_size == 2 and run.job is not None and run.job.world_size == 2 and run.status == "complete"
    for kind in ("steps", "layers"):
        assert run.read_table(kind).sort_by([("rank", "ascending")]).equals(
            job.read_table(kind).sort_by([("rank", "ascending")]))
    assert _recommendation(merged) == _recommendation(job.path)
    assert [_tree_digest(node) for node in nodes] == before  # the inputs are left as they were

    twice = _run([*GRADSCOPE, "merge", str(tmp_path / "dup"), str(nodes[0]), str(job.path)])
    assert twice.returncode == 1 and twice.stderr.count("\n") == 1 and "rank 0 is in both" in twice.stderr
    assert not (tmp_path / "dup").exists()
    other = json.loads((nodes[1] / "meta.json").read_text())
    other["script_sha256"] = "0" * 64
    (nodes[1] / "meta.json").write_text(json.dumps(other))
    refused = _run([*GRADSCOPE, "merge", str(tmp_path / "mixed"), *map(str, nodes)])
    assert refused.returncode == 1 and "different scripts" in refused.stderr and refused.stderr.count("\n") == 1
    assert_exit_ok(_run([*GRADSCOPE, "merge", "--force", str(tmp_path / "mixed"), *map(str, nodes)]))
    exists = _run([*GRADSCOPE, "merge", str(merged), str(nodes[0])])
    assert exists.returncode == 2 and exists.stderr.count("\n") == 1
