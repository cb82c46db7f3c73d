"""What the augmentation's resampling does to an image, measured, for the current code and an older revision:

    python bench/augment_resampling.py --old 4751d4c

- the gain of the identity and of translations by 1/4 and 1/2 pixel at 0.5, 1.0, 2.0, 2.5 and pi
  radians per pixel: a horizontal plane wave cos(w c) on a 64x64 image goes through
  `imm.data.augment.resample`, and the wave the translation should give is fitted (least squares, cosine
  and sine parts) to the output away from the border (16 pixels); the gain is the fitted amplitude;
- the rms change that resampling in place (the identity) and a translation by (4, 3) pixels make to white
  noise (std 1) and to 1/f images (amplitude spectrum 1/|f|, std 0.5), against the exact answer (the
  image, or the reflected image shifted), over the whole image, in float64; and the largest change the
  identity makes to white noise in float32;
- how far a quarter turn is from torch.rot90 on white noise (rms).

--old names a git revision whose imm/data/augment.py is loaded as a second module (so the numbers before
and after a change come from one run); without it only the current code is measured. Writes
bench/results/augment_resampling.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from imm.data import augment as current  # noqa: E402

FREQS = {"0.5": 0.5, "1.0": 1.0, "2.0": 2.0, "2.5": 2.5, "pi": math.pi}  # radians per pixel
SHIFTS = (0.0, 0.25, 0.5)
SIZE, BORDER = 64, 16


def translation(dx: float, dy: float = 0.0) -> torch.Tensor:
    """The inverse map [1, 3, 3] of a translation by (dx, dy) pixels (content moves right and down)."""
    m = torch.eye(3, dtype=torch.float64)[None]
    m[0, 0, 2], m[0, 1, 2] = -dx, -dy
    return m


def gain(module, w: float, shift: float) -> float | None:
    """Amplitude of cos(w (c - shift)) in the resampled cos(w c), fitted away from the border; None where the
    sampled wave is zero (a half-pixel shift at pi)."""
    c = torch.arange(SIZE, dtype=torch.float64)
    x = torch.cos(w * c).expand(1, 1, SIZE, SIZE)
    out = module.resample(x, translation(shift))[0, 0, BORDER:-BORDER, BORDER:-BORDER].mean(0)
    phase = w * (c[BORDER:-BORDER] - shift)
    basis = [torch.cos(phase), torch.sin(phase)]
    if w == math.pi:  # at Nyquist the sampled sine part is zero: only the cosine part is defined
        if basis[0].abs().max() < 1e-9:
            return None
        basis = basis[:1]
    coef = torch.linalg.lstsq(torch.stack(basis, 1), out[:, None]).solution
    return float(coef.norm())


def one_over_f(n: int, generator: torch.Generator) -> torch.Tensor:
    """[n, 1, SIZE, SIZE] images with amplitude spectrum 1/|f| and random phases, std 0.5."""
    f = torch.fft.fftfreq(SIZE, dtype=torch.float64)
    radius = (f[:, None] ** 2 + f[None, :] ** 2).sqrt()
    spectrum = torch.where(radius > 0, 1 / radius.clamp(min=1e-12), 0)
    noise = torch.fft.fft2(torch.randn(n, 1, SIZE, SIZE, generator=generator, dtype=torch.float64))
    x = torch.fft.ifft2(noise * spectrum).real
    return 0.5 * x / x.std((-2, -1), keepdim=True)


def rms_changes(module, images: torch.Tensor) -> dict:
    """rms(resampled - exact) of the identity and of a translation by 4 pixels right, 3 down."""
    same = module.resample(images, translation(0))
    moved = module.resample(images, translation(4, 3))
    reflected = F.pad(images, (SIZE - 1,) * 4, mode="reflect")  # a single reflection covers any shift < SIZE
    exact = reflected[..., SIZE - 1 - 3 : 2 * SIZE - 1 - 3, SIZE - 1 - 4 : 2 * SIZE - 1 - 4]
    same32 = module.resample(images.float(), translation(0))
    return {
        "identity": float((same - images).pow(2).mean().sqrt()),
        "shift_4_3": float((moved - exact).pow(2).mean().sqrt()),
        "identity_float32_max": float((same32 - images.float()).abs().max()),
    }


def measure(module) -> dict:
    gen = torch.Generator().manual_seed(0)
    white = torch.randn(8, 1, SIZE, SIZE, generator=gen, dtype=torch.float64)
    quarter = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64)[None]
    turned = module.resample(white, quarter)
    return {
        "gain": {f"{s}": {name: gain(module, w, s) for name, w in FREQS.items()} for s in SHIFTS},
        "white_noise_rms_change": rms_changes(module, white),
        "one_over_f_rms_change": rms_changes(module, one_over_f(8, gen)),
        "quarter_turn_vs_rot90_rms": float((turned - torch.rot90(white, 1, (-2, -1))).pow(2).mean().sqrt()),
    }


def print_report(result: dict) -> None:
    print(C.describe(result["machine"]))
    names = list(result["code"])
    rows = []
    for name in names:
        for s, gains in result["code"][name]["gain"].items():
            what = "identity" if float(s) == 0 else f"shift {s} px"
            rows.append({"code": name, "path": what, **{w: g for w, g in gains.items()}})
    columns = [("code", "code", None), ("transform", "path", None)]
    columns += [(f"gain at {name}", name, ".3f") for name in FREQS]
    print("\n" + C.table(rows, columns))
    rows = []
    for name in names:
        r = result["code"][name]
        rows.append(
            {
                "code": name,
                "white_id": r["white_noise_rms_change"]["identity"],
                "white_id32": r["white_noise_rms_change"]["identity_float32_max"],
                "white_shift": r["white_noise_rms_change"]["shift_4_3"],
                "f_id": r["one_over_f_rms_change"]["identity"],
                "f_shift": r["one_over_f_rms_change"]["shift_4_3"],
                "quarter": r["quarter_turn_vs_rot90_rms"],
            }
        )
    print(
        "\n"
        + C.table(
            rows,
            [
                ("code", "code", None),
                ("white noise, identity", "white_id", ".2g"),
                ("same, float32: max abs", "white_id32", ".2g"),
                ("white noise, shift (4, 3) px", "white_shift", ".2g"),
                ("1/f (std 0.5), identity", "f_id", ".2g"),
                ("1/f, shift (4, 3) px", "f_shift", ".2g"),
                ("white noise, quarter turn vs rot90", "quarter", ".2g"),
            ],
        )
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", default=None, help="git revision whose imm/data/augment.py to measure beside the current")
    C.add_common_args(p, "augment_resampling")
    args = p.parse_args(argv)
    C.setup_threads(args.threads)
    modules = {}
    if args.old:
        modules[f"{args.old} (before)"] = C.module_at(args.old)
    modules["current"] = current
    result = {
        "machine": C.machine_info(torch.device("cpu")),
        "code": {name: measure(module) for name, module in modules.items()},
    }
    print_report(result)
    path = C.write_json(args.out, result)
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
