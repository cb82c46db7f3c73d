"""Helpers shared by the bench/ scripts: machine description, timing, tables, JSON, net building.

Timing on a shared machine: every script measures the cases it compares ALTERNATELY (round-robin
over repeats) in one process and reports medians, so a neighbour's load hits all cases alike. On
the CPU it records both wall-clock time and this process's CPU time (time.process_time); with one
torch thread the CPU time is the work done and hardly moves when other processes compete for the
cores, so the ratios are computed from it. On CUDA the wall-clock time (after a synchronize) is
the measure.
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REPO = BENCH_DIR.parent


# -- command line --------------------------------------------------------------------------------
def parse_overrides(items) -> dict:
    """['hidden_size=64', 'channel_mult=[1,2]'] -> {'hidden_size': 64, 'channel_mult': [1, 2]}."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"an architecture override must look like key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def arch_spec(text: str):
    """'dit_s_4' or 'dit_s_4:hidden_size=64,depth=2' -> ('dit_s_4', {...}, label)."""
    name, _, rest = text.partition(":")
    overrides = parse_overrides([p for p in _split_top(rest)] if rest else [])
    return name, overrides, text


def _split_top(text: str):
    """Split on commas that are not inside brackets (so channel_mult=[1,2] stays whole)."""
    depth, cur, parts = 0, "", []
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    return parts


def add_common_args(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: stable CPU-time measurements on a shared machine; 0 keeps torch's default)",
    )
    p.add_argument(
        "--iters", type=int, default=0, help="calls per timed sample, back to back (default: 1 on the CPU, 10 on CUDA)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None if name == "step_cost" else RESULTS_DIR / f"{name}.json",
        help="JSON file for the results (default: bench/results/"
        + ("step_cost_<arch>_<size>_b<batch>.json)" if name == "step_cost" else f"{name}.json)"),
    )


def resolve_device(name: str) -> torch.device:
    """--device through the project's one resolver (imm.factory.device); a bad value exits with its sentence."""
    from imm import factory
    from imm.errors import ConfigError

    try:
        return factory.device(name, key="--device")
    except ConfigError as e:
        raise SystemExit(str(e)) from None


def setup_threads(threads: int) -> None:
    if threads and threads > 0:
        torch.set_num_threads(threads)


# -- machine -------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict:
    info = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host_cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def describe(info: dict) -> str:
    dev = info.get("gpu") or f"{info['host_cpu']}, {info['cpu_cores']} cores, {info['torch_threads']} torch thread(s)"
    load = info.get("load_average_at_start")
    load_txt = f", load average {load[0]:.1f} at start" if load else ""
    return f"{info['date']} | {info['device']}: {dev} | torch {info['torch']}{load_txt}"


# -- timing --------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """Run fn once; (wall seconds, process CPU seconds)."""
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - w0, time.process_time() - c0


def interleaved(cases: dict, device: torch.device, *, repeats: int, warmup: int = 1, iters: int = 1, log=None) -> dict:
    """Time every case alternately: `warmup` untimed rounds, then `repeats` rounds, each running each
    case `iters` times back to back between two synchronizations (so on a GPU the host runs ahead
    of the device as in training). Returns {name: {"wall": [...], "cpu": [...]}}, seconds per call."""
    names = list(cases)
    for _ in range(warmup):
        for n in names:
            cases[n]()
    out = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(repeats):
        for n in names:
            fn = cases[n]
            w, c = timed(lambda: [fn() for _ in range(iters)], device)
            out[n]["wall"].append(w / iters)
            out[n]["cpu"].append(c / iters)
        if log:
            log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{n} {out[n]['wall'][-1] * 1e3:.0f}ms" for n in names))
    return out


def default_iters(iters, device: torch.device) -> int:
    """Calls per timed sample: 1 on the CPU (each call is long), 10 on a GPU (launch overlap)."""
    return iters if iters else (10 if device.type == "cuda" else 1)


def primary_key(device: torch.device) -> str:
    """Which clock the ratios use: CPU time on the CPU (robust to neighbours), wall time on CUDA."""
    return "cpu" if device.type == "cpu" else "wall"


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def paired_ratio(a, b):
    """Median of per-round ratios a_i / b_i (rounds are adjacent in time, so load cancels)."""
    return median([x / y for x, y in zip(a, b) if y > 0])


