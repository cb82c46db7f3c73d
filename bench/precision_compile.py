"""IMM training-step throughput by precision and compilation: fp32 / TF32 / bf16 autocast / fp16
autocast, eager / torch.compile, with model FLOP utilisation (MFU).

    python bench/precision_compile.py --device cuda                      # the GPU table
    python bench/precision_compile.py --device cpu --archs dit_s_4       # the CPU run (fp32 only)

Each case is the loop's training step (imm/training/loop.py): IMMObjective under autocast (the
target pass in fp32 outside autocast, loss.target_fp32's default), GradScaler for fp16, gradient
clipping, AdamW (foreach on CUDA); TF32 on for tf32/bf16/fp16 and off for fp32, as the loop sets it;
torch.compile wraps the network for the student and the target as the loop does. All cases of one
network start from the same weights and are timed alternately (round-robin, medians); the first
call of a compiled case (compilation) is reported separately.

FLOPs of one training step (target forward + student forward + backward) are counted once per
network with torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention; the
optimizer's elementwise work is not counted). MFU = FLOPs per step x steps/s / peak FLOP/s of the
precision: dense peaks of known GPUs below, or --peak-tflops. Mixed precision is CUDA-only in the
loop, so on the CPU those rows read n/a.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
MODES = ("eager", "compile")

# Dense (no sparsity) peak TFLOP/s from the vendors' datasheets; matched against the device name
# in order, so the more specific names come first.
PEAK_TFLOPS = [
    ("H200", {"fp32": 67.0, "tf32": 494.0, "bf16": 989.0, "fp16": 989.0}),
    ("H100 PCIe", {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0}),
    ("H100 NVL", {"fp32": 60.0, "tf32": 418.0, "bf16": 835.0, "fp16": 835.0}),
    ("H100", {"fp32": 67.0, "tf32": 494.0, "bf16": 989.0, "fp16": 989.0}),  # SXM
    ("GH200", {"fp32": 67.0, "tf32": 494.0, "bf16": 989.0, "fp16": 989.0}),
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
    ("L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.0, "fp16": 362.0}),
    ("A10G", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0}),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--archs",
        nargs="+",
        default=["dit_s_4", "dit_b_2"],
        help="networks: an imm.nets.build name or NAME:key=value,...",
    )
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=None,
        help="batch size, one for all networks or one per --archs entry (default: 256 on CUDA, 32 on the CPU)",
    )
    p.add_argument("--M", type=int, default=4)
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default, reduce-overhead, max-autotune)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds (the first one compiles)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak TFLOP/s to divide by, for every precision (overrides the device table)",
    )
    C.add_common_args(p, "precision_compile")
    return p.parse_args(argv)


def peak_tflops(device: torch.device, precision: str, override):
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "unknown (CPU; pass --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks[precision], f"{key} datasheet"
    return None, f"unknown device {name!r} (pass --peak-tflops)"


def set_tf32(device: torch.device, enabled: bool) -> None:
    """As imm.training.loop._configure_precision: TF32 on for tf32/bf16/fp16, off for fp32 (CUDA only)."""
    if device.type != "cuda":
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def supported(device: torch.device, precision: str):
    """(ok, reason) for a precision on this device."""
    if precision == "fp32":
        return True, ""
    if device.type != "cuda":
        return False, "n/a (CUDA only)"
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        return False, "n/a (no bf16 on this GPU)"
    return True, ""


class Case:
    """One (network, precision, mode): its own copy of the weights, optimizer and scaler."""

    def __init__(self, name, shape, overrides, state, precision, mode, args, device):
        self.precision, self.mode, self.device, self.args = precision, mode, device, args
        self.net = C.build_net(name, shape, overrides, device)
        self.net.load_state_dict(state)
        _, self.imm, _ = C.objectives(M=args.M)
        self.opt = C.adamw(self.net.parameters(), device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        if mode == "compile":
            kw = {"mode": args.compile_mode} if args.compile_mode else {}
            self.student, self.target = torch.compile(self.net, **kw), torch.compile(self.net, **kw)
        else:
            self.student, self.target = self.net, self.net
        self.gen = torch.Generator(device)
        self.n = 0
        self.first_call_s = None

    def autocast(self):
        if self.precision in ("bf16", "fp16"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)
        return contextlib.nullcontext()

    def step(self, x):
        set_tf32(self.device, self.precision != "fp32")
        self.gen.manual_seed(self.n)
        self.n += 1
        with self.autocast():
            loss, _ = self.imm(self.student, x, target=self.target, generator=self.gen)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.scaler.step(self.opt)
        self.scaler.update()


def _dynamo_cache_room(limit: int = 64) -> None:
    """Every case compiles the same DiT.forward again (grad and no_grad, per autocast dtype): more
    graphs than dynamo's default cache limit (8), past which it silently falls back to eager."""
    import torch._dynamo

    for name in ("cache_size_limit", "accumulated_cache_size_limit", "recompile_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(limit, getattr(torch._dynamo.config, name)))


def count_flops(name, shape, overrides, state, x, args, device) -> dict:
    """FLOPs of one IMM training step (fp32 eager), by counting the aten ops it runs."""
    from torch.utils.flop_counter import FlopCounterMode

    case = Case(name, shape, overrides, state, "fp32", "eager", args, device)
    counter = FlopCounterMode(display=False)
    with counter:
        case.gen.manual_seed(0)
        loss, _ = case.imm(case.student, x, target=case.target, generator=case.gen)
        loss.backward()
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return {"total": int(counter.get_total_flops()), "by_op": by_op}


def main(argv=None):
    args = parse_args(argv)
    device = C.resolve_device(args.device)
    C.setup_threads(args.threads)
    if args.batch is None:
        args.batch = [256 if device.type == "cuda" else 32]
    if len(args.batch) not in (1, len(args.archs)):
        raise SystemExit(f"--batch takes one value or one per network ({len(args.archs)}), got {args.batch}")
    batches = args.batch * len(args.archs) if len(args.batch) == 1 else args.batch
    info = C.machine_info(device)
    key = C.primary_key(device)
    _dynamo_cache_room()
    rows, raw_all, flops_all = [], {}, {}
    for spec, batch in zip(args.archs, batches):
        if "compile" in args.modes:
            torch._dynamo.reset()  # each network compiles from scratch (its compile time is its own)
        name, overrides, label = C.arch_spec(spec)
        shape = C.sample_shape(name, args.resolution, args.channels, 2)
        state = {k: v.clone() for k, v in C.build_net(name, shape, overrides, device).state_dict().items()}
        x = (0.5 * torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))).to(device)
        n_params = sum(v.numel() for v in state.values())
        flops = count_flops(name, shape, overrides, state, x, args, device)
        flops_all[label] = {**flops, "batch": batch}
        C.log(f"{label}: {n_params / 1e6:.2f}M parameters, batch {batch}, {flops['total'] / 1e12:.3f} TFLOP/step")

        cases, skipped = {}, []
        for precision in args.precisions:
            ok, why = supported(device, precision)
            for mode in args.modes:
                if not ok:
                    skipped.append({"arch": label, "precision": precision, "mode": mode, "batch": batch, "status": why})
                    continue
                cases[(precision, mode)] = Case(name, shape, overrides, state, precision, mode, args, device)

        # first call of each case: compilation for the compiled ones
        failed = {}
        for k, case in cases.items():
            try:
                w, _ = C.timed(lambda: case.step(x), device)
                case.first_call_s = w
            except Exception as e:  # a compiler missing on this machine, an unsupported op, ...
                failed[k] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                C.log(f"{label} {k}: {failed[k]}")
        for k in failed:
            del cases[k]
        fns = {f"{p}/{m}": (lambda c=c: c.step(x)) for (p, m), c in cases.items()}
        raw = C.interleaved(
            fns,
            device,
            repeats=args.repeats,
            warmup=max(0, args.warmup - 1),
            iters=C.default_iters(args.iters, device),
            log=C.log,
        )
        raw_all[label] = raw
        base = raw.get("fp32/eager")
        for (precision, mode), case in cases.items():
            r = raw[f"{precision}/{mode}"]
            wall = C.median(r["wall"])
            t = C.median(r[key])
            peak, source = peak_tflops(device, precision, args.peak_tflops)
            achieved = flops["total"] / t / 1e12
            rows.append(
                {
                    "arch": label,
                    "params_M": n_params / 1e6,
                    "precision": precision,
                    "mode": mode,
                    "batch": batch,
                    "step_ms": t * 1e3,
                    "wall_ms": wall * 1e3,
                    "samples_per_s": batch / t,
                    "gflop_per_step": flops["total"] / 1e9,
                    "tflops": achieved,
                    "mfu": achieved / peak if peak else None,
                    "peak_tflops": peak,
                    "peak_source": source,
                    "speedup": C.paired_ratio(base[key], r[key]) if base else None,
                    "first_call_s": case.first_call_s,
                    "status": "ok",
                }
            )
        for (precision, mode), why in failed.items():
            rows.append({"arch": label, "precision": precision, "mode": mode, "batch": batch, "status": why})
        rows.extend(skipped)
        del cases, fns
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print("\n## IMM training step by precision and compilation")
    print(C.describe(info))
    print(
        f"medians of {args.repeats} alternating rounds ({key} time); speed-up vs fp32 eager from paired rounds;"
        f" FLOPs counted with FlopCounterMode\n"
    )
    print(
        C.table(
            rows,
            [
                ("network", "arch", None),
                ("precision", "precision", None),
                ("mode", "mode", None),
                ("batch", "batch", "d"),
                ("step ms", "step_ms", ".1f"),
                ("samples/s", "samples_per_s", ".4g"),
                ("vs fp32 eager", "speedup", ".2f"),
                ("TFLOP/s", "tflops", ".3g"),
                ("MFU", "mfu", ".1%"),
                ("first call s", "first_call_s", ".1f"),
                ("status", "status", None),
            ],
        )
    )
    for label, f in flops_all.items():
        print(
            f"{label}: {f['total'] / 1e9:.1f} GFLOP per training step (batch {f['batch']});"
            f" by op: {', '.join(f'{k} {v / 1e9:.1f}' for k, v in sorted(f['by_op'].items(), key=lambda kv: -kv[1]))}"
        )
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": info,
        "clock": key,
        "rows": rows,
        "flops": flops_all,
        "timings_s": raw_all,
    }
    path = C.write_json(args.out, result)
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
