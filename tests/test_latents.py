"""Latent data (issue 18): `--config-name encode`, data=latents, decoding wherever images are shown or measured.

A tiny randomly initialised AutoencoderKL saved with save_pretrained stands in for Stable Diffusion's VAE (its
weights cannot be downloaded here); everything else is real: the diffusers loading code, a folder of PNGs,
Hydra-composed configs, the training loop, the sample and evaluate commands, an SQLite MLflow store.
"""

import json
import pickle
import re
import shutil
import signal

import numpy as np
import pytest
import torch
from helpers import ROOT, compose_cfg, compose_task, launch, one_thread_env
from helpers.latents import CLASSES, class_folder, tiny_vae
from helpers.tmpfs import remount, tmpfs
from toynets import TinyRandomFeatures

from imm.data import SIGMA_DATA, DataError, build_dataset
from imm.data import latents as latents_mod
from imm.data import vae as vae_mod
from imm.data.images import ImageFolder
from imm.errors import ConfigError
from imm.evaluation.evaluator import Evaluator
from imm.evaluation.fid import FIDEvaluator, to_uint8
from imm.tasks import encode

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors (conftest.py)
INJECT = ROOT / "tests" / "faults" / "inject.py"


def encode_args(src, vae, out, *extra):
    return (f"data.root={src}", f"vae={vae}", f"out={out}", "data.num_workers=0", *extra)


