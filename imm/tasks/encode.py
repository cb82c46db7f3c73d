"""`python launch.py --config-name encode data=... out=DIR`: an image dataset as VAE latents for data=latents.

Every image of `data` (at data.resolution, unflipped; with data.hflip=true also flipped) goes through
the VAE's encoder (`vae`: a hub id or a local folder; the paper's by default) and its raw posterior mean
is stored (imm.data.vae). The output, described in imm.data.latents: shards of `shard_size` latents and
labels, and manifest.json (VAE id and weight hash, resolution, source, counts, complete shards, the
latents' per-channel mean and std). A shard is written to temporary files, renamed, and only then entered
in the manifest, so a killed encode leaves complete shards; the same command continues after the last one.
Batches never straddle shards, so a resumed encode writes the bytes an uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from imm import factory
from imm.data import latents as latents_mod
from imm.data import vae as vae_mod
from imm.diskspace import DiskFullError, human, writing
from imm.errors import ConfigError
from imm.ranges import check_values
from imm.tasks.common import check_choices
from imm.validation import IMAGE_DATA, not_allowed

log = logging.getLogger("imm.encode")
DTYPES = ("float32", "float16")
# what must be the same for an encode to continue another one in the same folder
SAME_ENCODE = ("vae_sha256", "resolution", "latent_shape", "dtype", "hflip", "shard_size", "count", "source")


def _validate(cfg) -> None:
    check_values(cfg)
    if OmegaConf.is_missing(cfg, "out") or not str(cfg.out).strip():
        raise ConfigError("out is missing; set out=/path/to/latents (the folder data=latents reads as data.root).")
    if Path(cfg.out).expanduser().exists() and not Path(cfg.out).expanduser().is_dir():
        raise ConfigError(f"out={cfg.out} is a file; set out to a folder (new, or an encode to continue).")
    check_choices([("dtype", cfg.dtype, DTYPES)])
    if cfg.data.name not in IMAGE_DATA or cfg.data.name == "latents":
        raise not_allowed("data", cfg.data.name, [n for n in IMAGE_DATA if n != "latents"])


class _Images(torch.utils.data.Dataset):
    """(image, label) of the source, unflipped (the encode makes the flipped copies itself)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset.get(index, False)


