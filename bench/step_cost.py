"""Cost of one IMM training step against one flow-matching step with the same network and batch, and with
--methods against a MeanFlow step and an iCT step too.

    python bench/step_cost.py --arch dit_s_4 --resolution 32 --batch 32 --M 4 --device cpu [--methods]

Measures, alternately in one process (round-robin over --repeats rounds, medians):

- imm_step: imm.core.objective.IMMObjective (target pass under no_grad + student forward) ->
  backward -> gradient clipping -> AdamW step, as imm/training/loop.py runs it;
- fm_step: the same with imm.core.objective.FMObjective;
- the pieces of the IMM step, each timed on its own:
  student_fwd_bwd  param.f(net, x_t, s, t) with gradient, then backward (grad of a same-shape loss);
  target_fwd       param.f(net, x_r, s, r) under torch.no_grad (what the objective runs);
  objective_math   the whole IMMObjective forward + backward around a stand-in network that costs
                   nothing (one scalar multiply): time and noise sampling, r(s,t), interpolation,
                   c_in/c_skip/c_out, RNG replay, the three kernel matrices, w~ and w, diagnostics;
  optimizer        gradient clipping + AdamW step;
  fm_math          the same stand-in measurement for FMObjective;
- with --methods: meanflow_step and ict_step, the same step with loss=meanflow and loss=ict as conf/ builds
  them (imm.factory.objective, every option at its default), and the MeanFlow target alone
  (meanflow_jvp: the torch.func.jvp pass under no_grad, which forward-mode AD makes cost about a forward
  and a backward); each step's time over the IMM step's is the median of per-round ratios;

and the peak memory of an IMM step and of an FM step (with --methods: of each method's step), each in a fresh
subprocess (CUDA:
torch.cuda.max_memory_allocated; CPU: the process's peak RSS, VmHWM, minus its RSS once torch and
its lazily loaded libraries are in, i.e. parameters + gradients + optimizer state + activations +
allocator slack).

Targets (issue "Benchmarks"): IMM/FM step time <= 1.45; objective math <= 2% of the IMM step
(DiT-S/4, 32x32, batch 32); IMM/FM peak memory <= 1.10.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGETS = {"time_ratio": 1.45, "math_share": 0.02, "memory_ratio": 1.10}
METHODS = ("meanflow", "ict")  # the --methods objectives, by their loss= name


class StandIn(nn.Module):
    """A network that costs nothing: G = w * x (one parameter, so backward runs)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x, noise_t, noise_s, labels=None):
        return x * self.w


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="dit_s_4", help="an imm.nets.build name (mlp, dit_s_4, dit_b_2, ddpmpp, ...)")
    p.add_argument(
        "--arch-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="architecture setting, repeatable (e.g. --arch-override hidden_size=192)",
    )
    p.add_argument("--resolution", type=int, default=32, help="image side (image nets)")
    p.add_argument("--channels", type=int, default=3, help="image channels (image nets)")
    p.add_argument("--dim", type=int, default=2, help="sample size D for --arch mlp")
    p.add_argument("--batch", type=int, default=32, help="batch size B (divisible by M)")
    p.add_argument("--M", type=int, default=4, help="particles per group")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (each runs every case once)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument(
        "--adamw",
        default="auto",
        choices=["auto", "forloop", "foreach", "fused"],
        help="AdamW implementation (auto: as imm.factory builds it)",
    )
    p.add_argument(
        "--compare-adamw",
        action="store_true",
        help="also time the optimizer step alone for each AdamW implementation, alternately",
    )
    p.add_argument(
        "--compare-ema",
        action="store_true",
        help="also time the loop's per-step EMA update (ema_pytorch) with and without foreach",
    )
    p.add_argument(
        "--compare-channels-last",
        action="store_true",
        help="also time the IMM step contiguous vs as built vs channels_last (net and batch), alternately",
    )
    p.add_argument(
        "--compare-sync",
        action="store_true",
        help="also time the IMM step with and without the loop's per-step host read of the"
        " finite-loss/gradient verdict (a device sync on CUDA), alternately",
    )
    p.add_argument(
        "--compare-augment",
        type=float,
        default=0.0,
        metavar="P",
        help="also time the IMM step with data.augment_p=P as of --augment-old and as now, alternately with"
        " the other cases (the net then takes augmentation labels), and the augmentation alone on the batch"
        " (every image transformed)",
    )
    p.add_argument(
        "--augment-old",
        default="4751d4c",
        metavar="REV",
        help="git revision whose imm/data/augment.py is the 'before' of --compare-augment (default: the"
        " Lanczos-3 resampling)",
    )
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm as in the loop (0: off)")
    p.add_argument("--channels-last", action="store_true", help="net and batch in channels_last (image nets)")
    p.add_argument("--memory-steps", type=int, default=3, help="steps run by each memory subprocess")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-split", action="store_true", help="time only the two full steps")
    p.add_argument(
        "--methods",
        action="store_true",
        help="also time a MeanFlow and an iCT step (loss=meanflow, loss=ict at their defaults), alternately with"
        " the IMM and FM steps, and their peak memory",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=["imm", "fm", *METHODS, "none"], help=argparse.SUPPRESS)
    C.add_common_args(p, "step_cost")
    args = p.parse_args(argv)
    if args.out is None:
        size = f"d{args.dim}" if args.arch == "mlp" else f"{args.resolution}px"
        tag = "_custom" if args.arch_override else ""
        args.out = C.RESULTS_DIR / f"step_cost_{args.arch}{tag}_{size}_b{args.batch}.json"
    return args


