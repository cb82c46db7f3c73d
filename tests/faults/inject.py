#!/usr/bin/env python
"""Run launch.py with one fault injected for real, as tests/test_reliability.py needs it.

    IMM_FAULT=<fault>[;<fault>...] python tests/faults/inject.py [launch.py overrides ...]

Faults (steps count the training steps of this process, 0-based; these tests use fresh runs):

  kill_in_save:N        the N-th checkpoint write of this process stops halfway: torch.save inside
                        imm.training.checkpoint writes part of the file, fsyncs it, then the process
                        sends itself SIGKILL (a node dying mid-write)
  nan_loss:A-B          the objective's loss and its `mmd` term are NaN at steps A..B (`A-`: from A on)
  nan_grad:A-B          the gradient of the network's output-layer weight is inf at steps A..B; the loss
                        stays finite
  signal_after_open:SIG the process sends itself SIG (e.g. SIGTERM) right after the MLflow run is
                        created, before the first training step
  raise_after_open      an exception right after the MLflow run is created, before the first step
  raise_at:K            a RuntimeError inside training step K (0-based; after the network's forward pass,
                        so the step took its batch and its dropout draws): an error that ends the loop
  pause_at:K:FILE       training step K waits until FILE exists, after writing FILE.waiting (so a test can
                        act at a known step: stop the tracking server, start it again)
  kill_in_encode:K      `--config-name encode` sends itself SIGKILL while it commits its K-th shard of this
                        process: the shard's files are written, the manifest does not list them yet
  signal_in_data:SIG    the process sends itself SIG (e.g. SIGINT, a Ctrl-C) while the training data load,
                        after the run directory's lock is taken and before any MLflow run exists
  sigint_in_import:MOD  the process sends itself SIGINT (a Ctrl-C) as the module MOD (e.g. torch) is first
                        imported: a Ctrl-C while the libraries load, at a known moment

Everything else is launch.py unchanged: Hydra parses the same command line and runs the same task.
"""

from __future__ import annotations

import io
import itertools
import os
import runpy
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _steps(spec: str):
    a, _, b = spec.partition("-")
    first = int(a)
    if "-" not in spec:
        return lambda step: step == first
    last = int(b) if b else None
    return lambda step: step >= first and (last is None or step <= last)


def kill_in_save(n: str) -> None:
    import torch

    from imm.training import checkpoint

    real_save, calls = torch.save, itertools.count(1)

    def save(obj, f, *args, **kwargs):
        if next(calls) < int(n):
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    class TorchWithFaultySave:  # torch as imm.training.checkpoint sees it, with save replaced
        def __getattr__(self, name):
            return getattr(torch, name)

    TorchWithFaultySave.save = staticmethod(save)
    checkpoint.torch = TorchWithFaultySave()


_calls = itertools.count()
_nan_loss, _nan_grad, _raise_at, _pause_at = [], [], [], []


def _patch_objective() -> None:
    import torch

    from imm.core.objective import IMMObjective

    if getattr(IMMObjective, "_fault_patched", False):
        return
    real_call = IMMObjective.loss
    hooked = {"net": None, "on": False}

    def grad_hook(g):
        return torch.full_like(g, float("inf")) if hooked["on"] else g

    def call(self, net, x, labels=None, **kwargs):
        step = next(_calls)
        if hooked["net"] is None:
            hooked["net"] = net
            net.out.weight.register_hook(grad_hook)  # the MLP's output layer
        hooked["on"] = any(f(step) for f in _nan_grad)
        for at, path in _pause_at:
            if step == at:
                _wait_for(Path(path))
        loss, diag = real_call(self, net, x, labels, **kwargs)
        if step in _raise_at:
            raise RuntimeError(f"injected fault in training step {step}")
        if any(f(step) for f in _nan_loss):
            loss = loss * float("nan")
            diag = {**diag, "mmd": torch.full_like(diag["mmd"], float("nan"))}
        return loss, diag

    IMMObjective.loss = call
    IMMObjective._fault_patched = True


def nan_loss(spec: str) -> None:
    _nan_loss.append(_steps(spec))
    _patch_objective()


def nan_grad(spec: str) -> None:
    _nan_grad.append(_steps(spec))
    _patch_objective()


def raise_at(k: str) -> None:
    _raise_at.append(int(k))
    _patch_objective()


def pause_at(spec: str) -> None:
    k, _, path = spec.partition(":")
    _pause_at.append((int(k), path))
    _patch_objective()


def _wait_for(path: Path, timeout: float = 600.0) -> None:
    Path(f"{path}.waiting").touch()
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"pause_at: {path} did not appear within {timeout:.0f} s")
        time.sleep(0.05)


def _after_open(action) -> None:
    from imm.tracking.mlflow_run import Tracker

    real_open = Tracker.open.__func__

    def open_(cls, *args, **kwargs):
        tracker = real_open(cls, *args, **kwargs)
        action()
        return tracker

    Tracker.open = classmethod(open_)


def signal_after_open(name: str) -> None:
    _after_open(lambda: os.kill(os.getpid(), getattr(signal, name)))


def raise_after_open(_: str = "") -> None:
    def fail():
        raise RuntimeError("injected fault right after the MLflow run was created")

    _after_open(fail)


def kill_in_encode(k: str) -> None:
    from imm.data import latents

    real_write, calls = latents.write_manifest, itertools.count(1)

    def write_manifest(root, manifest):
        if next(calls) == int(k):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(root, manifest)

    latents.write_manifest = write_manifest


def _python_sigint_handler() -> None:
    """SIGINT raises KeyboardInterrupt, as in a process started from a terminal: a process started in the
    background of a non-interactive shell inherits SIGINT ignored, and Python then leaves it ignored."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def signal_in_data(name: str) -> None:
    from imm import factory

    _python_sigint_handler()

    real_dataset = factory.dataset

    def dataset(cfg):
        os.kill(os.getpid(), getattr(signal, name))
        return real_dataset(cfg)

    factory.dataset = dataset


class _SigintOnImport:
    """A meta-path finder that finds nothing: it only sends SIGINT when `module` is looked up the first time."""

    def __init__(self, module: str):
        self.module = module

    def find_spec(self, name, path=None, target=None):
        if name == self.module:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None


def sigint_in_import(module: str) -> None:
    _python_sigint_handler()
    sys.meta_path.insert(0, _SigintOnImport(module))


FAULTS = {
    f.__name__: f
    for f in (
        kill_in_save,
        nan_loss,
        nan_grad,
        signal_after_open,
        raise_after_open,
        raise_at,
        pause_at,
        signal_in_data,
        sigint_in_import,
        kill_in_encode,
    )
}


def main() -> None:
    sys.path.insert(0, str(ROOT))  # the imm beside this file, as `python launch.py` would import it
    for fault in filter(None, os.environ.get("IMM_FAULT", "").split(";")):
        name, _, arg = fault.partition(":")
        FAULTS[name](arg)
    # launch.py as __main__, exactly as `python launch.py ...` runs it (Hydra finds conf/ beside it)
    sys.argv = [str(ROOT / "launch.py"), *sys.argv[1:]]
    runpy.run_path(str(ROOT / "launch.py"), run_name="__main__")


if __name__ == "__main__":
    main()
