"""`python launch.py --config-name import src=FILE out=DIR`: a released IMM checkpoint as a run directory of ours.

Reads FILE with imm.official.reader (nothing from it runs: the embedded module sources are hashed, other
globals are inert stubs), finds the network and the method with imm.official.convert (each setting of the
import config that is not null replaces what the file says), composes the run's training config from conf/
(the paper's preset of a released model, or none; our arch and schedule keys set to what was found;
arch.time_features and schedule.numerics as the official forward pass), validates it, and writes DIR:

- snapshots/snapshot-00000000.pt: the weights as an EMA snapshot (step 0) with the shape, the classes and the
  config, so `sample`, `evaluate` and training's `init=` read DIR like any run's;
- .hydra/config.yaml: the run's config (what `--cfg job` would print for it);
- import.json: the source file (path, sha256, size, format), the official settings and where each value
  came from (the file, IMMPrecond's default, an override), what was inferred, the config overrides, the
  embedded sources' hashes and the globals the file named (never imported).

It prints what it found. Bad input (not a checkpoint, truncated, an unknown network class, a shape that fits no
network we have, a DIR that already holds a run) is one sentence before anything is written.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from imm import factory
from imm.core.parameterization import NUMERICS
from imm.data.vae import PAPER_VAE
from imm.diskspace import replacing, writing
from imm.errors import CheckpointError, ConfigError
from imm.nets import TIME_FEATURES
from imm.official import convert, reader
from imm.ranges import check_values
from imm.training import checkpoint
from imm.validation import not_allowed, validate

log = logging.getLogger("imm.import")

CONF = Path(__file__).resolve().parents[2] / "conf"
RECORD = "import.json"
# The paper's presets of the released models: (arch, shape, classes, param, second_time) -> experiment
RELEASED = {
    ("ddpmpp", (3, 32, 32), 0, "simple_edm", "s"): "cifar10_paper",
    ("dit_xl_2", (4, 32, 32), 1000, "euler_fm", "s"): "imagenet256_paper",
    ("dit_xl_2", (4, 32, 32), 1000, "euler_fm", "stride"): "imagenet256_paper_a2",
}
OVERRIDABLE = (*convert.METHOD_KEYS, "num_heads")


def _validate(cfg) -> None:
    for key in ("src", "out"):
        if OmegaConf.is_missing(cfg, key) or not str(cfg[key]).strip():
            example = "src=imagenet256_ts_a2.pkl" if key == "src" else "out=runs/official/imagenet256_ts_a2"
            raise ConfigError(
                f"{key} is missing; give the official checkpoint and the run directory to write, e.g. {example}."
            )
    check_values(cfg)
    if cfg.time_features not in TIME_FEATURES:
        raise not_allowed("time_features", cfg.time_features, TIME_FEATURES)
    if cfg.numerics not in NUMERICS:
        raise not_allowed("numerics", cfg.numerics, NUMERICS)
    out = Path(cfg.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is a file" if not out.is_dir() else "is not empty"
        raise ConfigError(f"out={cfg.out} {what}; give a new directory for the imported run (or remove it).")


def _data_option(found: convert.Converted, cfg) -> str:
    if cfg.dataset:
        return cfg.dataset
    channels, side, _ = found.shape
    if channels == 4:
        return "latents"
    return "cifar10" if (channels, side) == (3, 32) else "folder"


def run_overrides(found: convert.Converted, cfg) -> list[str]:
    """The overrides of conf/config.yaml that give the run's training config: the preset, our arch and schedule
    keys as found, arch.time_features and schedule.numerics, then the import's own `overrides`."""
    arch, method = found.arch, found.method
    key = (
        arch["name"],
        tuple(found.shape),
        found.num_classes,
        method["schedule.param"],
        method["schedule.second_time"],
    )
    experiment = cfg.preset or RELEASED.get(key)
    out = [f"experiment={experiment}"] if experiment else ["~experiment"]
    out.append(f"arch={arch['name']}")
    out += [f"arch.{k}={_value(v)}" for k, v in arch.items() if k != "name"]
    data = _data_option(found, cfg)
    if not experiment or cfg.dataset:
        out.append(f"data={data}")
    if found.num_classes == 0 and data not in ("folder", "latents"):
        out.append("data.use_labels=false")
    if data == "folder" and not experiment:
        out.append(f"data.resolution={found.shape[1]}")
    out += [f"{k}={_value(v)}" for k, v in method.items()]
    out.append(f"schedule.numerics={cfg.numerics}")
    if found.num_classes == 0:
        out.append("eval.guidance=1")
    return out + [str(o) for o in cfg.overrides]