def _plan(cfg, bundle, vae, vae_name: str) -> dict:
    """The manifest of this encode before any shard is written."""
    channels, resolution = bundle.shape[0], bundle.shape[-1]
    factor, latent_channels = vae_mod.downsampling(vae), vae.config.latent_channels
    if resolution % factor:
        raise ConfigError(
            f"data.resolution={resolution} must be divisible by the VAE's downsampling factor {factor}; use e.g."
            f" data.resolution={max(factor, resolution - resolution % factor)}."
        )
    if channels not in (1, vae.config.in_channels):
        raise ConfigError(f"data.name={cfg.data.name!r} has {channels}-channel images; the VAE takes 1 or 3.")
    n, d = len(bundle.train), cfg.data
    root = None if d.root is None else str(Path(d.root).expanduser().resolve())
    return {
        "format": latents_mod.FORMAT,
        "vae": vae_name,
        "vae_sha256": vae_mod.fingerprint(vae),
        "latents": "raw posterior mean of vae.encode (the VAE's scaling_factor not applied)",
        "resolution": resolution,
        "latent_shape": [latent_channels, resolution // factor, resolution // factor],
        "dtype": cfg.dtype,
        "hflip": bool(d.hflip),
        "shard_size": int(cfg.shard_size),
        "count": n,
        "n_shards": math.ceil(n / cfg.shard_size),
        "num_classes": bundle.num_classes,
        "classes": list(getattr(bundle.train, "classes", [])),
        # what rebuilds the images (the FID reference), as build_dataset's options
        "source": {
            "name": d.name,
            "root": root,
            "resolution": resolution,
            "class_subfolders": d.class_subfolders,
            "shape": list(bundle.shape),
            "count": n,
        },
        "shards": [],
        "stats": {"count": 0, "mean": None, "m2": None},
        "complete": False,
    }


def _continue(out: Path, plan: dict) -> dict:
    """The manifest to carry on from: a new one, or the unfinished (or finished) encode already in `out`."""
    if not (out / latents_mod.MANIFEST).is_file():
        return plan
    old = latents_mod.read_manifest(out)
    for key in SAME_ENCODE:
        if old.get(key) != plan[key]:
            raise ConfigError(
                f"out={str(out)!r} holds another encode ({key} was {old.get(key)!r}, now {plan[key]!r}); use"
                " another out= folder, or delete this one to encode again."
            )
    return old


def run(cfg) -> dict:
    """Encode according to `cfg` (conf/encode.yaml); returns the manifest."""
    _validate(cfg)
    out = Path(cfg.out).expanduser()
    device = factory.device(cfg.device, key="device")
    bundle = factory.dataset(cfg)  # the source images (cfg.data)
    vae = vae_mod.load(cfg.vae, key="vae", device=device)
    manifest = _continue(out, _plan(cfg, bundle, vae, vae_mod.location(cfg.vae)))
    if manifest["complete"]:
        log.info("%s already holds this encode, complete (%d images); nothing to do", out, manifest["count"])
        return manifest
    with writing(out):  # a read-only file system: DiskFullError
        out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.tmp*"):  # what a killed encode was writing (never in the manifest)
        stale.unlink()
    n, size, first = manifest["count"], manifest["shard_size"], len(manifest["shards"])
    log.info(
        "encoding %d %s images (%dx%d%s) with the VAE %s into %s: latents %s, %d shards of %d%s",
        n,
        cfg.data.name,
        manifest["resolution"],
        manifest["resolution"],
        ", and their mirror images" if manifest["hflip"] else "",
        cfg.vae,
        out,
        manifest["latent_shape"],
        manifest["n_shards"],
        size,
        f"; continuing after shard {first}" if first else "",
    )
    _encode_shards(out, manifest, bundle, vae, cfg)
    stats = manifest["stats"]
    manifest["mean"] = stats["mean"]
    manifest["std"] = [math.sqrt(m2 / stats["count"]) for m2 in stats["m2"]]
    manifest["complete"] = True
    latents_mod.write_manifest(out, manifest)
    log.info(
        "encoded %d images into %s; the raw latents' channel mean %s and std %s; train on them with:"
        " python launch.py data=latents data.root=%s",
        n,
        out,
        [round(v, 5) for v in manifest["mean"]],
        [round(v, 5) for v in manifest["std"]],
        out,
    )
    return manifest


def _encode_shards(out: Path, manifest: dict, bundle, vae, cfg) -> None:
    """Every shard the manifest does not list yet, in order, batches of cfg.batch_size within each shard."""
    n, size, first = manifest["count"], manifest["shard_size"], len(manifest["shards"])
    shards = [range(k * size, min((k + 1) * size, n)) for k in range(first, manifest["n_shards"])]
    batches = [list(r[i : i + cfg.batch_size]) for r in shards for i in range(0, len(r), cfg.batch_size)]
    loader = torch.utils.data.DataLoader(_Images(bundle.train), batch_sampler=batches, num_workers=cfg.data.num_workers)
    from tqdm import tqdm

    bar = tqdm(total=n, initial=first * size, unit="img", desc="encode", disable=not sys.stderr.isatty())
    pending, t0, k = {"latents": [], "flipped": [], "labels": []}, time.perf_counter(), first
    for images, labels in loader:
        if images.shape[1] == 1:  # grey images: the VAE takes RGB
            images = images.expand(-1, 3, -1, -1)
        pending["latents"].append(vae_mod.encode(vae, images).cpu().numpy())
        if manifest["hflip"]:
            pending["flipped"].append(vae_mod.encode(vae, images.flip(-1)).cpu().numpy())
        pending["labels"].append(labels.numpy().astype(np.int64) if bundle.num_classes else np.full(len(labels), -1))
        bar.update(len(images))
        if sum(len(b) for b in pending["labels"]) == len(shards[k - first]):
            _write_shard(out, manifest, k, pending)
            pending = {key: [] for key in pending}
            k += 1
            _progress(bar, k, manifest, time.perf_counter() - t0, first * size)
    bar.close()


def _write_shard(out: Path, manifest: dict, k: int, pending: dict) -> None:
    """Shard k's files (each written to a temporary name, then renamed), then its entry in the manifest."""
    names = latents_mod.shard_files(k)
    arrays = {key: np.concatenate(pending[key]) for key in pending if pending[key]}
    arrays = {key: a.astype(manifest["dtype"]) if key != "labels" else a for key, a in arrays.items()}
    try:
        for key, array in arrays.items():
            tmp = out / f"{names[key]}.{os.getpid()}.tmp.npy"
            with writing(out / names[key], needed=array.nbytes + 128, partial=tmp):  # 128: the .npy header
                np.save(tmp, array)
                os.replace(tmp, out / names[key])
        manifest["stats"] = latents_mod.merge_channel_stats(manifest["stats"], arrays["latents"])
        manifest["shards"].append({**{key: names[key] for key in arrays}, "count": len(arrays["labels"])})
        latents_mod.write_manifest(out, manifest)
    except DiskFullError as e:  # the manifest on disk still lists the shards before k: the same command redoes k
        for name in names.values():  # shard k's files written so far: never read (not in the manifest), space back
            (out / name).unlink(missing_ok=True)
        rest = (manifest["n_shards"] - k) * sum(a.nbytes + 128 for a in arrays.values())
        raise e.then(
            f"{k} of the {manifest['n_shards']} shards are complete (the others need about {human(rest)} more);"
            f" {e.fix()}, then run the same command again: it continues with shard {k}"
        ) from None


def _progress(bar, k: int, manifest: dict, seconds: float, done0: int) -> None:
    """A line per shard when there is no progress bar (a batch job's log)."""
    if not bar.disable:
        return
    done = min(k * manifest["shard_size"], manifest["count"])
    rate = (done - done0) / max(seconds, 1e-9)
    log.info(
        "shard %d/%d: %d/%d images, %.1f images/s, ETA %s",
        k,
        manifest["n_shards"],
        done,
        manifest["count"],
        rate,
        bar.format_interval((manifest["count"] - done) / max(rate, 1e-9)),
    )
