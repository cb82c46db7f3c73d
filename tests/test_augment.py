"""EDM's non-leaking augmentation (imm/data/augment.py) and its way through the objective, training and
sampling.

Covers: p = 0 is the identity, bit-exact, down to the training loss; flips are exact and undo themselves;
the geometric transforms are undone by their inverse and move pixels where their matrix says; resampling
in place and integer translations return white noise unchanged, so not resampling images without a
geometric transform only saves time; angles turn as EDM's; images and labels equal those of EDM's
AugmentPipe on its own random draws (tests/data/edm_augment.npz); the label layout (zero exactly for the
identity); each transform switched on with probability p; one transform per group of M particles, the
same augmented x and labels in the student and the target pass, the draws of a global batch sharded like
the rest; a resumed run reproduces the draws; sampling passes no labels; and a short real training end to
end.
The networks' side (the labels change the output, None is zeros) is in tests/test_nets.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose_cfg, compose_task, launch
from mlflow.tracking import MlflowClient
from torch import nn
from toynets import TinyNet

from imm import factory
from imm.core import mapping, objective, parameterization
from imm.data.augment import (
    ANISO,
    ANISO_ANGLE,
    AUGMENT_DIM,
    LABELS,
    ROTATE,
    SCALE,
    SYM6,
    TX,
    TY,
    XFLIP,
    YFLIP,
    Augment,
    apply,
    geometric_matrix,
    labels,
    padding,
    resample,
)
from imm.tasks import sample as sample_task
from imm.training import checkpoint
from imm.training.loop import train

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors (conftest.py)

GEOMETRIC = [SCALE, ROTATE, ANISO, TX, TY]
IDENTITY_3x3 = torch.eye(3, dtype=torch.float64)[None]
EDM_FIXTURE = Path(__file__).parent / "data" / "edm_augment.npz"


def smooth_images(n: int = 4, size: int = 32, seed: int = 0, fmax: float = 0.6) -> torch.Tensor:
    """[n, 3, size, size] sums of plane waves up to fmax radians per pixel (well below Nyquist, pi), so
    resampling them is nearly lossless and any error is the transform's, not the image's."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(size).double(), torch.arange(size).double(), indexing="ij")
    out = torch.zeros(n, 3, size, size, dtype=torch.float64)
    for _ in range(4):
        fx, fy, phase = (torch.rand(3, n, 3, 1, 1, generator=gen, dtype=torch.float64) * 2 - 1) * fmax
        out += 0.3 * torch.cos(fx * cols + fy * rows + 10 * phase)
    return out.float()


def white_noise(n: int, H: int, W: int, seed: int = 0) -> torch.Tensor:
    """[n, 3, H, W] independent N(0, 1) pixels: every frequency up to Nyquist at full strength, the input on
    which a resampling that blurs or aliases shows it (a band-limited image would hide it)."""
    return torch.randn(n, 3, H, W, generator=torch.Generator().manual_seed(seed))


def interior(x: torch.Tensor, margin: int = 10) -> torch.Tensor:
    return x[..., margin:-margin, margin:-margin]


def draw(p: float, n: int, seed: int = 0) -> torch.Tensor:
    return Augment(p).draw(n, torch.Generator().manual_seed(seed))


# -- the transforms ----------------------------------------------------------------------------------
def test_p_zero_is_the_identity_bit_exact():
    x = smooth_images(8)
    rows = draw(0.0, 8)
    assert rows.shape == (8, 8) and (rows == 0).all()
    out, lab = Augment(0.0)(x, rows)
    assert torch.equal(out, x)
    assert lab.shape == (8, AUGMENT_DIM) and (lab == 0).all()


def test_flips_are_exact_and_undo_themselves():
    x = smooth_images(4)
    rows = torch.zeros(4, 8, dtype=torch.float64)
    rows[:, XFLIP] = torch.tensor([1.0, 0, 1, 0])
    rows[:, YFLIP] = torch.tensor([0.0, 1, 1, 0])
    out = apply(x, rows)
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1].flip(-2))
    assert torch.equal(out[2], x[2].flip(-1).flip(-2)) and torch.equal(out[3], x[3])
    assert torch.equal(apply(out, rows), x)


