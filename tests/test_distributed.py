"""Distributed training: a 2-process gloo group equals one process with the same global batch."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from helpers import ROOT

TINY = ["debug=toy", "train.steps=30", "tracking.enabled=false"]  # conf/debug/toy.yaml
TOLERANCE = 1e-5  # float reduction order (all-reduce sum / 2 vs one mean) over 30 AdamW steps


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def final_state(run_dir):
    return torch.load(run_dir / "checkpoints" / "step-00000030.pt", weights_only=True)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *TINY, f"hydra.run.dir={tmp_path / 'single'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            str(ROOT / "launch.py"),
            *TINY,
            f"hydra.run.dir={tmp_path / 'ddp'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = final_state(tmp_path / "single"), final_state(tmp_path / "ddp")
    for key in a["model"]:
        assert torch.allclose(a["model"][key], b["model"][key], atol=TOLERANCE, rtol=0), key
    for key in a["ema"]:
        if a["ema"][key].is_floating_point():
            assert torch.allclose(a["ema"][key], b["ema"][key], atol=TOLERANCE, rtol=0), key
    # only rank 0 logs the training lines, with the global loss
    assert ddp.stderr.count("step 30/30") == 1
    single_loss = [ln for ln in single.stderr.splitlines() if "step 30/30" in ln][0].split("loss ")[1].split()[0]
    ddp_loss = [ln for ln in ddp.stderr.splitlines() if "step 30/30" in ln][0].split("loss ")[1].split()[0]
    assert float(ddp_loss) == pytest.approx(float(single_loss), rel=1e-4)
