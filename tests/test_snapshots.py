"""EMA snapshots apart from training states (issue 14 item 4): real `python launch.py` trainings (debug=toy,
one thread) write `snapshots/snapshot-XXXXXXXX.pt` every train.snapshot_every steps and at the end, never
pruned; `sample` and `evaluate` take a snapshot, a state or a run directory; resuming takes states only."""

import json

import numpy as np
import pytest
import torch
from helpers import launch

from imm.training import checkpoint

TRAIN = ("debug=toy", "train.threads=1", "train.steps=30", "train.ckpt_every=10", "train.snapshot_every=10")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 30-step toy run keeping only its newest training state (keep_last=0), snapshots every 10 steps."""
    root = tmp_path_factory.mktemp("snap")
    run_dir = root / "run"
    proc = launch(root, *TRAIN, "train.keep_last=0", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, run_dir, proc.stderr


def test_snapshots_survive_keep_last_and_are_small(run):
    root, run_dir, log = run
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["step-00000030.pt"]
    snaps = checkpoint.list_snapshots(run_dir)
    assert [p.name for p in snaps] == [f"snapshot-{s:08d}.pt" for s in (10, 20, 30)]
    assert all(f"snapshot {p}" in log for p in snaps)  # one log line per snapshot, like the checkpoint line
    state = checkpoint.load(checkpoint.list_checkpoints(run_dir)[-1])
    snap = checkpoint.load(snaps[-1], required=checkpoint.SAMPLING_KEYS)
    assert snap["kind"] == checkpoint.SNAPSHOT and snap["step"] == 30
    assert not {"model", "optimizer", "rng", "data"} & set(snap)
    assert snap["config"] == state["config"] and snap["mlflow_run_id"] == state["mlflow_run_id"]
    assert snap["ema"].keys() == state["ema"].keys()  # the same key layout as a state's `ema`
    assert all(torch.equal(snap["ema"][k], state["ema"][k]) for k in state["ema"])
    ratio = checkpoint.list_checkpoints(run_dir)[-1].stat().st_size / snaps[-1].stat().st_size
    assert ratio > 3, ratio  # the toy MLP: model + EMA + Adam's two moments against the EMA alone (about 4x)


def test_sample_from_a_snapshot_equals_sample_from_the_state_of_its_step(run):
    root, run_dir, _ = run
    outs = {}
    for name, ckpt in (
        ("snap", checkpoint.list_snapshots(run_dir)[-1]),
        ("state", checkpoint.list_checkpoints(run_dir)[-1]),
    ):
        out = root / f"sample-{name}"
        proc = launch(root, "--config-name", "sample", f"ckpt={ckpt}", "n=200", "seed=3", f"out={out}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads((out / "sample.json").read_text())["ckpt"] == str(ckpt)
        outs[name] = np.load(out / "samples.npy")
    np.testing.assert_array_equal(outs["snap"], outs["state"])


def test_evaluate_a_run_directory_takes_its_newest_snapshot_or_state(run, tmp_path):
    root, run_dir, _ = run
    out = tmp_path / "eval"
    proc = launch(root, "--config-name", "evaluate", f"ckpt={run_dir}", "eval.steps=[1]", f"out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "results.json").read_text())
    assert record["ckpt"] == str((run_dir / "snapshots" / "snapshot-00000030.pt").resolve())  # a tie: the snapshot

    # the higher step wins whichever kind it is; resume= only ever sees training states
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "snapshots").mkdir()
    for name in ("checkpoints/step-00000020.pt", "snapshots/snapshot-00000010.pt"):
        (other / name).write_bytes(b"")
    assert checkpoint.resolve(other, key="ckpt", snapshots=True).name == "step-00000020.pt"
    (other / "snapshots" / "snapshot-00000030.pt").write_bytes(b"")
    assert checkpoint.resolve(other, key="ckpt", snapshots=True).name == "snapshot-00000030.pt"
    assert checkpoint.resolve(other / "snapshots", key="ckpt", snapshots=True).name == "snapshot-00000030.pt"
    assert checkpoint.resolve(other, key="resume").name == "step-00000020.pt"
    assert checkpoint.resolve(None, other).name == "step-00000020.pt"
    (other / "checkpoints" / "step-00000020.pt").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="snapshots hold EMA weights only"):
        checkpoint.resolve(other, key="resume")


def test_online_weights_and_resume_refuse_a_snapshot_in_one_sentence(run, tmp_path):
    root, run_dir, _ = run
    snap = run_dir / "snapshots" / "snapshot-00000020.pt"
    proc = launch(root, "--config-name", "sample", f"ckpt={snap}", "weights=online", f"out={tmp_path / 's'}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "is an EMA snapshot, which holds no online weights" in out and "Traceback" not in out

    proc = launch(root, *TRAIN, "train.steps=40", f"resume={snap}", f"hydra.run.dir={tmp_path / 'resumed'}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert f"resume={snap} is an EMA snapshot" in out and "Traceback" not in out
    assert not checkpoint.list_checkpoints(tmp_path / "resumed")

    renamed = tmp_path / "renamed.pt"  # a snapshot under another name is still refused, by its content
    renamed.write_bytes(snap.read_bytes())
    with pytest.raises(checkpoint.CheckpointError, match="is an EMA snapshot, which holds the EMA weights only"):
        checkpoint.load(renamed, required=checkpoint.REQUIRED_KEYS)


def test_best_snapshot_per_step_count(tmp_path):
    """The 1-step best and the 8-step best are different evaluations, so different snapshots."""
    from imm.tracking.mlflow_run import Tracker
    from imm.training.loop import _track_best

    def snapshot(step):
        path = checkpoint.snapshot_path(tmp_path, step)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(str(step).encode())
        return path

    best = {}
    first = {"eval/energy_ratio5k_1step": 2.0, "eval/energy_ratio5k_8step": 9.0, "eval/recall_1step": 0.9}
    _track_best(best, first, 10, Tracker.disabled(), tmp_path, snapshot)
    _track_best(
        best,
        {"eval/energy_ratio5k_1step": 2.5, "eval/energy_ratio5k_8step": 4.0},
        20,
        Tracker.disabled(),
        tmp_path,
        snapshot,
    )
    links = {n: tmp_path / "snapshots" / f"best-{n}step.pt" for n in (1, 8)}
    assert links[1].resolve().name == "snapshot-00000010.pt" and links[1].read_bytes() == b"10"
    assert links[8].resolve().name == "snapshot-00000020.pt"
    assert best == {
        "best/energy_ratio5k_1step": 2.0,
        "best/energy_ratio5k_8step": 4.0,
        "best_step/energy_ratio5k_1step": 10,
        "best_step/energy_ratio5k_8step": 20,
    }
    assert checkpoint.read_best(tmp_path) == best  # what a resumed run starts from
    # no snapshots (train.snapshot_every=0): the best values, no links
    _track_best(best, {"eval/energy_ratio5k_1step": 1.0}, 30, Tracker.disabled(), tmp_path, lambda step: None)
    assert best["best/energy_ratio5k_1step"] == 1.0 and best["best_step/energy_ratio5k_1step"] == 10


def test_the_run_links_its_best_snapshot_and_sampling_takes_it(run):
    root, run_dir, _ = run
    link = run_dir / "snapshots" / "best-1step.pt"  # debug=toy evaluates once, at the end
    assert link.is_symlink() and link.resolve().name == "snapshot-00000030.pt"
    assert checkpoint.list_snapshots(run_dir)[-1].name == "snapshot-00000030.pt"  # links are not snapshots
    assert checkpoint.resolve(link, key="ckpt", snapshots=True) == link
    assert checkpoint.load(link, required=checkpoint.SAMPLING_KEYS)["step"] == 30
    assert json.loads((run_dir / "snapshots" / "best.json").read_text())["best_step/energy_ratio200_1step"] == 30