class Setup:
    """Network, objectives, optimizer and a fixed batch for one configuration."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.shape = C.sample_shape(args.arch, args.resolution, args.channels, args.dim)
        overrides = C.parse_overrides(args.arch_override)
        augment_dim = 9 if args.compare_augment else 0  # imm.data.augment.AUGMENT_DIM; unused without labels
        self.net = C.build_net(args.arch, self.shape, overrides, device, args.seed, augment_dim)
        self.par, self.imm, self.fm = C.objectives(M=args.M)
        g = torch.Generator().manual_seed(args.seed)
        self.x = (0.5 * torch.randn(args.batch, *self.shape, generator=g)).to(device)
        if args.channels_last and self.x.dim() == 4:
            self.net = self.net.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.opt = C.adamw(self.net.parameters(), device, args.adamw)
        self.gen = torch.Generator(device).manual_seed(args.seed)
        self.step_no = 0
        G = args.batch // args.M
        t, s, r = self.imm.sample_times(G, self.gen, device)
        self.t_b, self.s_b, self.r_b = (v.repeat_interleave(args.M) for v in (t, s, r))
        noise = 0.5 * torch.randn(self.x.shape, generator=self.gen, device=device)
        self.x_t = self.imm._interpolate(self.x, noise, self.t_b)
        self.x_r = self.imm._interpolate(self.x, noise, self.r_b)
        self.standin = StandIn().to(device)
        self.methods = {name: C.method_objective(name) for name in METHODS} if args.methods else {}
        if self.methods:
            mf = self.methods["meanflow"]
            t, r = mf.sample_times(args.batch, self.gen, device)
            self.mf_times, self.mf_z = (t, r), mf._interpolate(self.x, noise, t)
            self.mf_v = noise - self.x

    def objective_of(self, name: str):
        """The objective a step of `name` (imm, fm, meanflow, ict) runs."""
        return {"imm": self.imm, "fm": self.fm, **self.methods}[name]

    def _seed(self):
        self.gen.manual_seed(self.args.seed * 100003 + self.step_no)
        self.step_no += 1

    def _opt_step(self):
        if self.args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.args.grad_clip)
        self.opt.step()

    def step(self, objective, host_read: bool = False):
        self._seed()
        loss, _ = objective(self.net, self.x, generator=self.gen)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if host_read:  # as imm/training/loop.py decides whether to step: bool() of a device tensor
            norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.args.grad_clip or math.inf)
            if bool(torch.isfinite(loss) & torch.isfinite(norm)):
                self.opt.step()
            return
        self._opt_step()

    def imm_step(self):
        self.step(self.imm)

    def fm_step(self):
        self.step(self.fm)

    def method_step(self, name: str):
        return lambda: self.step(self.methods[name])

    def meanflow_jvp(self):
        mf = self.methods["meanflow"]
        t, r = self.mf_times
        with torch.no_grad():  # as MeanFlowObjective.loss runs it (its target is a stop-gradient)
            mf.target_velocity(self.net, self.mf_z, self.mf_v, t, r, None, None)

    def student_fwd_bwd(self):
        self.opt.zero_grad(set_to_none=True)
        y = self.par.f(self.net, self.x_t, self.s_b, self.t_b)
        y.float().square().mean().backward()

    def target_fwd(self):
        with torch.no_grad():
            self.par.f(self.net, self.x_r, self.s_b, self.r_b)

    def optimizer(self):
        self._opt_step()

    def _math(self, objective):
        self._seed()
        self.standin.zero_grad(set_to_none=True)
        loss, _ = objective(self.standin, self.x, generator=self.gen)
        loss.backward()

    def objective_math(self):
        self._math(self.imm)

    def fm_math(self):
        self._math(self.fm)


# -- peak memory in a fresh process ------------------------------------------------------------------
def _load_libraries(device) -> None:
    """One tiny IMM + FM step with AdamW, so that everything torch loads lazily on first use (oneDNN,
    the optimizer's torch._dynamo import, ~150 MB of RSS on the CPU) is in the baseline."""
    _, imm, fm = C.objectives(M=2)
    net = StandIn().to(device)
    opt = C.adamw(net.parameters(), device)
    x = torch.randn(4, 3, 8, 8, device=device)
    for obj in (imm, fm):
        loss, _ = obj(net, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    torch.nn.functional.scaled_dot_product_attention(*(torch.randn(1, 1, 4, 8, device=device),) * 3)
    torch.nn.functional.conv2d(x, torch.randn(2, 3, 3, 3, device=device))


def child(args) -> None:
    device = C.resolve_device(args.device)
    C.setup_threads(args.threads)
    _load_libraries(device)
    if args.methods:  # Hydra and the config schema, which building the methods' objectives loads, in the baseline
        C.method_objective("meanflow")
    library_rss = C.proc_status_kb("VmRSS")
    su = Setup(args, device)
    # drop what only the timing split needs, so the child holds exactly what a training step holds
    del su.x_t, su.x_r
    if su.methods:
        del su.mf_z, su.mf_v
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    setup_rss = C.proc_status_kb("VmRSS")
    if args.child != "none":
        for _ in range(args.memory_steps):
            su.step(su.objective_of(args.child))
    C.sync(device)
    out = {"library_rss_kb": library_rss, "setup_rss_kb": setup_rss, "peak_rss_kb": C.proc_status_kb("VmHWM")}
    if device.type == "cuda":
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    print("MEMORY " + json.dumps(out), flush=True)


# -- main --------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child(args)
    if args.batch % args.M:
        raise SystemExit(f"--batch {args.batch} must be divisible by --M {args.M}")
    device = C.resolve_device(args.device)
    C.setup_threads(args.threads)
    info = C.machine_info(device)
    su = Setup(args, device)
    n_params = sum(p.numel() for p in su.net.parameters())
    C.log(f"{args.arch} {su.shape}, {n_params / 1e6:.2f}M parameters, batch {args.batch}, M {args.M}, {device}")

    cases = {"imm_step": su.imm_step, "fm_step": su.fm_step}
    if not args.no_split:
        cases.update(
            {
                "student_fwd_bwd": su.student_fwd_bwd,
                "target_fwd": su.target_fwd,
                "optimizer": su.optimizer,
                "objective_math": su.objective_math,
                "fm_math": su.fm_math,
            }
        )
    for name in su.methods:
        cases[f"{name}_step"] = su.method_step(name)
    if su.methods and not args.no_split:
        cases["meanflow_jvp"] = su.meanflow_jvp
    if args.compare_augment:
        augment_steps, augment_alone = augment_cases(su, args)
        cases.update(augment_steps)
    raw = C.interleaved(
        cases, device, repeats=args.repeats, warmup=args.warmup, iters=C.default_iters(args.iters, device), log=C.log
    )
    key = C.primary_key(device)
    med = {n: {"wall": C.median(v["wall"]), "cpu": C.median(v["cpu"])} for n, v in raw.items()}

    imm_t = med["imm_step"][key]
    rows = []
    for n in cases:
        rows.append(
            {
                "case": n,
                "wall_ms": med[n]["wall"] * 1e3,
                "cpu_ms": med[n]["cpu"] * 1e3,
                "share": med[n][key] / imm_t,
                "samples_per_s": args.batch / med[n]["wall"] if n.endswith("_step") else None,
                "samples_per_cpu_s": args.batch / med[n]["cpu"] if n.endswith("_step") else None,
            }
        )
    time_ratio = C.paired_ratio(raw["imm_step"][key], raw["fm_step"][key])
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"},
        "machine": info,
        "clock_for_ratios": key,
        "parameters": n_params,
        "timings_s": raw,
        "median_s": med,
        "rows": rows,
        "imm_over_fm_time": time_ratio,
        # every measured step and piece over the IMM step, paired per round (the load of a shared machine cancels)
        "over_imm_step": {n: C.paired_ratio(raw[n][key], raw["imm_step"][key]) for n in cases},
    }
    if not args.no_split:
        math_share = C.paired_ratio(raw["objective_math"][key], raw["imm_step"][key])
        parts = sum(med[n][key] for n in ("student_fwd_bwd", "target_fwd", "optimizer", "objective_math"))
        fm_parts = sum(med[n][key] for n in ("student_fwd_bwd", "optimizer", "fm_math"))
        result.update(
            {
                "math_share": math_share,
                "sum_of_parts_over_imm_step": parts / imm_t,
                "imm_over_fm_time_from_parts": parts / fm_parts,
                # operator calls (~ kernel launches on a GPU) of the objective around the stand-in
                "objective_math_ops": C.kernel_ops(C.count_ops(su.objective_math)),
                "fm_math_ops": C.kernel_ops(C.count_ops(su.fm_math)),
            }
        )

    if args.compare_adamw:
        result["adamw"] = compare_adamw(su, args, device, key)
    if args.compare_ema:
        result["ema"] = compare_ema(su, args, device, key)
    if args.compare_channels_last:
        result["channels_last"] = compare_channels_last(args, device, key)
    if args.compare_augment:
        result["augment"] = augment_summary(raw, augment_alone, args, device, key)
    if args.compare_sync:
        raw_s = C.interleaved(
            {"no host read": su.imm_step, "host read per step": lambda: su.step(su.imm, True)},
            device,
            repeats=args.repeats,
            warmup=1,
            iters=C.default_iters(args.iters, device),
        )
        result["sync"] = {
            k: {
                "median_ms": C.median(v[key]) * 1e3,
                "wall_ms": C.median(v["wall"]) * 1e3,
                "over_no_read": C.paired_ratio(v[key], raw_s["no host read"][key]),
            }
            for k, v in raw_s.items()
        }

    if not args.no_memory:
        result.update(peak_memory(args, device, ("imm", "fm", *su.methods)))

    result["targets"] = targets_status(result, args)
    print_report(result, args)
    path = C.write_json(args.out, result)
    print(f"\nwrote {path}")
    return result


def peak_memory(args, device, kinds) -> dict:
    """Each step's peak memory in a fresh process ('none': the setup alone), and IMM's over FM's."""
    mem = {kind: C.memory_child(__file__, kind) for kind in ("none", *kinds)}
    out = {"memory": {k: {**v, "mb": C.memory_mb(v, device)} for k, v in mem.items()}}
    out["imm_over_fm_memory"] = out["memory"]["imm"]["mb"] / out["memory"]["fm"]["mb"]
    if device.type == "cpu":
        # the same ratio without the setup (weights, batch): what the step itself adds
        def step_mb(k):
            return (mem[k]["peak_rss_kb"] - mem[k]["setup_rss_kb"]) / 1024

        out["imm_over_fm_step_memory"] = step_mb("imm") / step_mb("fm")
    return out


def compare_adamw(su, args, device, key):
    """Optimizer step alone (clip + AdamW) for each implementation, alternately on copies of the net."""
    import copy

    impls = ["forloop", "foreach", "fused"]
    nets, opts = {}, {}
    su.student_fwd_bwd()  # gradients to step with
    for impl in impls:
        net = copy.deepcopy(su.net)
        for p, q in zip(net.parameters(), su.net.parameters()):
            p.grad = q.grad.clone()
        try:
            opts[impl] = C.adamw(net.parameters(), device, impl)
            nets[impl] = net
        except (RuntimeError, ValueError) as e:
            C.log(f"AdamW {impl} unavailable: {e}")

    def make(impl):
        def run():
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(nets[impl].parameters(), args.grad_clip)
            opts[impl].step()

        return run

    raw = C.interleaved(
        {i: make(i) for i in nets}, device, repeats=args.repeats, warmup=1, iters=C.default_iters(args.iters, device)
    )
    return {i: {"median_ms": C.median(v[key]) * 1e3, "wall_ms": C.median(v["wall"]) * 1e3} for i, v in raw.items()}


def compare_ema(su, args, device, key):
    """EMA.update() as the loop builds it (ema_pytorch, update_every=1), use_foreach False vs True."""
    from ema_pytorch import EMA

    emas = {
        f"foreach={fe}": EMA(
            su.net,
            beta=0.999,
            power=0.75,
            update_every=1,
            update_after_step=0,
            include_online_model=False,
            use_foreach=fe,
        )
        for fe in (False, True)
    }
    raw = C.interleaved(
        {k: e.update for k, e in emas.items()},
        device,
        repeats=args.repeats,
        warmup=2,
        iters=C.default_iters(args.iters, device),
    )
    return {k: {"median_ms": C.median(v[key]) * 1e3, "wall_ms": C.median(v["wall"]) * 1e3} for k, v in raw.items()}


def augment_cases(su, args):
    """({name: IMM step}, {name: the augmentation alone}) for data.augment_p = --compare-augment, as of git
    revision --augment-old and as it is now. The two steps draw the same transforms (a seed per round,
    the same for both); the net is the one of the other cases (it takes augmentation labels, which the
    plain IMM step leaves at None). The augmentation alone runs on the step's batch with every image
    transformed, the worst case."""
    from imm.data import augment as current

    p, rev = args.compare_augment, args.augment_old
    versions = {rev: C.module_at(rev), "current": current}

    def step(augment):
        objective = C.objectives(M=args.M, augment=augment)[1]
        rounds = iter(range(10**9))

        def run():
            su.gen.manual_seed(args.seed * 100003 + next(rounds))
            loss, _ = objective(su.net, su.x, generator=su.gen)
            su.opt.zero_grad(set_to_none=True)
            loss.backward()
            su._opt_step()

        return run

    rows = current.Augment(0.999).draw(args.batch, torch.Generator().manual_seed(args.seed), su.device)
    rows[:, current.TX] += 0.1  # every image transformed

    def alone(module):
        return lambda: module.Augment(p)(su.x, rows)

    steps = {f"imm_step augment_p={p} ({name})": step(_as_now(m.Augment(p))) for name, m in versions.items()}
    return steps, {name: alone(m) for name, m in versions.items()}


class _as_now:
    """An Augment of another revision behind today's interface: the objective passes the global batch's
    reflection margin, which a revision without Augment.margin computes for each batch itself."""

    def __init__(self, augment):
        self.augment, self.draw = augment, augment.draw

    def margin(self, params, H, W):
        return self.augment.margin(params, H, W) if hasattr(self.augment, "margin") else None

    def __call__(self, x, params, margin=None):
        return self.augment(x, params) if margin is None else self.augment(x, params, margin)


def augment_summary(raw, alone, args, device, key):
    """The augmented steps against the plain IMM step (paired), and the augmentation alone, alternately."""
    out = {
        name: {
            "median_ms": C.median(v[key]) * 1e3,
            "wall_ms": C.median(v["wall"]) * 1e3,
            "over_imm_step": C.paired_ratio(v[key], raw["imm_step"][key]),
        }
        for name, v in raw.items()
        if name.startswith("imm_step augment_p=")
    }
    iters = max(C.default_iters(args.iters, device), 10)
    raw_alone = C.interleaved(alone, device, repeats=max(args.repeats, 9), warmup=1, iters=iters)
    out["alone_ms"] = {k: C.median(v[key]) * 1e3 for k, v in raw_alone.items()}
    out["alone_timings_s"] = raw_alone
    return out


def compare_channels_last(args, device, key):
    """The IMM step alternately with: 'contiguous' (every activation NCHW; a net's own CPU
    channels_last switch, DDPMpp.channels_last_on_cpu, turned off), 'as built' (the net as imm.nets
    builds it, when it has such a switch) and 'channels_last' (net weights and batch converted
    outside the net, as a training loop would do it)."""
    import copy

    if args.arch == "mlp":
        return {"note": "channels_last applies to image nets only"}
    setups = {}
    for case in ("contiguous", "as built", "channels_last"):
        a = copy.copy(args)
        a.channels_last = case == "channels_last"
        su = Setup(a, device)
        has_switch = hasattr(su.net, "channels_last_on_cpu")
        if case == "contiguous" and has_switch:
            su.net.channels_last_on_cpu = False
        if case == "as built" and not has_switch:
            continue
        setups[case] = su
    raw = C.interleaved(
        {k: su.imm_step for k, su in setups.items()},
        device,
        repeats=args.repeats,
        warmup=1,
        iters=C.default_iters(args.iters, device),
    )
    out = {
        k: {
            "median_ms": C.median(v[key]) * 1e3,
            "wall_ms": C.median(v["wall"]) * 1e3,
            "over_contiguous": C.paired_ratio(v[key], raw["contiguous"][key]),
        }
        for k, v in raw.items()
    }
    out["channels_last_over_contiguous"] = out["channels_last"]["over_contiguous"]
    out["timings_s"] = raw
    return out


def targets_status(r, args) -> dict:
    out = {
        "time_ratio": {
            "value": r["imm_over_fm_time"],
            "target": TARGETS["time_ratio"],
            "met": r["imm_over_fm_time"] <= TARGETS["time_ratio"],
        }
    }
    if "math_share" in r:
        stated = (
            args.arch == "dit_s_4"
            and not args.arch_override
            and args.resolution == 32
            and args.batch == 32
            and args.channels == 3
        )
        out["math_share"] = {
            "value": r["math_share"],
            "target": TARGETS["math_share"],
            "met": r["math_share"] <= TARGETS["math_share"],
            "applies": stated,
            "note": "the target is stated for DiT-S/4 at 3x32x32, batch 32",
        }
    if "imm_over_fm_memory" in r:
        out["memory_ratio"] = {
            "value": r["imm_over_fm_memory"],
            "target": TARGETS["memory_ratio"],
            "met": r["imm_over_fm_memory"] <= TARGETS["memory_ratio"],
        }
    return out


def print_report(r, args):
    info = r["machine"]
    print(
        f"\n## step cost: {args.arch} {tuple(C.sample_shape(args.arch, args.resolution, args.channels, args.dim))},"
        f" batch {args.batch}, M {args.M}, {r['parameters'] / 1e6:.2f}M parameters"
    )
    print(C.describe(info))
    print(f"medians of {args.repeats} alternating rounds; shares and ratios from {r['clock_for_ratios']} time\n")
    print(
        C.table(
            r["rows"],
            [
                ("case", "case", None),
                ("wall ms", "wall_ms", ".1f"),
                ("CPU ms", "cpu_ms", ".1f"),
                ("share of IMM step", "share", ".2%"),
                ("samples/s (wall)", "samples_per_s", ".4g"),
                ("samples/CPU-s", "samples_per_cpu_s", ".4g"),
            ],
        )
    )
    if args.methods:
        ratios = ", ".join(f"{n} {v:.3f}" for n, v in r["over_imm_step"].items() if n.endswith(("_step", "_jvp")))
        print(f"\nover an IMM step (median of per-round ratios, {r['clock_for_ratios']} time): {ratios}")
    if "adamw" in r:
        print("\nAdamW step alone (with gradient clipping):")
        print(
            C.table(
                [{"impl": k, **v} for k, v in r["adamw"].items()],
                [("implementation", "impl", None), ("ms", "median_ms", ".1f"), ("wall ms", "wall_ms", ".1f")],
            )
        )
    if "ema" in r:
        print("\nEMA update alone (ema_pytorch, as the loop's evaluation EMA):")
        print(
            C.table(
                [{"impl": k, **v} for k, v in r["ema"].items()],
                [("EMA", "impl", None), ("ms", "median_ms", ".1f"), ("wall ms", "wall_ms", ".1f")],
            )
        )
    if "channels_last" in r and "note" not in r["channels_last"]:
        rows = [{"layout": k, **v} for k, v in r["channels_last"].items() if isinstance(v, dict) and k != "timings_s"]
        print("\nIMM step by memory layout (alternating rounds):")
        print(
            C.table(
                rows,
                [
                    ("layout", "layout", None),
                    ("ms", "median_ms", ".1f"),
                    ("wall ms", "wall_ms", ".1f"),
                    ("vs contiguous (paired)", "over_contiguous", ".3f"),
                ],
            )
        )
    if "augment" in r:
        a = r["augment"]
        ratios = ", ".join(f"{k}: {v['over_imm_step']:.3f}" for k, v in a.items() if k.startswith("imm_step"))
        print(f"\naugmented IMM step over the plain one (paired rounds, the same draws for both): {ratios}")
        alone = ", ".join(f"{k} {v:.2f} ms" for k, v in a["alone_ms"].items())
        print(f"the augmentation alone, batch {args.batch}, every image transformed: {alone}")
    if "sync" in r:
        print("\nIMM step with / without the loop's per-step host read of the finite verdict:")
        print(
            C.table(
                [{"case": k, **v} for k, v in r["sync"].items()],
                [
                    ("case", "case", None),
                    ("ms", "median_ms", ".1f"),
                    ("wall ms", "wall_ms", ".1f"),
                    ("vs no read", "over_no_read", ".3f"),
                ],
            )
        )
    if "memory" in r:
        unit = (
            "torch.cuda.max_memory_allocated"
            if info["device"].startswith("cuda")
            else "peak RSS minus the RSS of torch and its libraries"
        )
        rows = [{"case": k, "mb": v["mb"], "peak_rss_mb": v["peak_rss_kb"] / 1024} for k, v in r["memory"].items()]
        print(f"\npeak memory ({unit}; fresh process per case, {args.memory_steps} steps; 'none' = setup only):")
        print(
            C.table(rows, [("case", "case", None), ("MB", "mb", ".1f"), ("process peak RSS MB", "peak_rss_mb", ".1f")])
        )
    if "imm_over_fm_time_from_parts" in r:
        print(
            f"\nIMM/FM from the parts: (student + target + optimizer + math) / (student + optimizer + FM math)"
            f" = {r['imm_over_fm_time_from_parts']:.3f}; the parts sum to {r['sum_of_parts_over_imm_step']:.1%}"
            " of the measured IMM step;\nthe objective math is"
            f" {r['objective_math_ops']} operator calls (FM: {r['fm_math_ops']}), about one kernel launch each on a GPU"
        )
    print("\ntargets:")
    for name, t in r["targets"].items():
        fmt = ".2%" if name == "math_share" else ".3f"
        verdict = "MET" if t["met"] else "MISSED"
        if not t.get("applies", True):
            verdict += f" (informational: {t['note']})"
        print(f"  {name}: {format(t['value'], fmt)} (target <= {format(t['target'], fmt)}): {verdict}")
    if "imm_over_fm_step_memory" in r:
        print(f"  (step-only memory ratio, peak minus setup RSS: {r['imm_over_fm_step_memory']:.3f})")


if __name__ == "__main__":
    main()
