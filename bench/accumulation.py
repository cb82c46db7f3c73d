"""Gradient accumulation (train.micro_batch): peak memory and step time against the micro-batch size.

One IMM training step of a fixed global batch (default: DiT-S/4 at 32x32, batch 64, M=4) split into
micro-batches of --micro samples as imm/training/loop.py splits it (its `_micro_batches`, one draw for the
whole batch, loss / n_micro backward per micro-batch, then clip and AdamW). Step times are measured with
the settings alternating in one process (bench/_common.py: interleaved); peak memory in a fresh
subprocess per setting: CUDA max_memory_allocated on a GPU, on the CPU the peak RSS
(VmHWM, glibc's mmap threshold fixed) above the RSS once torch's libraries are loaded.

    python bench/accumulation.py                  # CPU, one torch thread: about 3 minutes
    python bench/accumulation.py --device cuda --batch 256 --micro 256,128,64,32

Writes bench/results/accumulation.json and the table to bench/results/accumulation.md (--out to change).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import _common as C
import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="dit_s_4", help="an imm.nets.build name")
    p.add_argument(
        "--arch-override", action="append", default=[], metavar="KEY=VALUE", help="architecture setting, repeatable"
    )
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch", type=int, default=64, help="the global batch (one process)")
    p.add_argument("--micro", default="64,32,16,8", help="micro-batch sizes, comma-separated (each divides --batch)")
    p.add_argument("--M", type=int, default=4, help="particles per group (divides every micro-batch)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (each runs every setting once)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--memory-steps", type=int, default=2, help="steps run by each memory subprocess")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    C.add_common_args(p, "accumulation")
    args = p.parse_args(argv)
    args.micro = [int(m) for m in args.micro.split(",")]
    bad = [m for m in args.micro if args.batch % m or m % args.M]
    if bad:
        raise SystemExit(f"--micro {bad} must divide --batch {args.batch} and be multiples of --M {args.M}")
    return args


class Setup:
    """Network, IMM objective, AdamW and a fixed batch; `step(micro)` is one accumulated training step."""

    def __init__(self, args, device):
        from imm.training.loop import _micro_batches

        self.micro_batches = _micro_batches
        shape = C.sample_shape(args.arch, args.resolution, args.channels, 0)
        self.net = C.build_net(args.arch, shape, C.parse_overrides(args.arch_override), device, args.seed)
        _, self.imm, _ = C.objectives(M=args.M)
        self.x = (0.5 * torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(args.seed))).to(device)
        self.opt = C.adamw(self.net.parameters(), device)
        self.gen = torch.Generator(device)
        self.step_no, self.seed = 0, args.seed

    def step(self, micro: int):
        self.gen.manual_seed(self.seed * 100003 + self.step_no)
        self.step_no += 1
        draws = self.imm.draw(self.x, generator=self.gen)
        self.opt.zero_grad(set_to_none=True)
        parts = self.micro_batches(self.net, self.x.shape[0], micro, False)
        for samples, _ in parts:
            loss, _ = self.imm.loss(self.net, self.x[samples], draws[samples])
            (loss / len(parts)).backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()


def child(args) -> None:
    """Peak memory of --memory-steps steps at micro-batch args.child, printed as one MEMORY line."""
    device = C.resolve_device(args.device)
    C.setup_threads(args.threads)
    tiny = Setup(argparse.Namespace(**{**vars(args), "batch": args.M, "arch_override": ["depth=1"]}), device)
    tiny.step(args.M)  # torch's lazily loaded libraries (oneDNN, the optimizer's imports) into the baseline
    del tiny
    library_rss_kb = C.proc_status_kb("VmRSS")
    su = Setup(args, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.memory_steps):
        su.step(args.child)
    C.sync(device)
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec, so a child of the timing process
    # would report the parent's RSS at fork (2.3 GB for every setting here)
    out = {"library_rss_kb": library_rss_kb, "peak_rss_kb": C.proc_status_kb("VmHWM")}
    if device.type == "cuda":
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    print("MEMORY " + json.dumps(out), flush=True)


def peak_mb(micro: int, device) -> float:
    # glibc's adaptive mmap threshold otherwise keeps freed activations in the heap, and from the second step
    # on the peak RSS of every setting is that of the largest micro-batch; a fixed threshold returns them
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    return C.memory_mb(C.memory_child(__file__, str(micro), env=env), device)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child(args)
    device = C.resolve_device(args.device)
    C.setup_threads(args.threads)
    info = C.machine_info(device)
    su = Setup(args, device)
    n_params = sum(p.numel() for p in su.net.parameters())
    C.log(f"{args.arch}, {n_params / 1e6:.2f}M parameters, global batch {args.batch}, M {args.M}, {device}")
    cases = {m: (lambda m=m: su.step(m)) for m in args.micro}
    raw = C.interleaved(
        cases, device, repeats=args.repeats, warmup=args.warmup, iters=C.default_iters(args.iters, device), log=C.log
    )
    key = C.primary_key(device)
    memory = {m: peak_mb(m, device) for m in args.micro}
    full = args.micro[0]
    rows = [
        {
            "micro_batch": m,
            "n_micro": args.batch // m,
            "peak_mb": memory[m],
            "memory_vs_first": memory[m] / memory[full],
            "step_ms": C.median(raw[m][key]) * 1e3,
            "time_vs_first": C.paired_ratio(raw[m][key], raw[full][key]),
            "samples_per_s": args.batch / C.median(raw[m]["wall"]),
        }
        for m in args.micro
    ]
    memory_what = "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS above the loaded libraries"
    columns = [
        ("micro-batch", "micro_batch", ""),
        ("micro-batches per step", "n_micro", ""),
        (f"peak MB ({memory_what})", "peak_mb", ".0f"),
        (f"memory vs {full}", "memory_vs_first", ".2f"),
        (f"step ms ({'CPU' if key == 'cpu' else 'wall'})", "step_ms", ".0f"),
        (f"time vs {full}", "time_vs_first", ".2f"),
        ("samples/s", "samples_per_s", ".3g"),
    ]
    text = C.table(rows, columns)
    header = (
        f"## gradient accumulation: {args.arch} ({args.channels}, {args.resolution}, {args.resolution}),"
        f" global batch {args.batch}, M {args.M}, {n_params / 1e6:.2f}M parameters\n{C.describe(info)}\n"
        f"step times: medians of {args.repeats} alternating rounds; memory: a fresh process per setting,"
        f" {args.memory_steps} steps\n\n"
    )
    print(header + text)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"}
    result = {"config": config, "machine": info, "clock": key, "parameters": n_params, "timings_s": raw, "rows": rows}
    path = C.write_json(args.out, result)
    Path(args.out).with_suffix(".md").write_text(header + text + "\n")
    C.log(f"wrote {path} and {Path(args.out).with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