def _value(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    return repr(v) if isinstance(v, float) else str(v)


def compose_run_config(overrides: list[str]):
    """conf/config.yaml composed with `overrides` (inside launch.py's Hydra, or on its own: a test)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    try:
        if GlobalHydra.instance().is_initialized():
            return compose("config", overrides=overrides)
        with initialize_config_dir(config_dir=str(CONF), version_base=None):
            return compose("config", overrides=overrides)
    except Exception as e:  # noqa: BLE001  Hydra's composition errors: a bad experiment, data or override
        first = str(e).splitlines()[0].rstrip(".") if str(e) else type(e).__name__
        raise ConfigError(
            f"the imported run's config cannot be composed ({first}); check preset, dataset and overrides."
        ) from None


def _latents_state(run_cfg) -> dict:
    """The codec of an imported latent-space model: the official encoder's VAE and channel statistics (the run
    config's data.latent_mean/std: the official ImageNet config's raw_mean/raw_std), final std 0.5; the VAE's
    weight hash and the encoded images are unknown (the FID reference then comes from eval.fid_ref)."""
    d = run_cfg.data
    mean = list(d.latent_mean) if d.latent_mean is not None else None
    std = list(d.latent_std) if d.latent_std is not None else None
    if mean is None or std is None:
        raise ConfigError(
            "an imported latent-space model needs the channel statistics its latents were normalised with; set"
            " overrides=[data.latent_mean=[...],data.latent_std=[...]] (or preset=imagenet256_paper)."
        )
    return {
        "vae": d.vae or PAPER_VAE,
        "vae_sha256": None,
        "mean": mean,
        "std": std,
        "source": {
            "name": "folder",
            "root": None,
            "resolution": d.resolution,
            "class_subfolders": True,
            "shape": [3, d.resolution, d.resolution] if d.resolution else None,
            "count": None,
        },
        "scale": 0.5,
    }


def run(cfg, *, launch_dir=None) -> dict:
    """Import according to `cfg` (conf/import.yaml); returns what import.json records."""
    _validate(cfg)
    t0 = time.perf_counter()
    src = Path(cfg.src).expanduser()
    ckpt = reader.read(src)
    overrides = {k: cfg[k] for k in OVERRIDABLE if cfg[k] is not None}
    if cfg.time_features != "float64":  # what the import sets by default: the official DiT's and SongUNet's
        overrides["time_features"] = cfg.time_features
    found = convert.convert(ckpt, entry=cfg.entry, overrides=overrides)
    run_cfg = compose_run_config(run_overrides(found, cfg))
    try:
        # where the data live is for a later training or a reference set (data.root: a resumable key), not the import
        check = run_cfg.copy()
        check.data.root = check.data.root or "data.root"
        validate(check)
        with torch.device("meta"):  # the run's config builds the file's network (no memory on the meta device)
            ours = factory.net(run_cfg, found.shape, found.num_classes).state_dict()
    except ConfigError as e:
        raise ConfigError(f"the imported run's config does not hold: {e}") from None
    if list(ours) != list(found.weights) or any(ours[k].shape != found.weights[k].shape for k in ours):
        raise CheckpointError(f"{src}: the run's config builds another network than the file's; check overrides.")
    latents = _latents_state(run_cfg) if run_cfg.data.name == "latents" else None

    out = Path(cfg.out).expanduser()
    config_text = OmegaConf.to_yaml(run_cfg)
    record = {
        "src": str(src.resolve()),
        "sha256": ckpt.sha256,
        "size": ckpt.size,
        "format": ckpt.format,
        "entry": cfg.entry,
        "network_class": found.network_class,
        "official": {k: _plain(v) for k, v in found.official.items()},
        "sources": found.sources,
        "arch": found.arch,
        "shape": list(found.shape),
        "num_classes": found.num_classes,
        "parameters": sum(v.numel() for v in found.weights.values()),
        "method": found.method,
        "numerics": cfg.numerics,
        "notes": found.notes,
        "run_overrides": run_overrides(found, cfg),
        "module_sources_sha256": ckpt.sources,
        "globals_not_imported": ckpt.stubs,
    }
    snapshot = {
        "kind": checkpoint.SNAPSHOT,
        "ema": {
            "initted": torch.tensor(True),
            "step": torch.tensor(0),
            **{f"ema_model.{k}": v for k, v in found.weights.items()},
        },
        "step": 0,
        "config": config_text,
        "mlflow_run_id": None,
        "shape": list(found.shape),
        "num_classes": found.num_classes,
        "standardizer": None,
        "latents": latents,
        "official": {k: record[k] for k in ("src", "sha256", "format", "network_class")},
    }
    with writing(out):
        (out / ".hydra").mkdir(parents=True, exist_ok=True)
    path = checkpoint.save_snapshot(snapshot, out, 0)
    with replacing(out / ".hydra" / "config.yaml") as tmp:
        tmp.write_text(config_text)
    record["seconds"] = round(time.perf_counter() - t0, 2)
    record["snapshot"] = str(path.resolve())
    with replacing(out / RECORD) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    print(summary(record, out), flush=True)
    return record


def _plain(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return str(v)


def summary(record: dict, out: Path) -> str:
    """What the import found, as the lines it prints."""
    arch, m = record["arch"], record["method"]
    fields = ", ".join(f"{k} {_value(v)}" for k, v in arch.items() if k not in ("name", "time_features"))
    classes = f"{record['num_classes']} classes" if record["num_classes"] else "unconditional"
    overridden = [k for k, v in record["sources"].items() if v == "override"]
    second = {"s": "s", "stride": "t - s (stride)"}[m["schedule.second_time"]]
    lines = [
        f"imported {record['src']} ({record['format']}, {record['size'] / 1e6:.1f} MB, sha256 {record['sha256'][:16]})"
        f" in {record['seconds']:.1f} s; nothing from it was run",
        f"  network     {record['network_class']} -> arch={arch['name']} ({fields}), {record['parameters']:,}"
        f" parameters, samples {'x'.join(map(str, record['shape']))}, {classes}",
        f"  method      {m['schedule.param']} on {m['schedule.name']}, second time input {second}, T {m['loss.T']:g},"
        f" eps {m['loss.eps']:g}, sigma_data {m['schedule.sigma_data']:g}, time_scale {m['schedule.time_scale']:g}"
        + (f" (overridden: {', '.join(overridden)})" if overridden else " (from the file)"),
        f"  numerics    arch.time_features={arch['time_features']}, schedule.numerics={record['numerics']}",
        f"  run config  {' '.join(record['run_overrides'][:2])} ...",
    ]
    lines += [f"  note        {n}" for n in record["notes"]]
    lines += [
        f"  run dir     {out} (snapshots/snapshot-00000000.pt, .hydra/config.yaml, {RECORD})",
        f"  sample      python launch.py --config-name sample ckpt={out}",
    ]
    return "\n".join(lines)