def test_geometric_transforms_are_undone_by_their_inverse():
    x = smooth_images(1).expand(12, -1, -1, -1).contiguous()
    rows = draw(0.9, 12, seed=1)
    rows[:, [XFLIP, YFLIP]] = 0
    assert (rows[:, GEOMETRIC] != 0).any(1).all()  # every image gets a geometric transform
    forward = geometric_matrix(rows, 32, 32)
    moved = apply(x, rows)
    torch.testing.assert_close(moved, resample(x, torch.linalg.inv(forward)), rtol=0, atol=0)
    back = resample(moved, forward)
    # the transforms really move the content (by 0.5 and more), and the inverse puts it back to ~1%
    assert interior(moved - x).abs().amax((1, 2, 3)).min() > 0.2
    assert interior(back - x).abs().max() < 0.03


def test_resampling_puts_pixels_where_the_matrix_says():
    x = smooth_images(2)
    same = resample(x, IDENTITY_3x3)
    assert interior(same - x, 4).abs().max() < 5e-3  # band-limited: resampling in place changes ~nothing

    # A quarter turn samples the 2x grid on its points, but sym6 is not symmetric: turned, its phase no longer
    # cancels, and a quarter turn (or a mirror) is rot90 only to 0.041 on these images (EDM's resampling does
    # the same). Turned the other way, transposed or one pixel off, the content would be 1.5 to 1.9 away.
    quarter_turn = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64)[None]
    turned = resample(x, quarter_turn)
    torch.testing.assert_close(turned, torch.rot90(same, 1, (-2, -1)), rtol=0, atol=0.05)
    for wrong in (torch.rot90(same, -1, (-2, -1)), same.transpose(-1, -2), torch.rot90(same, 1, (-2, -1)).roll(1, -1)):
        assert (turned - wrong).abs().max() > 1

    # translate_x = 1 shifts the content 0.125 * 32 = 4 pixels to the right (pure translation: no flips)
    rows = torch.zeros(2, 8, dtype=torch.float64)
    rows[:, TX] = 1.0
    shifted = apply(x, rows)
    torch.testing.assert_close(shifted[..., :, 8:-4], same[..., :, 4:-8], rtol=0, atol=1e-5)
    rows[:, TX], rows[:, TY] = 0.0, -0.5  # translate_y = -0.5: 2 pixels up
    torch.testing.assert_close(apply(x, rows)[..., 4:-8, :], same[..., 6:-6, :], rtol=0, atol=1e-5)