def count_ops(fn) -> dict:
    """Number of aten operator calls made by fn() (forward and backward), by name. On a GPU each is
    (about) one kernel launch, so for small tensors this is what the call costs."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    counts = Counter()

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[str(func.overloadpacket.__name__)] += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        fn()
    return dict(counts)


VIEW_OPS = {
    "view",
    "_unsafe_view",
    "reshape",
    "expand",
    "as_strided",
    "unsqueeze",
    "squeeze",
    "t",
    "transpose",
    "permute",
    "slice",
    "select",
    "unbind",
    "split",
    "chunk",
    "narrow",
    "detach",
    "alias",
    "flatten",
    "_reshape_alias",
    "view_as",
    "expand_as",
    "lift_fresh",
    "_to_copy_view",
}


def kernel_ops(counts: dict) -> int:
    """Operator calls that launch work (views and metadata-only ops excluded)."""
    return sum(v for k, v in counts.items() if k not in VIEW_OPS)


# -- memory --------------------------------------------------------------------------------------
def proc_status_kb(field: str) -> int:
    """VmRSS / VmHWM of this process in kB (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def memory_child(script, child_arg: str, env: dict | None = None) -> dict:
    """Run `script` again with this command line plus `--child child_arg` (a fresh process, so its peak is
    its own) and return the dict it prints on its last `MEMORY {json}` line."""
    cmd = [sys.executable, str(Path(script).resolve()), *sys.argv[1:], "--child", child_arg]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {child_arg} failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY ")][-1]
    return json.loads(line[len("MEMORY ") :])


def memory_mb(m: dict, device: torch.device) -> float:
    """A memory child's peak in MB: CUDA's max allocated, or on CPU the peak RSS above the libraries' RSS."""
    if device.type == "cuda":
        return m["cuda_peak_bytes"] / 2**20
    return (m["peak_rss_kb"] - m["library_rss_kb"]) / 1024


# -- output --------------------------------------------------------------------------------------
def fmt(v, spec: str = ".3g") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    if isinstance(v, float) and v != v:
        return "n/a"
    return format(v, spec)


def table(rows, columns) -> str:
    """Markdown table; columns = [(header, key or callable, format spec)]."""
    from imm.report import render

    def cell(row, key, spec):
        v = key(row) if callable(key) else row.get(key)
        return fmt(v, spec) if spec else ("n/a" if v is None else str(v))

    rows = [[cell(row, key, spec) for _, key, spec in columns] for row in rows]
    return render([c[0] for c in columns], rows, markdown=True)


def write_json(path: Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    return path


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (torch.device, torch.dtype, Path)):
        return str(o)
    raise TypeError(type(o).__name__)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- networks and objectives ---------------------------------------------------------------------
def sample_shape(arch: str, resolution: int, channels: int, dim: int):
    return (dim,) if arch == "mlp" else (channels, resolution, resolution)


def build_net(arch: str, shape, overrides: dict, device: torch.device, seed: int = 0, augment_dim: int = 0):
    from imm import nets

    torch.manual_seed(seed)
    return nets.build(arch, tuple(shape), 0, augment_dim, **overrides).to(device)


def objectives(M: int = 4, k: float = 12, a: float = 1.0, b: float = 4.0, weighting: str = "paper", augment=None):
    """(parameterization, IMMObjective, FMObjective) with the default job's settings: Euler-FM on
    OT-FM, eta-decrement k=12, T=0.994, eps=0, a=1, b=4, Laplace kernel (conf/ defaults); `augment` an
    imm.data.augment.Augment or None."""
    from imm.core import mapping, objective, parameterization

    par = parameterization.get("euler_fm", schedule="fm", sigma_data=0.5)
    imm = objective.IMMObjective(
        par,
        mapping.Mapping("eta_decrement", schedule="fm", k=k, eps=0.0, T=0.994),
        M=M,
        a=a,
        b=b,
        weighting=weighting,
        augment=augment,
    )
    fm = objective.FMObjective(par, eps=0.0, T=0.994, augment=augment)
    return par, imm, fm


def method_objective(name: str, steps: int = 3000):
    """The training objective of `loss=name` (meanflow, ict, ...) as the platform builds it from conf/ (each
    option at its default; iCT's curriculum K = `steps`), for an unconditional net."""
    from hydra import compose, initialize_config_dir

    from imm import factory
    from imm.launch import register

    register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=[f"loss={name}", f"train.steps={steps}"])
    return factory.objective(cfg)


def module_at(rev: str, path: str = "imm/data/augment.py"):
    """The file `path` of this repository as it was at git revision `rev`, loaded as a module of its own
    (to measure old code beside the current in one process)."""
    import types

    src = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{rev}:{path}"], capture_output=True, text=True, check=True
    ).stdout
    module = types.ModuleType(f"{Path(path).stem}_at_{rev}")
    exec(compile(src, f"{rev}:{path}", "exec"), module.__dict__)
    return module


def adamw(params, device: torch.device, impl: str = "auto", lr: float = 1e-4):
    """AdamW as imm.factory.optimizer builds it (impl='auto': foreach on CUDA, torch's default on the
    CPU), or a forced implementation: 'forloop', 'foreach', 'fused'."""
    kwargs = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    if impl == "auto":
        if device.type == "cuda":
            kwargs["foreach"] = True
    elif impl == "forloop":
        kwargs["foreach"] = False
    elif impl == "foreach":
        kwargs["foreach"] = True
    elif impl == "fused":
        kwargs["fused"] = True
    else:
        raise SystemExit(f"unknown AdamW implementation {impl!r}")
    return torch.optim.AdamW(params, **kwargs)
