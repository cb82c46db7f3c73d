"""What a researcher sees in the terminal: one progress bar with log lines above it on a real
pseudo-terminal, periodic loss lines when stderr is a pipe, the loss history always in launch.log,
and the summary at the end."""

import os
import re
import shlex
import struct
import sys
import time

import pytest
from helpers import LAUNCH, compose_cfg, launch, one_thread_env
from mlflow.tracking import MlflowClient

from imm import factory

RUN = ("debug=toy", "train.steps=60", "train.log_every=10", "eval.every=30", "train.ckpt_every=30")
LOSS_LINE = re.compile(r"step (\d+)/60 loss ")


def run_in_terminal(cwd, *args, cols: int = 120, timeout: float = 300) -> tuple[int, str]:
    """`python launch.py args...` on a pseudo-terminal of `cols` columns, as in tmux: (exit status, output)."""
    import fcntl
    import pty
    import termios

    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin, stdout and stderr are the terminal
        try:
            os.chdir(cwd)
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
            os.execve(sys.executable, [sys.executable, str(LAUNCH), *args], one_thread_env())
        finally:
            os._exit(127)
    out, deadline = b"", time.time() + timeout
    try:
        while time.time() < deadline:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def screen_lines(output: str) -> list[str]:
    """What the terminal shows, blank lines left out: each line as its last carriage return left it."""
    return [shown for line in output.split("\n") if (shown := line.rstrip("\r").split("\r")[-1]).strip()]


@pytest.mark.slow
def test_a_terminal_shows_one_bar_log_lines_above_it_and_a_summary(tmp_path):
    run_dir = tmp_path / "run"
    status, out = run_in_terminal(tmp_path, *RUN, f"hydra.run.dir={run_dir}")
    assert status == 0, out[-3000:]
    shown = screen_lines(out)
    bars = [line for line in shown if line.startswith("train:")]
    assert len(bars) == 1 and "60/60" in bars[0] and "100%" in bars[0], bars  # one bar, left once at 100 %
    # every other line is a whole log record: none was written into the bar's line
    record = re.compile(r"\[?20\d\d|  ")  # ours `[2026-...`, MLflow's `2026/...`, the summary's indented lines
    assert all(record.match(line) for line in shown if line not in bars), shown
    assert not [line for line in shown if "it/s" in line and "[INFO]" in line], shown
    assert not LOSS_LINE.search(out)  # the bar shows the loss; the lines go to the log file ...
    log = (run_dir / "launch.log").read_text()
    assert [int(m) for m in LOSS_LINE.findall(log)] == [10, 20, 30, 40, 50, 60]  # ... all of them
    eval_line = next(i for i, line in enumerate(shown) if "eval @ 30" in line)
    assert shown.index(bars[0]) > eval_line  # the evaluation at step 30 printed above the running bar
    assert "run FINISHED: step 0 -> 60 of 60" in out and "train on" in out


@pytest.mark.slow
def test_a_pipe_gets_loss_lines_and_the_summary_and_launch_log_the_same_history(tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(tmp_path, *RUN, f"hydra.run.dir={run_dir}", check=True)
    assert "train:" not in proc.stderr and "\r" not in proc.stderr  # no bar without a terminal
    assert [int(m) for m in LOSS_LINE.findall(proc.stderr)] == [10, 20, 30, 40, 50, 60]
    log = (run_dir / "launch.log").read_text()
    assert [int(m) for m in LOSS_LINE.findall(log)] == [10, 20, 30, 40, 50, 60]
    summary = proc.stderr[proc.stderr.index("run FINISHED") :]
    head, table_head, one_step, floor = summary.splitlines()[:4]
    assert re.search(r"run FINISHED: step 0 -> 60 of 60 in [\d.]+ s, last train/loss [\d.]+", head), head
    assert table_head.split() == ["energy", "energy_ratio200", "sw2", "precision", "recall"]  # a ratio with its n
    assert one_step.split()[:2] == ["1", "step"] and floor.split()[0] == "floor"
    ratio = float(one_step.split()[3])
    assert ratio == pytest.approx(float(one_step.split()[2]) / float(floor.split()[1]), rel=1e-3)  # against the floor
    assert (
        f"run dir      {run_dir}" in summary
        and f"checkpoints  {run_dir}/checkpoints (newest step-00000060.pt)" in summary
    )
    command = re.search(r"train on +(.*)", summary)[1]
    assert command == f"python {LAUNCH} {' '.join(RUN[:1] + RUN[2:])} hydra.run.dir={run_dir} train.steps=120"
    assert "MLflow       run " in summary and "mlflow ui --workers 1 --backend-store-uri sqlite:///" in summary
    # the direct addresses in the UI (MLflow 3 opens on its GenAI pages): tests/test_compare.py opens them in a browser
    run_id = re.search(r"MLflow +run (\w+) in", summary)[1]
    experiment = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id).info.experiment_id
    runs = f"http://127.0.0.1:5000/#/experiments/{experiment}/runs"
    assert re.search(r"run page +(\S+)", summary)[1] == f"{runs}/{run_id}"
    assert re.search(r"runs table +(\S+)", summary)[1] == runs

    # training on stretches the cosine over the new train.steps: the summary said so, and the relaunch says it
    cfg = compose_cfg(*RUN)
    lr_60, lr_120 = factory.lr_at(cfg, 60), factory.lr_at(cfg, 60, 120)
    assert lr_60 < 1e-6 < lr_120 and f"goes from {lr_60:.3g} to {lr_120:.3g}" in summary
    on = launch(tmp_path, *shlex.split(command)[2:], check=True)
    said = "train.steps 60 -> 120: the cosine learning-rate schedule spans train.steps, so the lr at step 60 goes from"
    assert f"{said} {lr_60:.3g} to {lr_120:.3g} and decays to step 120" in on.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("imm").experiment_id])
    lrs = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/lr")}
    assert lrs[60] == pytest.approx(factory.lr_at(cfg, 59), abs=1e-12)  # the step-60 line: the lr of step 59
    assert lrs[70] == pytest.approx(factory.lr_at(cfg, 69, 120), rel=1e-6)
    assert run.info.run_name == "debug=toy"  # the experiment's name, not the first command's train.steps


def test_the_summary_table_puts_the_nfe_beside_a_guided_step_count_only():
    """NFE = the step count without guidance (no column for it); with guidance it doubles and the row says so."""
    from imm.training.progress import metric_table

    table = metric_table(
        {
            "final/energy_1step": 0.02,
            "final/energy_ratio_1step": 2.5,
            "final/nfe_1step": 1,
            "final/energy_floor": 0.008,
            "final/fid5k_2step_w1.5": 12.0,
            "final/nfe_2step_w1.5": 4,
        }
    )
    assert table[0].split() == ["energy", "energy_ratio", "fid5k"]
    assert [row.split("  ")[0] for row in table[1:]] == ["1 step", "2 steps w=1.5 (NFE 4)", "floor"]