def test_the_sym6_filter_is_orthonormal():
    h = torch.tensor(SYM6, dtype=torch.float64)
    assert h.sum().item() == pytest.approx(math.sqrt(2), abs=1e-12)  # a low-pass filter of unit DC gain at 2x
    for m in range(len(SYM6) // 2):  # sum h[k] h[k + 2m]: 1 for m = 0, else 0 (perfect reconstruction)
        assert (h[: len(h) - 2 * m] * h[2 * m :]).sum().item() == pytest.approx(float(m == 0), abs=1e-10)


@pytest.mark.parametrize("H, W", [(32, 32), (12, 20)])
def test_resampling_in_place_and_integer_translations_are_exact_on_white_noise(H, W):
    x = white_noise(4, H, W)
    assert (resample(x, IDENTITY_3x3) - x).abs().max() < 1e-5  # the whole image, border included
    # the content moves (dx, dy) pixels; beyond the border the image is mirrored about its edge pixels
    reflected = torch.nn.functional.pad(x, (W - 1, W - 1, H - 1, H - 1), mode="reflect")
    for dx, dy in [(4, 0), (-2, 3), (7, -5), (-W // 2, H // 2)]:
        rows = torch.zeros(4, 8, dtype=torch.float64)
        rows[:, TX], rows[:, TY] = dx / (0.125 * W), dy / (0.125 * H)  # translate_x = 1 is 0.125 W pixels
        exact = reflected[..., H - 1 - dy : 2 * H - 1 - dy, W - 1 - dx : 2 * W - 1 - dx]
        assert (apply(x, rows) - exact).abs().max() < 1e-5, (dx, dy)


def test_not_resampling_images_without_a_geometric_transform_only_saves_time():
    x = white_noise(64, 16, 16, seed=1)
    rows = draw(0.2, 64, seed=7)
    still = ~(rows[:, GEOMETRIC] != 0).any(1)
    assert 5 < int(still.sum()) < 59
    flipped = apply(x, torch.where(torch.arange(8) < 2, rows, 0.0))  # flips only: exact permutations
    inverse = torch.linalg.inv(geometric_matrix(rows, 16, 16))
    everything = resample(flipped, inverse)  # every image resampled, as EDM does, with the same margin
    assert (apply(x, rows) - everything).abs().max() < 1e-5


def test_angles_turn_counterclockwise_as_displayed_as_edm_s():
    """EDM's convention: rotation and stretch axis at angle a take the x axis (1, 0) to (cos a, -sin a), up
    and to the right on screen, rows going down; its labels sin(theta) and w sin(r) have this sign."""
    rows = torch.zeros(2, 8, dtype=torch.float64)
    rows[0, ROTATE] = 0.3
    rows[1, ANISO], rows[1, ANISO_ANGLE] = 1.0, 0.4
    rotation, stretch = geometric_matrix(rows, 32, 32)[:, :2, :2]
    axis = torch.tensor([math.cos(0.4), -math.sin(0.4)], dtype=torch.float64)
    torch.testing.assert_close(
        rotation @ torch.tensor([1.0, 0], dtype=torch.float64), axis.new_tensor([math.cos(0.3), -math.sin(0.3)])
    )
    torch.testing.assert_close(stretch @ axis, 2**0.2 * axis)  # the axis at angle r is stretched by 2^(0.2 w)

    x = smooth_images(2)
    quarter = torch.zeros(2, 8, dtype=torch.float64)
    quarter[:, ROTATE] = math.pi / 2
    turned = apply(x, quarter)  # to sym6's 0.041 (test_resampling_puts_pixels_where_the_matrix_says)
    assert (turned - torch.rot90(x, 1, (-2, -1))).abs().max() < 0.05
    assert (turned - torch.rot90(x, -1, (-2, -1))).abs().max() > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", ["cifar", "wide", "mixed"])
def test_agrees_with_edm_s_augment_pipe_on_its_draws(batch, dtype):
    """Images and labels against EDM's own code (NVlabs/edm, training/augment.py, AugmentPipe), on the
    random draws it made, in tests/data/edm_augment.npz.

    The fixture was made once, outside this project (EDM's licence keeps its source out), by running
    AugmentPipe with the CIFAR-10 settings of EDM's train.py (xflip=1e8, yflip, scale, rotate_frac, aniso,
    translate_frac = 1) on `torch.manual_seed(seed); pixels = torch.randint(0, 256, (n, C, H, W),
    dtype=torch.uint8)`, x = pixels / 127.5 - 1 in float32, through a stand-in for the `torch` module of
    training/augment.py that recorded each value its torch.randint / torch.rand / torch.randn calls
    returned:
    - "cifar": p = 0.3 on 8 images 3x16x16 (seed 8), EDM's strengths; some images only flipped;
    - "wide": p = 1 on 4 images 3x12x20 (seed 4), translate_frac_std = 0.5 and scale_std = 0.5, so the
      reflection margin reaches its cap (W - 1, H - 1) on every side and the sampling reaches the zeros
      beyond it (mirrored again instead, the images would be 1.6 away);
    - "mixed": p = 1 on 4 images 1x16x16 (seed 156), EDM's strengths, a batch whose one margin matters:
      each image resampled with its own margin would be 2.8e-4 away.
    The labels are those EDM returned. EDM's pipeline was then run a second time, the stand-in replaying
    the recorded draws, with torch's default dtype float64 (its sym6 taps stay float32-rounded), and these
    images are stored (as float32): EDM in float32 is 3-8e-6 away from them (it normalises the grid
    positions in float32). The parameter rows are EDM's draws in our layout and units (switches applied,
    the angles computed in float64 from the float32 uniforms, the stretch angle zeroed where there is no
    stretch, w and t in units of our 0.2 and 0.125).
    """
    data = np.load(EDM_FIXTURE)
    x = torch.from_numpy(data[f"{batch}_pixels"]).to(dtype) / 127.5 - 1
    rows = torch.from_numpy(data[f"{batch}_params"])
    edm = torch.from_numpy(data[f"{batch}_images"]).to(dtype)
    H, W = x.shape[-2:]
    moved = (rows[:, GEOMETRIC] != 0).any(1)
    out, lab = Augment(0.3)(x, rows)

    # what each batch exercises
    if batch == "cifar":
        assert moved.any() and not moved.all() and (rows[:, [XFLIP, YFLIP, ANISO_ANGLE]] != 0).any(0).all()
    elif batch == "wide":
        margin = padding(torch.linalg.inv(geometric_matrix(rows, H, W)), H, W)
        assert moved.all() and margin == (W - 1, H - 1, W - 1, H - 1)
    else:
        alone = torch.cat([apply(x[i : i + 1], rows[i : i + 1]) for i in range(len(x))])
        assert (alone - edm).abs().max() > 1e-4

    error = (out - edm).abs()
    assert error[..., 4:-4, 4:-4].max() < 1e-6  # interior
    assert error.max() < 1e-6  # the border too: the same reflection margin and zeros beyond it
    # (EDM resamples the untransformed images as well: its round trip moves them by ~1e-7, ours skips them)
    if f"{batch}_labels" in data:
        torch.testing.assert_close(lab, torch.from_numpy(data[f"{batch}_labels"]), rtol=0, atol=1e-6)


def test_images_without_a_geometric_transform_are_not_resampled():
    x = smooth_images(200, size=8)
    rows = draw(0.3, 200, seed=2)
    out = apply(x, rows)
    still = ~(rows[:, GEOMETRIC] != 0).any(1)
    assert 20 < int(still.sum()) < 180
    flipped = apply(x[still], torch.where(torch.arange(8) < 2, rows[still], 0.0))  # flips only
    assert torch.equal(out[still], flipped)
    assert (out[~still] != x[~still]).flatten(1).any(1).all()


def test_label_layout_and_zero_labels_exactly_for_the_identity():
    assert AUGMENT_DIM == len(LABELS) == 9
    row = torch.zeros(1, 8, dtype=torch.float64)
    row[0, [XFLIP, SCALE, ROTATE, ANISO, ANISO_ANGLE, TX, TY]] = torch.tensor(
        [1.0, 0.5, math.pi / 2, 2.0, math.pi / 2, 0.3, -0.7], dtype=torch.float64
    )
    expected = [1.0, 0.0, 0.5, -1.0, 1.0, 0.0, 2.0, 0.3, -0.7]  # LABELS order
    torch.testing.assert_close(labels(row)[0], torch.tensor(expected), rtol=0, atol=1e-6)

    rows = draw(0.3, 5000, seed=3)
    identity = (rows == 0).all(1)
    assert identity.any() and not identity.all()
    assert torch.equal((labels(rows) == 0).all(1), identity)


def test_each_transform_is_switched_on_with_probability_p():
    p, n = 0.12, 40000
    rows = draw(p, n, seed=4)
    rate = (rows != 0).double().mean(0)
    tol = 4 * math.sqrt(0.25 / n)  # four standard deviations of a rate
    # x-flip: half the images whatever p (EDM's multiplier 1e8); y-flip: p/2; the stretch axis turns half the time
    assert rate[XFLIP] == pytest.approx(0.5, abs=tol) and rate[YFLIP] == pytest.approx(p / 2, abs=tol)
    for column in (SCALE, ROTATE, ANISO, TX, TY):
        assert rate[column] == pytest.approx(p, abs=tol), LABELS[column]
    assert rate[ANISO_ANGLE] == pytest.approx(p / 2, abs=tol)
    assert torch.equal(rows[:, TX] != 0, rows[:, TY] != 0)  # one switch for the translation
    on = rows[:, SCALE][rows[:, SCALE] != 0]
    assert on.std().item() == pytest.approx(1.0, abs=0.05)  # w ~ N(0, 1): zoom 2^(0.2 w)
    assert rows[:, ROTATE].abs().max() <= math.pi


def test_the_draws_are_the_generator_s():
    assert torch.equal(draw(0.12, 64, seed=5), draw(0.12, 64, seed=5))
    assert not torch.equal(draw(0.12, 64, seed=5), draw(0.12, 64, seed=6))


# -- the objective -------------------------------------------------------------------------------------
class Recorder(nn.Module):
    """TinyNet on flattened images that records what each call received."""

    def __init__(self, shape):
        super().__init__()
        self.inner, self.num_classes, self.calls = TinyNet(dim=math.prod(shape)), 0, []

    def forward(self, x, noise_t, noise_s, labels=None, augment_labels=None):
        self.calls.append({"x": x.clone(), "noise_t": noise_t.clone(), "augment_labels": augment_labels})
        return self.inner(x, noise_t, noise_s, labels)


def imm_objective(augment=None, **kw):
    param = parameterization.get("euler_fm", schedule="fm")
    m = mapping.Mapping("eta_decrement", schedule="fm", k=12, eps=0.0, T=0.994)
    return objective.IMMObjective(param, m, M=4, a=1, b=4, augment=augment, **kw)


def test_student_and_target_see_the_same_augmented_x_and_labels():
    obj = imm_objective(Augment(0.5))
    x = smooth_images(16, size=8)
    draws = obj.draw(x, None, torch.Generator().manual_seed(0))
    net = Recorder(x.shape[1:])
    obj.loss(net, x, draws)
    target, student = net.calls  # the target pass runs first
    x_aug, lab = Augment(0.5)(x, draws.augment)
    assert not torch.equal(x_aug, x)
    for call in (target, student):
        torch.testing.assert_close(call["augment_labels"], lab, rtol=0, atol=0)
    t, s, r = (v.repeat_interleave(4) for v in draws.times)
    sch, param = obj.schedule, obj.param
    for call, time in ((target, r), (student, t)):  # x_r and x_t both built from the augmented x, one noise
        expected = (param.c_in(time) * sch.alpha(time))[:, None, None, None] * x_aug + (
            param.c_in(time) * sch.sigma(time)
        )[:, None, None, None] * draws.noise
        torch.testing.assert_close(call["x"], expected.float(), rtol=1e-5, atol=1e-5)


def test_one_transform_per_group_for_imm_and_per_sample_for_fm():
    x = smooth_images(32, size=8)
    rows = imm_objective(Augment(0.5)).draw(x, None, torch.Generator().manual_seed(1)).augment
    groups = rows.reshape(8, 4, -1)
    assert (groups == groups[:, :1]).all()  # every particle of a group has its group's transform
    assert groups[:, 0].unique(dim=0).shape[0] == 8  # groups differ
    param = parameterization.get("euler_fm", schedule="fm")
    fm = objective.FMObjective(param, augment=Augment(0.5))
    assert fm.draw(x, None, torch.Generator().manual_seed(1)).augment.unique(dim=0).shape[0] == 32


def test_without_augmentation_or_at_p_zero_the_loss_is_unchanged():
    x = smooth_images(16, size=8)
    net = Recorder(x.shape[1:])

    def loss_and_draws(augment):
        obj = imm_objective(augment)
        draws = obj.draw(x, None, torch.Generator().manual_seed(3))
        return obj.loss(net, x, draws)[0], draws

    plain, plain_draws = loss_and_draws(None)
    at_zero, _ = loss_and_draws(Augment(0.0))
    assert plain_draws.augment is None and torch.equal(plain, at_zero)
    assert all(call["augment_labels"] is None for call in net.calls[:2])  # nothing reaches the net
    _, augmented = loss_and_draws(Augment(0.5))  # the augmentation is drawn last: the rest stays
    assert torch.equal(augmented.noise, plain_draws.noise)
    assert all(torch.equal(a, b) for a, b in zip(augmented.times, plain_draws.times, strict=True))


def test_ranks_and_micro_batches_get_their_slice_of_the_global_draws():
    x = smooth_images(16, size=8)

    def generator(seed):
        return torch.Generator().manual_seed(seed)

    single = imm_objective(Augment(0.5)).draw(x, None, generator(4))
    halves = [
        imm_objective(Augment(0.5), rank=r, world_size=2).draw(x[8 * r : 8 * (r + 1)], None, generator(4))
        for r in (0, 1)
    ]
    assert torch.equal(torch.cat([h.augment for h in halves]), single.augment)
    assert torch.equal(single[4:12].augment, single.augment[4:12])


def test_micro_batches_and_ranks_resample_with_the_global_batch_margin():
    """One image shrunk hard sets a wide margin; a mildly shrunk one in another micro-batch (or on another rank)
    reads its border from that margin's reflection, as in the whole batch, not from its own margin's zeros."""
    x = white_noise(8, 16, 16, seed=2).double()  # float64: the margin's effect here is about 4e-7
    rows = torch.zeros(8, 8, dtype=torch.float64)
    rows[:4, SCALE] = -2.5  # the first group of M = 4: shrunk to 2^-2.5 of its size
    rows[4:, SCALE], rows[4:, ROTATE] = -0.8, 0.3
    obj = imm_objective(Augment(0.5))
    draws = obj.draw(x, None, torch.Generator().manual_seed(4))
    draws = objective.Draws(draws.times, draws.noise, None, None, 4, rows, Augment.margin(rows, 16, 16))
    whole = obj._augmented(x, draws)[0]
    parts = torch.cat([obj._augmented(x[a : a + 4], draws[a : a + 4])[0] for a in (0, 4)])
    assert torch.equal(parts, whole)
    own = apply(x[4:], rows[4:])  # the second micro-batch with its own, narrower margin
    assert (own - whole[4:]).abs().max() > 1e-8  # so the margin is what this test is about


# -- training and sampling -------------------------------------------------------------------------------
def digits_cfg(*extra: str):
    return compose_cfg(
        "data=digits",
        "arch=dit_s_4",
        "arch.hidden_size=32",
        "arch.depth=1",
        "arch.num_heads=2",
        "data.augment_p=0.5",
        "train.batch_size=32",
        "train.ckpt_every=3",
        "train.log_every=1",
        "train.threads=1",
        "optim.lr=1e-3",
        "optim.lr_schedule=constant",
        "eval.every=0",
        "eval.steps=[1]",
        "eval.n_samples=16",
        "tracking.enabled=false",
        *extra,
    )


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory):
    """6 steps in one go, and 3 steps then a relaunch of the same run directory to 6."""
    root = tmp_path_factory.mktemp("augment_runs")
    train(digits_cfg("train.steps=6"), root / "straight")
    train(digits_cfg("train.steps=3"), root / "resumed")
    train(digits_cfg("train.steps=6"), root / "resumed")
    return root


def test_a_resumed_run_reproduces_the_augmentation(resumed_runs):
    straight = checkpoint.load(checkpoint.resolve(None, resumed_runs / "straight"))
    resumed = checkpoint.load(checkpoint.resolve(None, resumed_runs / "resumed"))
    assert straight["step"] == resumed["step"] == 6
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    # the augmentation labels were trained: their embedding moved away from its initial weights
    torch.manual_seed(0)
    initial = factory.net(digits_cfg(), (1, 16, 16), 10).augment_embedder.weight
    assert not torch.allclose(straight["model"]["augment_embedder.weight"], initial)


def test_sampling_passes_no_augmentation_labels(resumed_runs, tmp_path, monkeypatch):
    calls, build = [], factory.net

    def recording_net(*args, **kwargs):
        net = build(*args, **kwargs)
        assert net.augment_dim == AUGMENT_DIM  # the checkpoint's config rebuilds the augmentation input
        net.register_forward_pre_hook(lambda m, a, kw: calls.append(kw.get("augment_labels")), with_kwargs=True)
        return net

    monkeypatch.setattr(factory, "net", recording_net)
    cfg = compose_task(
        "sample", f"ckpt={resumed_runs / 'straight'}", f"out={tmp_path}", "n=8", "steps=2", "tracking.enabled=false"
    )
    sample_task.run(cfg, launch_dir=tmp_path)
    assert calls and all(value is None for value in calls)
    images = np.load(tmp_path / "samples.npz")
    assert all(np.isfinite(images[k]).all() for k in images.files)


@pytest.mark.slow
def test_training_with_augmentation_end_to_end(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_dir = tmp_path / "run"
    args = [
        "data=digits",
        "arch=dit_s_4",
        "arch.hidden_size=32",
        "arch.depth=1",
        "arch.num_heads=2",
        "data.augment_p=0.12",
        "train.steps=8",
        "train.batch_size=32",
        "train.threads=1",
        "eval.every=4",
        "eval.n_samples=16",
        "eval.steps=[1,2]",
        f"tracking.uri={uri}",
        f"hydra.run.dir={run_dir}",
    ]
    launch(tmp_path, *args, check=True)
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("imm").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["data.augment_p"] == "0.12"
    assert np.isfinite(run.data.metrics["final/loss"])
    proc = launch(tmp_path, "--config-name", "sample", f"ckpt={run_dir}", "n=8", "steps=1", f"tracking.uri={uri}")
    assert proc.returncode == 0, proc.stderr[-3000:]