def run_encode(src, vae, out, *extra):
    return encode.run(compose_task("encode", *encode_args(src, vae, out, *extra)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A VAE folder, 24 labelled images and their encode with flipped copies: shards of 5, batches of 3."""
    root = tmp_path_factory.mktemp("latents")
    vae, src = tiny_vae(root / "vae"), class_folder(root / "images")
    manifest = run_encode(src, vae, root / "lat", "shard_size=5", "batch_size=3", "data.hflip=true")
    return root, vae, src, root / "lat", manifest


def shards(out, manifest, key):
    return np.concatenate([np.load(out / s[key]) for s in manifest["shards"]])


# -- encode -------------------------------------------------------------------------------------------------
def test_encode_writes_the_vae_posterior_means_labels_and_manifest(world):
    root, vae_dir, src, out, manifest = world
    assert manifest["complete"] and manifest["vae"] == str(vae_dir.resolve()) and manifest["resolution"] == 32
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["count"] == 24 and manifest["hflip"]
    assert [s["count"] for s in manifest["shards"]] == [5, 5, 5, 5, 4] and manifest["n_shards"] == 5
    assert manifest["num_classes"] == 2 and manifest["classes"] == list(CLASSES)
    assert manifest["source"] == {
        "name": "folder",
        "root": str(src.resolve()),
        "resolution": 32,
        "class_subfolders": None,
        "shape": [3, 32, 32],
        "count": 24,
    }
    assert json.loads((out / latents_mod.MANIFEST).read_text()) == manifest
    # each latent is the posterior mean of its image alone (other batches: float tolerance), flipped of the mirror
    vae = vae_mod.load(str(vae_dir), key="vae")
    assert manifest["vae_sha256"] == vae_mod.fingerprint(vae)
    images = ImageFolder(src, 32)
    x = torch.stack([images.get(i, False)[0] for i in range(24)])
    latents, flipped, labels = (shards(out, manifest, k) for k in ("latents", "flipped", "labels"))
    expect = torch.cat([vae.encode(x[i : i + 1]).latent_dist.mean for i in range(24)]).detach()
    expect_flipped = torch.cat([vae.encode(x[i : i + 1].flip(-1)).latent_dist.mean for i in range(24)]).detach()
    assert latents.dtype == np.float32 and latents.shape == (24, 4, 8, 8)
    np.testing.assert_allclose(latents, expect.numpy(), atol=1e-5)
    np.testing.assert_allclose(flipped, expect_flipped.numpy(), atol=1e-5)
    assert not np.allclose(latents, flipped, atol=1e-3)  # a flipped image is not a flipped latent
    assert labels.tolist() == images.labels.tolist() == [0] * 12 + [1] * 12


def test_manifest_statistics_are_the_latents_channel_mean_and_std(world):
    _, _, _, out, manifest = world
    latents = shards(out, manifest, "latents").astype(np.float64)
    np.testing.assert_allclose(manifest["mean"], latents.mean(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(manifest["std"], latents.std(axis=(0, 2, 3)), rtol=1e-10)


def test_channel_statistics_merge_exactly_over_any_split():
    rng = np.random.default_rng(0)
    z = rng.normal(3.0, 2.0, (37, 3, 4, 4)).astype(np.float32)
    stats = {"count": 0, "mean": None, "m2": None}
    for a, b in [(0, 1), (1, 11), (11, 12), (12, 37)]:
        stats = latents_mod.merge_channel_stats(stats, z[a:b])
    z64 = z.astype(np.float64)
    assert stats["count"] == 37 * 16
    np.testing.assert_allclose(stats["mean"], z64.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(np.array(stats["m2"]) / stats["count"], z64.var(axis=(0, 2, 3)), rtol=1e-12)


def test_a_finished_encode_is_not_redone_and_another_one_is_refused(world, caplog):
    root, vae, src, out, manifest = world
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with caplog.at_level("INFO", logger="imm.encode"):
        assert run_encode(src, vae, out, "shard_size=5", "batch_size=7", "data.hflip=true") == manifest
    assert "nothing to do" in caplog.text and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(ConfigError, match=r"holds another encode \(shard_size was 5, now 6\); use another out="):
        run_encode(src, vae, out, "shard_size=6", "data.hflip=true")
    other = tiny_vae(root / "other_vae", seed=1)
    with pytest.raises(ConfigError, match=r"holds another encode \(vae_sha256 was"):
        run_encode(src, other, out, "shard_size=5", "data.hflip=true")


def test_encode_refuses_bad_options_before_any_work(world, tmp_path):
    _, vae, src, _, _ = world
    cases = {
        ("dtype=float64",): "dtype='float64' is not allowed; choose one of float32, float16.",
        ("batch_size=0",): "batch_size=0 is out of range; batch_size must be >= 1.",
        ("data=checkerboard",): "data='checkerboard' is not allowed; choose one of digits, mnist, cifar10, folder.",
        ("data.resolution=34",): "data.resolution=34 must be divisible by the VAE's downsampling factor 4",
    }
    for extra, message in cases.items():
        with pytest.raises(ConfigError) as e:
            run_encode(src, vae, tmp_path / "x", *extra)
        assert message in str(e.value)
    with pytest.raises(ConfigError, match="out is missing; set out="):
        encode.run(compose_task("encode", f"data.root={src}", f"vae={vae}"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="out=.*file is a file; set out to a folder"):
        run_encode(src, vae, tmp_path / "file")
    assert not (tmp_path / "x").exists()


def test_float16_latents_take_half_the_disk_and_read_back_as_float32(world, tmp_path):
    _, vae, src, out, manifest = world
    half = run_encode(src, vae, tmp_path / "half", "shard_size=24", "dtype=float16")
    z16 = np.load(tmp_path / "half" / half["shards"][0]["latents"])
    assert z16.dtype == np.float16 and half["hflip"] is False
    np.testing.assert_allclose(z16, shards(out, manifest, "latents"), rtol=2e-3, atol=1e-4)
    x, _ = build_dataset("latents", root=tmp_path / "half").train.get(3, False)
    assert x.dtype == torch.float32


# -- the VAE ------------------------------------------------------------------------------------------------
def test_a_missing_vae_is_one_sentence_naming_the_option_and_the_fix(tmp_path, monkeypatch):
    with pytest.raises(vae_mod.VAEError) as e:
        vae_mod.load(str(tmp_path / "nowhere"), key="data.vae")
    assert str(e.value).startswith(f"data.vae='{tmp_path / 'nowhere'}' does not exist; point data.vae at a folder")
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # no network here anyway; offline fails at once
    with pytest.raises(vae_mod.VAEError) as e:
        vae_mod.load("stabilityai/sd-vae-ft-ema", key="vae")
    message = str(e.value)
    assert message.startswith("The VAE 'stabilityai/sd-vae-ft-ema' (vae) is not in the Hugging Face cache")
    assert "save_pretrained('vae')" in message and "set vae=/path/to/vae." in message and "\n" not in message
    # Online but the hub's host does not resolve (.invalid never does): said at once, not after half a minute of
    # retries that end blaming config.json.
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ENDPOINT", "https://hub.invalid")
    for proxy in ("HTTPS_PROXY", "https_proxy"):  # a machine behind a proxy skips the check (below)
        monkeypatch.delenv(proxy, raising=False)
    with pytest.raises(vae_mod.VAEError) as e:
        vae_mod.load("stabilityai/sd-vae-ft-ema", key="vae")
    assert "cannot be downloaded (hub.invalid cannot be reached: " in str(e.value) and "config.json" not in str(e.value)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # behind a proxy the host need not resolve here
    assert vae_mod._unreachable("https://hub.invalid") is None


# -- data=latents -------------------------------------------------------------------------------------------
def test_latents_are_memory_mapped_normalised_and_flip_to_the_encoded_mirror(world):
    _, vae, _, out, manifest = world
    bundle = build_dataset("latents", root=out, hflip=True)
    ds = bundle.train
    assert (bundle.kind, bundle.shape, bundle.num_classes, len(ds)) == ("images", (4, 8, 8), 2, 24)
    raw, flipped = shards(out, manifest, "latents"), shards(out, manifest, "flipped")
    mean, std = (np.array(manifest[k]).reshape(4, 1, 1) for k in ("mean", "std"))
    for i in (0, 4, 5, 23):  # across shard borders
        x, label = ds.get(i, False)
        np.testing.assert_allclose(x.numpy(), (raw[i] - mean) / std * SIGMA_DATA, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ds.get(i, True)[0].numpy(), (flipped[i] - mean) / std * SIGMA_DATA, atol=1e-5)
        assert label == i // 12
    assert all(isinstance(m, np.memmap) for m in ds._maps.values())  # read through maps, never loaded whole
    clone = pickle.loads(pickle.dumps(ds))  # what a DataLoader worker gets: paths, no data
    assert (
        len(pickle.dumps(ds)) < 8000
        and clone._maps is None
        and torch.equal(clone.get(7, False)[0], ds.get(7, False)[0])
    )
    # the measured statistics make every channel mean 0 and std sigma_d = 0.5 over the whole set
    x = torch.stack([ds.get(i, False)[0] for i in range(24)]).double()
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(4, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3), correction=0), torch.full((4,), 0.5).double(), atol=1e-6, rtol=0)


def test_given_channel_statistics_replace_the_measured_ones(world):
    _, _, _, out, manifest = world
    mean, std = [0.1, -0.2, 0.3, 0.0], [2.0, 1.0, 0.5, 4.0]
    bundle = build_dataset("latents", root=out, latent_mean=mean, latent_std=std)
    raw = shards(out, manifest, "latents")[2]
    expect = (raw - np.reshape(mean, (4, 1, 1))) / np.reshape(std, (4, 1, 1)) * 0.5
    np.testing.assert_allclose(bundle.train.get(2, False)[0].numpy(), expect, rtol=1e-5, atol=1e-6)
    assert (bundle.latents.mean, bundle.latents.std) == (mean, std)


def test_the_manifest_is_checked_against_the_data_options(world, tmp_path):
    _, vae, src, out, manifest = world
    checks = [
        (dict(resolution=64), "data.resolution=64 does not match the latents in"),
        (dict(latent_mean=[0.0, 1.0]), "data.latent_mean=[0.0, 1.0] has 2 values, but the latents have 4 channels."),
        (dict(latent_std=[1.0, 1.0, 0.0, 1.0]), "must be positive in every channel"),
    ]
    for options, message in checks:
        with pytest.raises(DataError) as e:
            build_dataset("latents", root=out, **options)
        assert message in str(e.value)
    plain = tmp_path / "plain"
    run_encode(src, vae, plain, "shard_size=24")
    with pytest.raises(DataError, match="data.hflip=true needs flipped copies, but the latents in .* were encoded"):
        build_dataset("latents", root=plain, hflip=True)
    with pytest.raises(DataError, match=r"holds no manifest.json; point data.root at the out= folder of"):
        build_dataset("latents", root=src)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(out, unfinished)
    m = json.loads((unfinished / "manifest.json").read_text())
    (unfinished / "manifest.json").write_text(json.dumps({**m, "complete": False, "shards": m["shards"][:2]}))
    with pytest.raises(DataError, match=r"are incomplete \(2 of 5 shards encoded\); run the same encode command"):
        build_dataset("latents", root=unfinished)
    (unfinished / "manifest.json").write_text(json.dumps(m))
    (unfinished / m["shards"][3]["labels"]).unlink()
    with pytest.raises(DataError, match="labels-00003.npy .listed in manifest.json. is missing"):
        build_dataset("latents", root=unfinished)
    with pytest.raises(ConfigError, match="data.root is missing; data=latents needs data.root="):
        from imm.validation import validate

        validate(compose_cfg("data=latents", "arch=dit_s_2"))


# -- decoding -----------------------------------------------------------------------------------------------
def test_the_codec_decodes_with_the_encoding_vae_only(world, tmp_path):
    root, vae_dir, _, out, manifest = world
    codec = build_dataset("latents", root=out).latents
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64) * 0.5
    vae = vae_mod.load(str(vae_dir), key="vae")
    raw = x.float() / 0.5 * torch.tensor(codec.std).view(1, 4, 1, 1) + torch.tensor(codec.mean).view(1, 4, 1, 1)
    images = codec.decode(x)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32 and images.abs().max() <= 1
    torch.testing.assert_close(images, vae.decode(raw).sample.clamp(-1, 1), atol=1e-5, rtol=0)
    # the checkpoint's entry round-trips; a VAE folder that moved is given with data.vae
    moved = tmp_path / "moved_vae"
    shutil.copytree(vae_dir, moved)
    again = latents_mod.LatentCodec.from_state_dict(codec.state_dict(), vae=str(moved))
    torch.testing.assert_close(again.decode(x), images)
    other = latents_mod.LatentCodec.from_state_dict(codec.state_dict(), vae=str(tiny_vae(tmp_path / "v1", seed=1)))
    with pytest.raises(vae_mod.VAEError, match="holds other weights than the VAE these latents were encoded with"):
        other.decode(x)


def test_evaluator_decodes_for_the_figure_and_measures_fid_against_the_encoded_images(world, tmp_path, monkeypatch):
    _, vae_dir, src, out, _ = world
    loads, load = [], vae_mod.load
    monkeypatch.setattr(vae_mod, "load", lambda *a, **k: loads.append(a) or load(*a, **k))  # counts, then loads
    cfg = compose_cfg(
        "data=latents", f"data.root={out}", "arch=dit_s_2", "arch.hidden_size=32", "arch.depth=1", "arch.num_heads=2"
    )
    from imm import factory

    bundle = factory.dataset(cfg)
    torch.manual_seed(0)
    net = factory.net(cfg, bundle.shape, bundle.num_classes)
    ev = Evaluator.from_config(
        cfg,
        bundle,
        factory.parameterization(cfg),
        steps=[1, 2],
        n_samples=4,
        fid=True,
        fid_n_samples=10,
        feature_net="toynets:TinyRandomFeatures",
        fid_cache=tmp_path,
        guidance=1.5,
    )
    assert len(loads) == 1  # the VAE is loaded when the evaluator is built, before any work
    results, figs, by_steps = ev(net)
    ev(net)
    assert len(loads) == 1  # and only then
    assert by_steps[1].shape == (4, 4, 8, 8) and "figures/steps.png" in figs  # latents in, a picture out
    assert results["eval/nfe_1step_w1.5"] == 2 and results["eval/nfe_2step_w1.5"] == 4
    # the reference statistics are those of the encoded images themselves, at their resolution
    fe = FIDEvaluator(feature_net=TinyRandomFeatures())
    images = ImageFolder(src, 32)
    fe.prepare_reference(torch.stack([images.get(i, False)[0] for i in range(24)]), "reference")
    m, ref = ev.fid_evaluator.metric, fe.metric
    torch.testing.assert_close(m.real_features_sum, ref.real_features_sum)
    assert int(m.real_features_num_samples) == 24
    # FID is measured on the decoded samples
    samples = torch.cat(list(ev._decode(net, 2, ev._fresh_batches(10), 1.5)))
    assert results["eval/fid10_2step_w1.5"] == pytest.approx(fe.fid(bundle.to_images(samples).float()), rel=1e-6)


def test_moved_source_images_are_refused_before_any_fid_work(world, tmp_path):
    _, _, _, out, _ = world
    cfg = compose_cfg("data=latents", f"data.root={out}", f"data.source_root={tmp_path}/gone", "arch=dit_s_2")
    from imm import factory

    bundle = factory.dataset(cfg)
    with pytest.raises(DataError, match="are not in .*gone any more; set data.source_root to where they are now"):
        Evaluator.from_config(
            cfg,
            bundle,
            factory.parameterization(cfg),
            fid=True,
            feature_net="toynets:TinyRandomFeatures",
            fid_cache=tmp_path,
        )


# -- the commands through launch.py -------------------------------------------------------------------------
@pytest.mark.slow
def test_encode_offline_exits_2_and_killed_mid_shard_continues_to_the_bytes_of_an_uninterrupted_one(world, tmp_path):
    _, vae, src, _, _ = world
    offline = launch(
        tmp_path,
        "--config-name",
        "encode",
        f"data.root={src}",
        f"out={tmp_path / 'none'}",
        env=one_thread_env({"HF_HUB_OFFLINE": "1"}),
    )  # the paper's VAE by default, which is not here
    out = offline.stdout + offline.stderr
    assert offline.returncode == 2 and "Traceback" not in out, out[-3000:]
    assert "The VAE 'stabilityai/sd-vae-ft-ema' (vae) is not in the Hugging Face cache" in out
    assert not (tmp_path / "none").exists()
    args = ("--config-name", "encode", *encode_args(src, vae, tmp_path / "lat", "shard_size=5", "batch_size=2"))
    reference = ("--config-name", "encode", *encode_args(src, vae, tmp_path / "ref", "shard_size=5", "batch_size=2"))
    launch(tmp_path, *reference, check=True)
    killed = launch(tmp_path, *args, script=INJECT, env=one_thread_env({"IMM_FAULT": "kill_in_encode:3"}))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    manifest = json.loads((tmp_path / "lat" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2 and not manifest["complete"]  # shard 3 written, not committed
    assert (tmp_path / "lat" / "latents-00002.npy").is_file()
    again = launch(tmp_path, *args, check=True)
    assert "continuing after shard 2" in again.stdout + again.stderr
    files = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert sorted(p.name for p in (tmp_path / "lat").iterdir()) == files  # no temporary files left
    for name in files:
        assert (tmp_path / "lat" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


@pytest.mark.slow
def test_encode_that_fills_the_disk_mid_shard_stops_with_one_sentence_and_continues_once_there_is_space(
    world, tmp_path
):
    """out= on a real 32 kB tmpfs (8 pages): shard 0 (5 latents, 5 flipped, 5 labels: 5 pages) and the manifest
    fit, shard 1 does not. The encode stops with one sentence (exit 2), its manifest lists shard 0 only, and
    nothing of shard 1 is left; grown, the same command continues with shard 1 and ends with the bytes of the
    module's uninterrupted encode (the same shards and batches)."""
    _, vae, src, reference, _ = world
    with tmpfs(tmp_path / "small", "32k") as small:
        out = small / "lat"
        args = (
            "--config-name",
            "encode",
            *encode_args(src, vae, out, "shard_size=5", "batch_size=3", "data.hflip=true"),
        )
        full = launch(tmp_path, *args)
        said = full.stdout + full.stderr
        assert full.returncode == 2 and "Traceback" not in said, said[-3000:]
        (msg,) = [line.split("[ERROR] - ", 1)[1] for line in said.splitlines() if "[ERROR]" in line]
        assert re.fullmatch(
            rf"no space left on device for {re.escape(str(out))}/(latents|flipped)-00001\.npy \(it needs 5.25 kB, \d+"
            rf" k?B is free on {re.escape(str(small))}\); 1 of the 5 shards are complete \(the others need about 42.7"
            r" kB more\); free some space there, then run the same command again: it continues with shard 1",
            msg,
        ), msg
        manifest = json.loads((out / "manifest.json").read_text())
        assert [s["latents"] for s in manifest["shards"]] == ["latents-00000.npy"] and not manifest["complete"]
        assert sorted(p.name for p in out.iterdir()) == [
            "flipped-00000.npy",
            "labels-00000.npy",
            "latents-00000.npy",
            "manifest.json",
        ]

        remount(small, "1m")
        again = launch(tmp_path, *args, check=True)
        assert "continuing after shard 1" in again.stdout + again.stderr
        names = sorted(p.name for p in reference.iterdir())
        assert sorted(p.name for p in out.iterdir()) == names
        for name in names:
            assert (out / name).read_bytes() == (reference / name).read_bytes(), name


TINY_DIT = ("arch=dit_s_2", "arch.hidden_size=32", "arch.depth=1", "arch.num_heads=2")


@pytest.mark.slow
def test_encode_train_sample_and_evaluate_end_to_end(tmp_path):
    """The issue's test: encode a generated image folder with the tiny VAE, train 20 steps of a tiny DiT on the
    latents, sample and decode, and FID of decoded images with the test feature network."""
    vae, src = tiny_vae(tmp_path / "vae"), class_folder(tmp_path / "images", per_class=8)
    launch(tmp_path, "--config-name", "encode", *encode_args(src, vae, tmp_path / "lat"), check=True)
    train = launch(
        tmp_path,
        "data=latents",
        f"data.root={tmp_path / 'lat'}",
        "data.num_workers=0",
        *TINY_DIT,
        "train.steps=20",
        "train.batch_size=8",
        "train.threads=1",
        "train.log_every=10",
        "eval.every=0",
        "eval.n_samples=8",
        "eval.steps=[1,2]",
        "eval.guidance=1.5",
        "hydra.run.dir=run",
        check=True,
    )
    assert "network: dit_s_2" in train.stderr
    figures = list((tmp_path / "run" / "figures").glob("*.png"))
    assert len(figures) == 1 and figures[0].stat().st_size > 1000  # decoded images at the end of training
    launch(tmp_path, "--config-name", "sample", "ckpt=run", "steps=2", "n=6", f"out={tmp_path / 's'}", check=True)
    with np.load(tmp_path / "s" / "samples.npz") as z:
        assert z["latents"].shape == (6, 4, 8, 8) and z["uint8"].shape == (6, 32, 32, 3) and "images" not in z
        latents, u8 = torch.from_numpy(z["latents"]), torch.from_numpy(z["uint8"])
    codec = build_dataset("latents", root=tmp_path / "lat").latents
    torch.testing.assert_close(u8, to_uint8(codec.decode(latents.double())).permute(0, 2, 3, 1), atol=1, rtol=0)
    assert json.loads((tmp_path / "s" / "sample.json").read_text())["nfe"] == 4  # guidance 1.5 from training
    proc = launch(
        tmp_path,
        "--config-name",
        "evaluate",
        "ckpt=run",
        "eval.feature_net=toynets:TinyRandomFeatures",
        "eval.n_samples=10",
        "eval.steps=[1,2]",
        f"eval.fid_cache={tmp_path / 'fid'}",
        f"out={tmp_path / 'e'}",
        check=True,
    )
    results = json.loads((tmp_path / "e" / "results.json").read_text())["results"]
    assert set(results) == {
        "evaluate/fid10_1step_w1.5",
        "evaluate/fid10_2step_w1.5",
        "evaluate/nfe_1step_w1.5",
        "evaluate/nfe_2step_w1.5",
    }
    assert all(np.isfinite(v) and v > 0 for k, v in results.items() if "fid" in k)
    assert "nfe w=1.5" in proc.stdout and (tmp_path / "e" / "steps.png").is_file()
    (cache,) = (tmp_path / "fid").glob("*.pt")
    assert cache.name.startswith("folder-3x32x32-n=16-")  # the reference set: the 16 encoded images at 32x32
