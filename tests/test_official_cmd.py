"""The released models' commands end to end through launch.py, on the fixture of tests/data/official (how it was
made: tests/test_official.py): `--config-name import` writes a run directory of ours, `sample` reads it (the
official generator's noise and labels from files: the same samples), `evaluate` measures FID against a reference
statistics file, and training's `init=` fine-tunes from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import launch

pytestmark = pytest.mark.slow  # launch.py in subprocesses

DATA = Path(__file__).parent / "data" / "official"
NO_TRACKING = "tracking.enabled=false"


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Both fixture networks imported through launch.py (for 1x8x8 digits-like data)."""
    root = tmp_path_factory.mktemp("official")
    runs = {}
    for name, src in (("dit", "dit.pkl"), ("songunet", "songunet.pt")):
        proc = launch(
            root,
            "--config-name",
            "import",
            f"src={DATA / src}",
            f"out={root / name}",
            "dataset=digits",
            'overrides=["data.resolution=8"]',
            check=True,
        )
        runs[name] = (root / name, proc.stdout)
    return root, runs


def test_import_writes_a_run_directory_and_says_what_it_found(imported):
    root, runs = imported
    run, out = runs["dit"]
    assert (run / "snapshots" / "snapshot-00000000.pt").is_file() and (run / ".hydra" / "config.yaml").is_file()
    record = json.loads((run / "import.json").read_text())
    assert record["network_class"] == "DiT" and record["format"] == "pickle" and len(record["sha256"]) == 64
    assert record["arch"]["time_features"] == "float64" and record["numerics"] == "official"
    assert record["method"]["schedule.second_time"] == "stride" and record["sources"]["temb_type"] == "file"
    assert "posix.system" not in record["globals_not_imported"]
    assert "timm.layers.mlp.Mlp" in record["globals_not_imported"]
    assert "nothing from it was run" in out and "arch=dit_s_2" in out and "second time input t - s" in out
    unet = json.loads((runs["songunet"][0] / "import.json").read_text())
    assert unet["format"] == "torch.save (zip)" and unet["arch"]["channel_mult"] == [1, 2]


def test_sample_reads_the_run_and_repeats_the_official_generator(imported, tmp_path):
    root, runs = imported
    gen = np.load(DATA / "generator.npz")
    np.save(tmp_path / "noise.npy", gen["dit_noise"])
    np.save(tmp_path / "labels.npy", gen["dit_labels"])
    out = tmp_path / "s"
    launch(
        tmp_path,
        "--config-name",
        "sample",
        f"ckpt={runs['dit'][0]}",
        f"out={out}",
        "steps=4",
        "noise=noise.npy",
        "labels=labels.npy",
        "guidance=1.5",
        "compare_steps=[]",
        NO_TRACKING,
        check=True,
    )
    s = np.load(out / "samples.npz")
    assert s["samples"].dtype == np.float64 and np.array_equal(s["labels"], gen["dit_labels"])
    assert np.abs(s["samples"] - gen["dit_uniform4_w1.5"]).max() <= 1e-4
    record = json.loads((out / "sample.json").read_text())
    assert record["noise"] == str((tmp_path / "noise.npy").resolve()) and record["n"] == 6

    np.save(tmp_path / "unet_noise.npy", gen["songunet_noise"])
    out2 = tmp_path / "u"
    launch(
        tmp_path,
        "--config-name",
        "sample",
        f"ckpt={runs['songunet'][0]}",
        f"out={out2}",
        "steps=2",
        "noise=unet_noise.npy",
        "compare_steps=[]",
        NO_TRACKING,
        check=True,
    )
    s2 = np.load(out2 / "samples.npz")
    assert np.abs(s2["samples"] - gen["songunet_eta1.4"]).max() <= 1e-4  # two_step_eta 1.4 by default


DIT_ARCH = ["arch=dit_s_2", "arch.hidden_size=16", "arch.depth=2", "arch.num_heads=2", "arch.time_features=float64"]
DIGITS8 = ["data=digits", "data.resolution=8"]


def test_fine_tune_from_the_imported_run(imported, tmp_path):
    """init=DIR: 20 steps from the imported weights (step 0, fresh optimizer, EMA from the same weights); init
    enters the run's identity (its own run directory)."""
    root, runs = imported
    common = [f"init={runs['dit'][0]}", *DIT_ARCH, *DIGITS8, "schedule=fm", "schedule.second_time=stride"]
    small = ["train.batch_size=32", "eval.every=0", "eval.n_samples=16", "eval.steps=[1]", NO_TRACKING]
    proc = launch(tmp_path, *common, "schedule.numerics=official", "train.steps=20", *small, check=True)
    assert f"weights from the EMA weights of {runs['dit'][0]}/snapshots/snapshot-00000000.pt (step 0)" in proc.stderr
    assert "step 0 -> 20 of 20" in proc.stderr
    (run_dir,) = (tmp_path / "runs" / "toy").iterdir()
    assert (run_dir / "checkpoints" / "step-00000020.pt").is_file()
    # without init the same command is another experiment: another run directory
    launch(tmp_path, *common[1:], "train.steps=1", *small, check=True)
    assert len(list((tmp_path / "runs" / "toy").iterdir())) == 2


