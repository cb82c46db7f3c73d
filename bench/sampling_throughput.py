"""Few-step sampling throughput: samples/s at 1, 2, 4 and 8 steps for each network.

    python bench/sampling_throughput.py --device cpu

Runs imm.core.sampling.sample (pushforward, the evaluation's grids: eta(t_1) = 1.4 for 2 steps,
uniform otherwise) with untrained networks in eval mode under no_grad; the step counts of one
network are timed alternately (round-robin, medians). Throughput does not depend on the weights,
and IMM and the flow-matching baseline share the network and the sampler, so one row serves both.

Networks (--archs, each NAME or NAME:key=value,...; presets below):
  mlp          the default job's 3x256 residual MLP on 2-D points
  dit_s_4      DiT-S/4 on images
  ddpmpp_tiny  DDPM++ with 32 channels, mults [1,2,2], 1 block per level, attention at 16
  ddpmpp       the paper's CIFAR-10 DDPM++ (128 channels, [2,2,2], 4 blocks; ~56M parameters)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

PRESETS = {
    "ddpmpp_tiny": (
        "ddpmpp",
        dict(model_channels=32, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[16], dropout=0.0),
    ),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--archs",
        nargs="+",
        default=["mlp", "dit_s_4", "ddpmpp_tiny", "ddpmpp"],
        help="networks: NAME or NAME:key=value,... (see above)",
    )
    p.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 8], help="sampling step counts")
    p.add_argument("--points-batch", type=int, default=5000, help="batch for point nets (the evaluation's n)")
    p.add_argument("--image-batch", type=int, default=64, help="batch for image nets")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--dim", type=int, default=2, help="point dimension for mlp")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--max-seconds",
        type=float,
        default=0.0,
        help="if > 0, lower the repeats of a network whose warm-up round shows it would exceed this",
    )
    C.add_common_args(p, "sampling_throughput")
    return p.parse_args(argv)


def resolve(spec: str):
    name, overrides, label = C.arch_spec(spec)
    if name in PRESETS:
        base, preset = PRESETS[name]
        return base, {**preset, **overrides}, label
    return name, overrides, label


def main(argv=None):
    args = parse_args(argv)
    device = C.resolve_device(args.device)
    C.setup_threads(args.threads)
    info = C.machine_info(device)
    from imm.core import parameterization, sampling

    par = parameterization.get("euler_fm", schedule="fm", sigma_data=0.5)
    two = sampling.TWO_STEP_ETA  # the commands' default: 2 steps at eta 1.4 (App. I.2)
    grids = {
        N: sampling.time_grid("uniform", N, schedule=par.schedule, T=0.994, eps=0.0, two_step_eta=two)
        for N in args.steps
    }
    rows, raw_all = [], {}
    key = C.primary_key(device)
    for spec in args.archs:
        name, overrides, label = resolve(spec)
        shape = C.sample_shape(name, args.resolution, args.channels, args.dim)
        net = C.build_net(name, shape, overrides, device).eval()
        n_params = sum(p.numel() for p in net.parameters())
        batch = args.points_batch if name == "mlp" else args.image_batch
        noise = 0.5 * torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)).to(device)
        C.log(f"{label}: {shape}, {n_params / 1e6:.2f}M parameters, batch {batch}")

        def case(N, net=net, noise=noise):
            return lambda: sampling.sample(net, par, noise, grids[N])

        cases = {N: case(N) for N in args.steps}
        repeats = args.repeats
        if args.max_seconds > 0:
            w, _ = C.timed(cases[max(args.steps)], device)  # also the warm-up of the largest case
            per_round = w * sum(args.steps) / max(args.steps)
            repeats = max(1, min(repeats, int(args.max_seconds / max(per_round, 1e-9))))
        raw = C.interleaved(
            cases, device, repeats=repeats, warmup=args.warmup, iters=C.default_iters(args.iters, device), log=C.log
        )
        raw_all[label] = {str(N): v for N, v in raw.items()}
        for N in args.steps:
            wall, cpu = C.median(raw[N]["wall"]), C.median(raw[N]["cpu"])
            rows.append(
                {
                    "arch": label,
                    "params_M": n_params / 1e6,
                    "batch": batch,
                    "steps": N,
                    "repeats": repeats,
                    "wall_ms": wall * 1e3,
                    "cpu_ms": cpu * 1e3,
                    "samples_per_s": batch / wall,
                    "samples_per_cpu_s": batch / cpu,
                    "ms_per_step": C.median(raw[N][key]) * 1e3 / N,
                    "vs_1step": C.paired_ratio(raw[N][key], raw[min(args.steps)][key]),
                }
            )
        del net

    print("\n## sampling throughput (pushforward; grids: 2 steps at eta 1.4, else uniform)")
    print(C.describe(info))
    print(f"medians of alternating rounds; 'time vs 1 step' from {key} time\n")
    print(
        C.table(
            rows,
            [
                ("network", "arch", None),
                ("params (M)", "params_M", ".2f"),
                ("batch", "batch", "d"),
                ("steps", "steps", "d"),
                ("samples/s (wall)", "samples_per_s", ".4g"),
                ("samples/CPU-s", "samples_per_cpu_s", ".4g"),
                ("ms per step", "ms_per_step", ".3g"),
                ("time vs 1 step", "vs_1step", ".2f"),
            ],
        )
    )
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": info,
        "clock_for_ratios": key,
        "rows": rows,
        "timings_s": raw_all,
    }
    path = C.write_json(args.out, result)
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
