"""The image path end to end on CPU: DiT and DDPM++ (tiny widths) on 16x16 digits and on a folder of
PNGs, built by imm.factory from a real Hydra compose and trained through imm.training.loop.train.

Covers: the IMM loss going down on a fixed batch for every image architecture; the full loop with
MLflow tracking, the parameter count and the image step-comparison figure; classifier-free guidance
(label dropout trains the null label, eval.guidance on conditional data, the one-sentence refusal on
unconditional data); CIFAR-10 offline failing before any MLflow run; the DataLoader options for image
folders; the data position in checkpoints and exact resume through the DataLoader; and the measured
parameter counts of the CIFAR-10 presets that the README states.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from helpers import compose_cfg
from mlflow.tracking import MlflowClient
from PIL import Image

from imm import factory
from imm.config import EvalConfig
from imm.data import DataError, ResumableBatches
from imm.errors import ConfigError
from imm.evaluation.evaluator import Evaluator
from imm.factory import loss_T
from imm.nets import count_parameters
from imm.training import checkpoint
from imm.training import loop as loop_mod
from imm.training.loop import train
from imm.validation import sampling_plan

# Every image architecture at a tiny width: DiT with 2x2 and 4x4 patches, and the DDPM++ U-Net.
TINY = {
    "dit_s_2": ("arch=dit_s_2", "arch.hidden_size=32", "arch.depth=1", "arch.num_heads=2"),
    "dit_b_4": ("arch=dit_b_4", "arch.hidden_size=64", "arch.depth=2", "arch.num_heads=4"),
    "ddpmpp": (
        "arch=ddpmpp",
        "arch.model_channels=16",
        "arch.channel_mult=[1,2]",
        "arch.num_blocks=1",
        "arch.attn_resolutions=[8]",
    ),
}
N_PNGS = 40  # the folder dataset: 40 images, so batch 8 gives 5 batches per epoch


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors (conftest.py)


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory):
    """A flat folder (so: unconditional) of 20x20 RGB PNGs, resized and center-cropped to 16x16."""
    root = tmp_path_factory.mktemp("pngs")
    rng = np.random.default_rng(0)
    for i in range(N_PNGS):
        image = np.zeros((20, 20, 3), np.uint8)
        image[...] = rng.integers(0, 60, 3)
        r, c = rng.integers(0, 12, 2)
        image[r : r + 8, c : c + 8] = rng.integers(120, 256, 3)  # a bright square on a dark background
        Image.fromarray(image).save(root / f"{i:03d}.png")
    return root


def data_overrides(data: str, folder) -> tuple[str, ...]:
    if data == "digits":
        return ("data=digits",)
    return ("data=folder", f"data.root={folder}", "data.resolution=16")


def uri_of(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/mlflow.db"


def runs_in(uri: str):
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("imm")
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


# -- every architecture learns on every kind of image data ------------------------------------------
@pytest.mark.parametrize("data", ["digits", "folder"])
@pytest.mark.parametrize("arch", list(TINY))
def test_few_steps_lower_the_imm_loss_on_a_fixed_batch(arch, data, png_folder):
    # lr pinned: the toy experiment's 3e-4 is tuned for 4000 steps of the MLP, this is 20 steps of a tiny net
    cfg = compose_cfg(*data_overrides(data, png_folder), *TINY[arch], "train.batch_size=16", "optim.lr=1e-3")
    bundle = factory.dataset(cfg)
    assert bundle.kind == "images" and bundle.shape == ((1, 16, 16) if data == "digits" else (3, 16, 16))
    assert bundle.num_classes == (10 if data == "digits" else 0)
    torch.manual_seed(cfg.train.seed)
    net = factory.net(cfg, bundle.shape, bundle.num_classes)
    objective = factory.objective(cfg, bundle.num_classes)
    optimizer = factory.optimizer(cfg, net.parameters(), torch.device("cpu"))
    x, labels = next(ResumableBatches(bundle.train, cfg.train.batch_size, seed=0))
    assert x.shape == (16, *bundle.shape) and (labels is None) == (data == "folder")

    def fixed_loss():
        torch.manual_seed(1)  # DDPM++ dropout masks
        generator = torch.Generator().manual_seed(2)  # the same times, noise and label drops every step
        return objective(net, x, labels, generator=generator)[0]

    losses = []
    for _ in range(20):
        loss = fixed_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = fixed_loss().item()
    assert all(np.isfinite(losses)) and np.isfinite(final)
    assert final < 0.85 * losses[0], (arch, data, losses[0], final)


# -- the full loop on digits -------------------------------------------------------------------------
TINY_DIT = ("arch.hidden_size=32", "arch.depth=1", "arch.num_heads=2")


def test_train_end_to_end_on_digits_with_tracking_and_the_step_figure(tmp_path, caplog, classifier_cache):
    cfg = compose_cfg(
        "experiment=digits",
        *TINY_DIT,
        "train.steps=6",
        "train.batch_size=32",
        "train.log_every=2",
        "train.ckpt_every=3",
        "eval.every=3",
        "eval.n_samples=16",
        f"eval.fid_cache={classifier_cache[0]}",
    )
    assert cfg.eval.guidance == 1.5 and list(cfg.eval.steps) == [1, 2, 4, 8]  # the experiment's own setting
    uri = uri_of(tmp_path)
    run_dir = tmp_path / "run"
    with caplog.at_level("INFO", logger="imm.train"):
        summary = train(cfg, run_dir, tracking_uri=uri, run_name="digits-test")
    assert np.isfinite(summary["final/loss"])
    assert {"final/fd_floor", "final/accuracy_floor"} <= set(summary)  # the summary table's floor column

    torch.manual_seed(cfg.train.seed)
    n_params = count_parameters(factory.net(cfg, (1, 16, 16), 10))
    assert cfg.arch.name == "dit_s_4"
    assert re.search(rf"network: dit_s_4, {n_params / 1e6:.2f}M parameters", caplog.text), caplog.text

    (run,) = runs_in(uri)
    assert run.info.status == "FINISHED" and run.info.run_name == "digits-test"
    assert run.data.metrics["model/parameters"] == n_params
    assert run.data.params["data.name"] == "digits" and run.data.params["arch.name"] == "dit_s_4"
    for N in (1, 2, 4, 8):  # the classifier metric at every step count (imm/evaluation/classifier.py)
        assert {f"eval/fd_ratio16_{N}step_w1.5", f"eval/accuracy_{N}step_w1.5"} <= set(run.data.metrics)
    assert {"eval/fd_floor", "eval/accuracy_floor", "best/fd_ratio16_1step_w1.5"} <= set(run.data.metrics)
    assert (run_dir / "snapshots" / "best-8step_w1.5.pt").is_symlink()  # the 8-step best, by its classifier FD
    client = MlflowClient(tracking_uri=uri)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2, 4, 6]
    figures = sorted(a.path for a in client.list_artifacts(run.info.run_id, "figures"))
    assert figures == ["figures/step00000003-steps.png", "figures/step00000006-steps.png"], figures
    for name in ("step00000003-steps.png", "step00000006-steps.png"):
        with Image.open(run_dir / "figures" / name) as image:
            width, height = image.size
        assert width > 2 * height > 0  # one row of samples per step count: 1, 2, 4, 8
    assert (run_dir / "checkpoints" / "step-00000006.pt").is_file()


# -- classifier-free guidance --------------------------------------------------------------------------
def null_row(net) -> torch.Tensor:
    return net.y_embedder.table.weight[10].detach().clone()


@pytest.mark.parametrize("dropout", [None, "0"])
def test_label_dropout_trains_the_null_label(tmp_path, dropout):
    overrides = [
        "data=digits",
        "arch=dit_s_2",
        *TINY_DIT,
        "train.steps=8",
        "train.batch_size=32",
        "optim.warmup_steps=0",
        "optim.weight_decay=0",
        "eval.every=0",
        "eval.steps=[1]",
        "tracking.enabled=false",
    ]
    if dropout is not None:
        overrides.append(f"loss.label_dropout={dropout}")
    cfg = compose_cfg(*overrides)
    assert factory.label_dropout(cfg, 10) == (0.1 if dropout is None else 0.0)  # 0.1 is the default
    assert factory.objective(cfg, 10).label_dropout == factory.label_dropout(cfg, 10)
    torch.manual_seed(cfg.train.seed)
    before = null_row(factory.net(cfg, (1, 16, 16), 10))  # train() builds the net from the same seed
    train(cfg, tmp_path / "run")
    state = checkpoint.load(checkpoint.resolve(None, tmp_path / "run"))
    after = state["model"]["y_embedder.table.weight"][10]
    real = state["model"]["y_embedder.table.weight"][:10]
    assert not torch.equal(real, torch.zeros_like(real))
    if dropout is None:
        assert (after - before).abs().max() > 1e-4, "the null label (index num_classes) was never trained"
    else:
        assert torch.equal(after, before), "without label dropout nothing may touch the null label"


def test_label_dropout_defaults_to_zero_without_labels():
    cfg = compose_cfg("data=digits", "arch=dit_s_2", "data.use_labels=false")
    assert factory.dataset(cfg).num_classes == 0
    assert factory.label_dropout(cfg, 0) == 0.0
    with pytest.raises(ConfigError, match="loss.label_dropout=0.1 needs class-conditional data"):
        factory.label_dropout(compose_cfg("data=digits", "arch=dit_s_2", "loss.label_dropout=0.1"), 0)


def test_guidance_changes_digit_samples():
    cfg = compose_cfg("experiment=digits", *TINY_DIT)
    bundle = factory.dataset(cfg)
    torch.manual_seed(0)
    net = factory.net(cfg, bundle.shape, bundle.num_classes)
    with torch.no_grad():  # give the zero-initialised layers values so that labels matter
        gen = torch.Generator().manual_seed(1)
        for p in net.parameters():
            if p.abs().max() == 0:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    kwargs = dict(schedule=cfg.schedule.name, T=loss_T(cfg), eps=cfg.loss.eps)
    param = factory.parameterization(cfg)
    guided = Evaluator(
        bundle,
        param,
        sampling_plan(EvalConfig(), {"steps": [1, 2]}, guidance=cfg.eval.guidance, **kwargs),
        n_samples=20,
    )
    plain = Evaluator(
        bundle, param, sampling_plan(EvalConfig(), {"steps": [1, 2]}, guidance=1.0, **kwargs), n_samples=20
    )
    for steps in (1, 2):
        a, b = guided.samples(net, steps), plain.samples(net, steps)
        assert a.shape == (20, 1, 16, 16) and torch.isfinite(a).all()
        assert (a - b).abs().max() > 1e-3, "eval.guidance=1.5 must change the samples"


@pytest.mark.parametrize("data", ["digits", "folder"])
def test_guidance_is_refused_on_unconditional_data_before_any_run(tmp_path, data, png_folder):
    extra = ("data.use_labels=false",) if data == "digits" else ()
    cfg = compose_cfg(*data_overrides(data, png_folder), "arch=dit_s_2", *TINY_DIT, *extra, "eval.guidance=1.5")
    uri = uri_of(tmp_path)
    with pytest.raises(ConfigError) as info:
        train(cfg, tmp_path / "run", tracking_uri=uri)
    message = str(info.value)
    assert message.startswith("eval.guidance=1.5 needs class-conditional data")
    assert "use eval.guidance=1" in message and message.count(". ") == 0 and "\n" not in message
    if data == "digits":
        assert "data.use_labels=false" in message
    assert runs_in(uri) == []


# -- CIFAR-10 without its files --------------------------------------------------------------------------
@pytest.mark.parametrize("experiment", ["cifar10_paper", "cifar10_dit"])
def test_cifar10_offline_fails_before_any_mlflow_run(tmp_path, experiment):
    empty = tmp_path / "datasets"
    empty.mkdir()
    # fp32: the paper's TF32 needs CUDA, which this CPU test does not have.
    cfg = compose_cfg(f"experiment={experiment}", f"data.root={empty}", "train.precision=fp32")
    uri = uri_of(tmp_path)
    with pytest.raises(DataError) as info:
        train(cfg, tmp_path / "run", tracking_uri=uri)
    message = str(info.value)
    assert str(empty / "cifar-10-batches-py") in message and str(empty / "cifar-10-python.tar.gz") in message
    for name in ("data_batch_1", "data_batch_5", "test_batch", "batches.meta", "data.download=true"):
        assert name in message
    assert "\n" not in message
    assert runs_in(uri) == []
    assert not (tmp_path / "run" / "checkpoints").exists()


# -- the DataLoader path: folder images with worker processes ---------------------------------------------
class RecordingBatches(ResumableBatches):
    """ResumableBatches that remembers its options and every batch it hands to the loop."""

    made: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.options, self.seen = kwargs, []
        RecordingBatches.made.append(self)

    def __next__(self):
        x, labels = super().__next__()
        self.seen.append(x.clone())
        return x, labels


@pytest.fixture
def recording(monkeypatch):
    RecordingBatches.made = []
    monkeypatch.setattr(loop_mod, "ResumableBatches", RecordingBatches)
    return RecordingBatches.made


def folder_cfg(png_folder, *extra):
    return compose_cfg(
        *data_overrides("folder", png_folder),
        "arch=dit_s_2",
        *TINY_DIT,
        "train.batch_size=8",
        "data.num_workers=2",
        "data.pin_memory=true",
        "train.ckpt_every=3",
        "train.log_every=1",
        "eval.every=0",
        "eval.steps=[1]",
        "tracking.enabled=false",
        "optim.lr_schedule=constant",
        *extra,
    )


def test_folder_training_uses_persistent_workers_and_pins_memory_only_on_cuda(tmp_path, png_folder, recording):
    cfg = folder_cfg(png_folder, "train.steps=4")
    summary = train(cfg, tmp_path / "run")
    assert np.isfinite(summary["final/loss"])
    (batches,) = recording
    assert batches.options["num_workers"] == 2 and batches.options["persistent_workers"] is True
    assert batches.options["pin_memory"] is False  # data.pin_memory=true, but this run is on the CPU
    loader = batches._loader
    assert loader is not None and loader.num_workers == 2 and loader.persistent_workers and not loader.pin_memory
    assert len(batches.seen) == 4 and all(x.shape == (8, 3, 16, 16) for x in batches.seen)


def test_checkpoint_saves_the_data_position_and_resume_continues_the_data_order(tmp_path, png_folder, recording):
    # Reference: 7 steps in one go (5 batches per epoch, so the run crosses an epoch boundary).
    train(folder_cfg(png_folder, "train.steps=7"), tmp_path / "straight")
    straight = recording[-1]
    reference = checkpoint.load(checkpoint.resolve(None, tmp_path / "straight"))

    # Interrupted after 3 steps, then the same run directory relaunched with the full length (a constant
    # learning rate: the cosine schedule depends on train.steps, which differs between the two legs).
    run_dir = tmp_path / "resumed"
    train(folder_cfg(png_folder, "train.steps=3"), run_dir)
    first = recording[-1]
    saved = checkpoint.load(run_dir / "checkpoints" / "step-00000003.pt")
    assert saved["data"] == {"epoch": 0, "position": 3}
    train(folder_cfg(png_folder, "train.steps=7"), run_dir)
    second = recording[-1]
    assert second._loader is not None  # the DataLoader path, not the in-memory one
    assert len(first.seen) == 3 and len(second.seen) == 4
    for a, b in zip(first.seen + second.seen, straight.seen, strict=True):
        assert torch.equal(a, b), "the resumed run must see exactly the batches of the uninterrupted one"
    final = checkpoint.load(checkpoint.resolve(None, run_dir))
    assert final["data"] == reference["data"] == {"epoch": 1, "position": 2}
    for key, value in reference["model"].items():
        assert torch.equal(final["model"][key], value), key


# -- parameter counts of the CIFAR-10 presets (the README's numbers) -------------------------------------
@pytest.mark.parametrize(
    "experiment, arch, num_classes, millions",
    [
        ("cifar10_paper", "ddpmpp", 0, 56.06),  # EDM's DDPM++ (55.73M) + IMM's s-embedding MLP (0.33M)
        ("cifar10_dit", "dit_s_4", 10, 32.75),
        ("cifar10_dit", "dit_b_2", 10, 130.33),
    ],
)
def test_cifar10_preset_parameter_counts(experiment, arch, num_classes, millions):
    cfg = compose_cfg(f"experiment={experiment}", f"arch={arch}")
    with torch.device("meta"):
        net = factory.net(cfg, (3, 32, 32), num_classes)
    count = count_parameters(net)
    assert round(count / 1e6, 2) == millions, count
    if arch == "ddpmpp":
        s_path = sum(p.numel() for n, p in net.named_parameters() if n.startswith(("map_layer0_s", "map_layer1_s")))
        assert round((count - s_path) / 1e6, 2) == 55.73  # EDM's published DDPM++ size, 55.7M