def test_init_of_another_architecture_is_one_sentence(imported, tmp_path):
    root, runs = imported
    proc = launch(tmp_path, f"init={runs['dit'][0]}", "arch=dit_s_2", *DIGITS8, "train.steps=2", NO_TRACKING)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "does not fit the network this config builds (arch=dit_s_2): its x_embedder.proj.weight is" in line
    assert "[16, 1, 2, 2] where this network's is [384, 1, 2, 2]" in line
    assert not (tmp_path / "mlflow.db").exists() and not list(tmp_path.rglob("step-*.pt"))
    dry = launch(tmp_path, f"init={runs['dit'][0]}", "arch=dit_s_2", *DIGITS8, "dry_run=true", NO_TRACKING)
    assert dry.returncode == 2 and "its x_embedder.proj.weight is [16, 1, 2, 2]" in dry.stderr
    proc = launch(tmp_path, f"init={tmp_path / 'nowhere'}", "debug=toy", NO_TRACKING)
    assert proc.returncode == 2 and "init=" in proc.stderr and "does not exist" in proc.stderr


def test_evaluate_against_a_reference_statistics_file(imported, tmp_path):
    """eval.fid_ref: FID against fixed mu/sigma (the paper's protocol); no training data is read, and the command
    says which reference it used."""
    root, runs = imported
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(100, 32))  # TinyRandomFeatures' 32 features
    np.savez(tmp_path / "ref.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    out = tmp_path / "ev"
    proc = launch(
        tmp_path,
        "--config-name",
        "evaluate",
        f"ckpt={runs['songunet'][0]}",
        f"out={out}",
        "eval.fid_ref=ref.npz",
        "eval.feature_net=toynets:TinyRandomFeatures",
        "eval.n_samples=16",
        "eval.steps=[1,2]",
        NO_TRACKING,
        check=True,
    )
    record = json.loads((out / "results.json").read_text())
    assert record["fid_reference"] == f"the file {(tmp_path / 'ref.npz').resolve()}"
    assert set(record["results"]) >= {"evaluate/fid16_1step", "evaluate/fid16_2step"}
    assert f"FID reference statistics: the file {(tmp_path / 'ref.npz').resolve()}" in proc.stdout
    np.savez(tmp_path / "bad.npz", mu=np.zeros(5), sigma=np.eye(5))
    proc = launch(
        tmp_path,
        "--config-name",
        "evaluate",
        f"ckpt={runs['songunet'][0]}",
        f"out={out}2",
        "eval.fid_ref=bad.npz",
        "eval.feature_net=toynets:TinyRandomFeatures",
        "eval.n_samples=16",
        NO_TRACKING,
    )
    assert proc.returncode == 2 and "holds statistics of [5] features" in proc.stderr.strip().splitlines()[-1]


def test_bad_input_to_import_is_one_sentence_and_writes_nothing(tmp_path):
    import shutil

    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "trunc.pkl").write_bytes((DATA / "dit.pkl").read_bytes()[:5000])
    blob = (DATA / "dit.pkl").read_bytes()  # the class name 'DiT' (a 3-character string) renamed in the pickle
    assert b"\x8c\x03DiT" in blob
    (tmp_path / "adm.pkl").write_bytes(blob.replace(b"\x8c\x03DiT", b"\x8c\x03ADM"))
    shutil.copy(DATA / "dit.pkl", tmp_path / "dit.pkl")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    cases = {
        "src=notes.txt": "is not an official IMM checkpoint: it begins b'not a checkp'",
        "src=trunc.pkl": "is truncated or damaged",
        "src=adm.pkl": "its network class 'ADM' is not one this project has",
        "src=missing.pkl": "does not exist",
        "src=dit.pkl num_heads=3": "not divisible by num_heads 3",
    }
    for args, words in cases.items():
        proc = launch(tmp_path, "--config-name", "import", *args.split(), "out=imported")
        line = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and words in line, (args, proc.stderr[-2000:])
        assert not (tmp_path / "imported").exists()
    proc = launch(tmp_path, "--config-name", "import", "src=dit.pkl", "out=full")
    assert proc.returncode == 2 and "out=full is not empty" in proc.stderr


def test_a_latent_space_import_records_the_official_codec(tmp_path):
    """A latent-space model (the released ImageNet ones: data=latents) carries the official encoder's VAE by name
    and the run's channel statistics, with no weight hash and no source images: its FID needs eval.fid_ref."""
    import torch
    from helpers import compose_task

    from imm.errors import ConfigError
    from imm.tasks import evaluate, importer

    cfg = compose_task(
        "import",
        f"src={DATA / 'dit.pkl'}",
        f"out={tmp_path / 'run'}",
        "dataset=latents",
        'overrides=["data.latent_mean=[0.1]","data.latent_std=[2.0]","data.resolution=64"]',
    )
    importer.run(cfg)
    snap = torch.load(tmp_path / "run" / "snapshots" / "snapshot-00000000.pt", weights_only=True)
    assert snap["latents"]["vae"] == "stabilityai/sd-vae-ft-ema" and snap["latents"]["vae_sha256"] is None
    assert snap["latents"]["mean"] == [0.1] and snap["latents"]["std"] == [2.0] and snap["latents"]["scale"] == 0.5
    ev = compose_task(
        "evaluate",
        f"ckpt={tmp_path / 'run'}",
        f"out={tmp_path / 'ev'}",
        "eval.feature_net=toynets:TinyRandomFeatures",
        NO_TRACKING,
    )
    with pytest.raises(ConfigError, match="records no images its latents came from .* set eval.fid_ref"):
        evaluate.run(ev)
