"""An official IMM network, as imm.official.reader records it, in this project's terms: which of our networks it
is (sizes read from the tensors' shapes and the recorded attributes), how it was sampled (parameterization,
second time input, schedule, T, eps, sigma_data, time_scale), and its weights under our names.

The name maps (lumalabs/imm training/dit.py and training/unets.py against imm/nets/):

DiT (`DiT`, `DiT_XL_2`, ...; timm's PatchEmbed, Attention, Mlp)
    x_embedder.proj, t_embedder.mlp, s_embedder.mlp, blocks.N.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2,
    adaLN_modulation.1}, final_layer.{linear, adaLN_modulation.1}: the same names.
    y_embedder.embedding_table -> y_embedder.table: rows 0..label_dim, the last of them the null class the
    official sampler selects for an all-zero label (its argmax over [one-hot, 1 - sum]); rows past it (a
    table built with label dropout) are dropped.
    pos_embed: not a weight here (our DiT forms the same fixed sin-cos table); the file's is checked against
    ours (within 1e-6) and the import refused when it differs.
    No s_embedder (s_embed=False): ours gets zero weights, so its s path adds exactly zero.
SongUNet (EDM's DDPM++)
    map_layer0/1, map_layer0_s/1_s, enc.*, dec.* (blocks: norm0, conv0, affine, norm1, conv1, skip, norm2, qkv,
    proj): the same names. dec.<R>x<R>_aux_norm -> out_norm and dec.<R>x<R>_aux_conv -> out_conv (the
    'standard' decoder's output layers). map_label (a Linear on one-hot labels scaled by sqrt(label_dim)) ->
    map_label (our table): row c = W[:, c] sqrt(label_dim) + b, the null row b. The resample filter buffers of
    the up/down convolutions are not weights here; they are checked to be the [1, 1] filter ours uses.
    map_augment (EDM's augmentation labels; sampling passes none, so it adds nothing) is dropped.

Anything else (another network class, options our nets do not have: qk_norm, Fourier time embedding, a skip or
residual U-Net encoder, ...) is CheckpointError, one sentence.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from imm import nets
from imm.errors import CheckpointError
from imm.nets.dit import DIT_PRESETS, sincos_pos_embed_2d
from imm.official.reader import Checkpoint, Persistent, attributes, class_name, module_tensors, submodules

# IMMPrecond's constructor defaults (lumalabs/imm training/preconds.py), for a file that lacks an attribute.
PRECOND_DEFAULTS = dict(
    noise_schedule="fm", sigma_data=0.5, f_type="euler_fm", T=0.994, eps=0.0, temb_type="identity", time_scale=1000.0
)
SCHEDULES = {"fm": "fm", "vp_cosine": "cosine"}  # noise_schedule -> schedule.name
PARAMS = {"euler_fm": "euler_fm", "simple_edm": "simple_edm", "identity": "identity"}  # f_type -> schedule.param
SECOND_TIME = {"identity": "s", "stride": "stride"}  # temb_type -> schedule.second_time
DIT_CLASS = re.compile(r"^DiT(_(S|B|L|XL)_\d+)?$")
POS_EMBED_TOL = 1e-6

# What an import may set against what the file says (the import command's keys), and the config key each feeds.
METHOD_KEYS = {
    "noise_schedule": "schedule.name",
    "param": "schedule.param",
    "second_time": "schedule.second_time",
    "sigma_data": "schedule.sigma_data",
    "time_scale": "schedule.time_scale",
    "T": "loss.T",
    "eps": "loss.eps",
}


@dataclass
class Converted:
    """An official network in our terms: `arch` (our arch node: name and fields), the sample shape (C, H, W), the
    number of classes, `method` (config key -> value: schedule.*, loss.T, loss.eps), our net's weights, the
    official settings as the file records them and where each value came from (`sources`)."""

    network_class: str
    arch: dict
    shape: tuple[int, int, int]
    num_classes: int
    method: dict
    weights: dict[str, torch.Tensor]
    official: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)  # key -> "file" | "default" | "override"
    notes: list[str] = field(default_factory=list)

    def build(self, device="meta") -> torch.nn.Module:
        """Our network of these sizes (on the meta device: no memory)."""
        fields = {k: v for k, v in self.arch.items() if k != "name"}
        with torch.device(device):
            return nets.build(self.arch["name"], self.shape, self.num_classes, 0, **fields)


def _fail(path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}.")


def network(ckpt: Checkpoint, entry: str = "ema"):
    """The IMMPrecond record under `entry` of the file's dict."""
    obj = ckpt.obj
    if not isinstance(obj, dict):
        raise _fail(
            ckpt.path,
            f"it holds a {class_name(obj)}, not the dict {{'{entry}': network, ...}} of an official checkpoint",
        )
    if entry not in obj:
        keys = ", ".join(map(repr, obj)) or "nothing"
        raise _fail(ckpt.path, f"it has no {entry!r} entry (it holds {keys}); name the network's entry with entry=KEY")
    precond = obj[entry]
    if not isinstance(precond, Persistent) or "model" not in submodules(precond):
        raise _fail(
            ckpt.path,
            f"its {entry!r} entry is a {class_name(precond)}, not an official IMM network (an EDM persistent"
            " IMMPrecond with a `model`)",
        )
    return precond


def convert(ckpt: Checkpoint, entry: str = "ema", overrides: dict | None = None) -> Converted:
    """What the official network under `entry` is, in our terms; `overrides`: import keys (METHOD_KEYS, num_heads,
    time_features, num_classes) that replace what the file says. A network we cannot hold: CheckpointError."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    precond = network(ckpt, entry)
    attrs = attributes(precond)
    init = attrs.get("_init_kwargs") if isinstance(attrs.get("_init_kwargs"), dict) else {}
    official, sources = {}, {}
    for key, default in PRECOND_DEFAULTS.items():
        if key in attrs:
            official[key], sources[key] = attrs[key], "file"
        elif key in init:
            official[key], sources[key] = init[key], "file (constructor arguments)"
        else:
            official[key], sources[key] = default, "IMMPrecond's default"
    for key in ("img_resolution", "img_channels", "label_dim", "mixed_precision"):
        official[key] = attrs.get(key, init.get(key))
    official["model_type"] = init.get("model_type")
    model = submodules(precond)["model"]
    official["network_class"] = class_name(model)

    method = _method(ckpt.path, official, sources)
    tensors = module_tensors(model)
    label_dim = int(official["label_dim"] or 0)
    if "num_classes" in overrides:
        label_dim = int(overrides.pop("num_classes"))
        sources["label_dim"] = "override"
    name = class_name(model)
    if DIT_CLASS.match(name):
        found = _dit(ckpt.path, model, tensors, label_dim, overrides.pop("num_heads", None))
    elif name == "SongUNet":
        found = _songunet(ckpt.path, model, tensors, label_dim)
    else:
        raise _fail(
            ckpt.path,
            f"its network class {name!r} is not one this project has (DiT, DiT_<size>_<patch>, or SongUNet: DDPM++)",
        )
    found.network_class, found.method, found.official = name, method, official
    for key, value in overrides.items():  # METHOD_KEYS and time_features
        if key == "time_features":
            found.arch["time_features"] = value
        elif key in METHOD_KEYS:
            found.method[METHOD_KEYS[key]] = value
        else:
            raise CheckpointError(f"{key} is not a setting an import can override.")
        sources[key] = "override"
    found.sources = sources
    mp = official.get("mixed_precision")
    if mp is not None and mp is not torch.float32:
        found.notes.append(f"the official network ran under {mp} autocast on CUDA; here it runs in float32")
    _check_fits(ckpt.path, found)
    return found


def _method(path, official: dict, sources: dict) -> dict:
    def choose(key, table, what):
        value = official[key]
        if value not in table:
            raise _fail(path, f"its {key}={value!r} is not a {what} this project has ({', '.join(table)})")
        return table[value]

    method = {
        "schedule.name": choose("noise_schedule", SCHEDULES, "noise schedule"),
        "schedule.param": choose("f_type", PARAMS, "parameterization (f_type)"),
        "schedule.second_time": choose("temb_type", SECOND_TIME, "second time input (temb_type)"),
    }
    for key, config_key in (("sigma_data", "schedule.sigma_data"), ("time_scale", "schedule.time_scale")):
        method[config_key] = _number(path, key, official[key])
    method["loss.T"] = _number(path, "T", official["T"])
    method["loss.eps"] = _number(path, "eps", official["eps"])
    return method


def _number(path, key: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise _fail(path, f"its {key}={value!r} is not a number") from None
    if not math.isfinite(value):
        raise _fail(path, f"its {key}={value} is not finite")
    return value


def _shape(tensors: dict, key: str, path) -> tuple:
    if key not in tensors:
        raise _fail(path, f"it has no tensor {key!r}, which every network of its class has")
    return tuple(tensors[key].shape)


# -- DiT ---------------------------------------------------------------------------------------------------
def _dit(path, model, tensors: dict, label_dim: int, num_heads) -> Converted:
    mods = submodules(model)
    hidden, channels, p, p2 = _shape(tensors, "x_embedder.proj.weight", path)
    depth = len(submodules(mods.get("blocks")))
    if depth == 0:
        raise _fail(path, "its DiT has no blocks")
    block0 = submodules(mods["blocks"])["0"]
    attn = attributes(submodules(block0).get("attn"))
    unsupported = {
        "qk_norm": any(".attn.q_norm." in k or ".attn.k_norm." in k for k in tensors),
        "skip connections (skip=True)": any(".skip_linear." in k for k in tensors),
        "a Fourier time embedding": "t_embedder.freqs" in tensors,
        "time embeddings without an MLP": "t_embedder.mlp.0.weight" not in tensors,
    }
    for what, present in unsupported.items():
        if present:
            raise _fail(path, f"its DiT uses {what}, which our DiT does not have")
    freq = _shape(tensors, "t_embedder.mlp.0.weight", path)
    if freq != (hidden, 256):
        raise _fail(
            path,
            f"its DiT's time embedding takes {freq[1]} features to width {freq[0]}; ours takes 256 to the width"
            f" {hidden} (temb_mult=1)",
        )
    if num_heads is None:
        num_heads = attn.get("num_heads")
        if not isinstance(num_heads, int):
            raise _fail(path, "it does not record its DiT's number of attention heads; give num_heads=N")
    mlp_hidden = _shape(tensors, "blocks.0.mlp.fc1.weight", path)[0]
    patch = attributes(mods.get("x_embedder"))
    resolution = patch.get("img_size", (None,))[0] if isinstance(patch.get("img_size"), tuple) else None
    grid = int(round(math.sqrt(_shape(tensors, "pos_embed", path)[1]))) if "pos_embed" in tensors else None
    resolution = resolution or (grid * p if grid else None)
    if not resolution:
        raise _fail(path, "it does not record its DiT's input resolution")
    if label_dim < 1:
        raise _fail(path, "its DiT is unconditional (label_dim=0), which the official DiT cannot sample")
    table = _shape(tensors, "y_embedder.embedding_table.weight", path)
    if table[0] < label_dim + 1:
        raise _fail(
            path,
            f"its label table has {table[0]} rows, too few for {label_dim} classes and the null class"
            f" (row {label_dim})",
        )
    drop = submodules(submodules(block0).get("mlp")).get("drop1")
    dropout = float(attributes(drop).get("p", 0.0) or 0.0)

    preset = next(
        (
            n
            for n, c in DIT_PRESETS.items()
            if c == dict(hidden_size=hidden, depth=depth, num_heads=num_heads, patch_size=p)
        ),
        f"dit_s_{p}" if f"dit_s_{p}" in DIT_PRESETS else "dit_s_2",
    )
    arch = dict(
        name=preset,
        hidden_size=hidden,
        depth=depth,
        num_heads=int(num_heads),
        patch_size=p,
        mlp_ratio=mlp_hidden / hidden,
        dropout=dropout,
        time_features="float64",
    )
    notes = []
    weights = {}
    for key, value in tensors.items():
        if key == "pos_embed":
            continue
        if key.startswith("y_embedder.embedding_table."):
            weights["y_embedder.table.weight"] = value[: label_dim + 1]
            if table[0] > label_dim + 1:
                notes.append(f"label table rows {label_dim + 1}..{table[0] - 1} (label dropout's) dropped")
            continue
        weights[key] = value
    if "s_embedder.mlp.0.weight" not in tensors:  # s_embed=False: an s path that adds exactly zero
        for k in ("mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"):
            weights[f"s_embedder.{k}"] = torch.zeros_like(tensors[f"t_embedder.{k}"])
        notes.append("no s embedder (s_embed=False): ours is zeroed, so the second time input adds nothing")
    if "pos_embed" in tensors:
        ours = sincos_pos_embed_2d(hidden, resolution // p)
        theirs = tensors["pos_embed"].reshape(ours.shape).float()
        diff = float((theirs - ours).abs().max())
        if diff > POS_EMBED_TOL:
            raise _fail(
                path,
                f"its pos_embed is not the fixed sin-cos table our DiT uses (max difference {diff:.3g})",
            )
    if dropout:
        notes.append(f"dropout {dropout:g} (the official DiT drops in its MLP only; ours also after attention)")
    return Converted(
        network_class="",
        arch=arch,
        shape=(channels, resolution, resolution),
        num_classes=label_dim,
        method={},
        weights=weights,
        notes=notes,
    )


# -- SongUNet (DDPM++) ---------------------------------------------------------------------------------------
LEVEL_KEY = re.compile(r"^(\d+)x(\d+)_(.+)$")


def _songunet(path, model, tensors: dict, label_dim: int) -> Converted:
    mods = submodules(model)
    enc, dec = submodules(mods.get("enc")), submodules(mods.get("dec"))
    if not enc or not dec:
        raise _fail(path, "its SongUNet has no encoder or decoder")
    aux = [k for k in enc if "_aux_" in k] + [k for k in dec if "_aux_up" in k]
    if aux:
        raise _fail(
            path, f"its SongUNet uses a skip or residual encoder/decoder ({aux[0]}), which our DDPM++ does not have"
        )
    if "map_noise.freqs" in tensors:
        raise _fail(path, "its SongUNet uses a Fourier time embedding (NCSN++), which our DDPM++ does not have")
    resolutions = sorted({int(m.group(1)) for k in enc if (m := LEVEL_KEY.match(k))}, reverse=True)
    res0 = resolutions[0]
    conv = f"enc.{res0}x{res0}_conv.weight"
    model_channels, channels = _shape(tensors, conv, path)[:2]
    num_blocks = sum(1 for k in enc if re.fullmatch(rf"{res0}x{res0}_block\d+", k))
    channel_mult, attn = [], []
    for res in resolutions:
        out = _shape(tensors, f"enc.{res}x{res}_block0.conv0.weight", path)[0]
        if out % model_channels:
            raise _fail(path, f"its level {res}x{res} has {out} channels, not a multiple of {model_channels}")
        channel_mult.append(out // model_channels)
        if f"enc.{res}x{res}_block0.qkv.weight" in tensors:
            attn.append(res)
    emb, noise = _shape(tensors, "map_layer0.weight", path)
    if (emb, noise) != (4 * model_channels, model_channels):
        raise _fail(
            path,
            f"its mapping network is {noise} -> {emb} wide; our DDPM++ takes {model_channels} -> {4 * model_channels}"
            " (channel_mult_noise=1, channel_mult_emb=4)",
        )
    affine = _shape(tensors, f"enc.{res0}x{res0}_block0.affine.weight", path)[0]
    if affine != model_channels * channel_mult[0]:
        raise _fail(path, "its U-Net blocks use adaptive scale (ADM style), which our DDPM++ does not use")
    block = enc.get(f"{res0}x{res0}_block0")
    dropout = float(attributes(block).get("dropout", 0.0) or 0.0)
    ours = torch.full((1, 1, 2, 2), 0.25)
    notes, weights = [], {}
    out_prefix = f"dec.{res0}x{res0}_aux_"
    for key, value in tensors.items():
        if key.endswith(".resample_filter"):
            if value.shape != ours.shape or not torch.allclose(value.float(), ours):
                raise _fail(path, f"its resample filter {key} is not the [1, 1] filter our DDPM++ uses")
            continue
        if key.startswith("map_augment."):
            notes.append("map_augment (EDM augmentation labels) dropped: sampling passes none")
            continue
        if key.startswith("map_label."):
            continue
        if key.startswith(out_prefix + "norm."):
            key = "out_norm." + key[len(out_prefix + "norm.") :]
        elif key.startswith(out_prefix + "conv."):
            key = "out_conv." + key[len(out_prefix + "conv.") :]
        weights[key] = value
    if label_dim:
        w, b = tensors.get("map_label.weight"), tensors.get("map_label.bias")
        if w is None or tuple(w.shape) != (model_channels, label_dim):
            raise _fail(path, f"its label layer does not take {label_dim} classes to {model_channels} channels")
        b = torch.zeros(model_channels, dtype=w.dtype) if b is None else b
        rows = w.t().to(torch.float64) * math.sqrt(label_dim) + b.to(torch.float64)
        weights["map_label.weight"] = torch.cat([rows, b.to(torch.float64)[None]]).to(w.dtype)
    if "map_layer0_s.weight" not in tensors:  # s_embed=False
        for k in ("map_layer0_s", "map_layer1_s"):
            src = k.replace("_s", "")
            weights[f"{k}.weight"] = torch.zeros_like(tensors[f"{src}.weight"])
            weights[f"{k}.bias"] = torch.zeros_like(tensors[f"{src}.bias"])
        notes.append("no s embedding (s_embed=False): ours is zeroed, so the second time input adds nothing")
    arch = dict(
        name="ddpmpp",
        model_channels=model_channels,
        channel_mult=channel_mult,
        num_blocks=num_blocks,
        attn_resolutions=attn,
        dropout=dropout,
        time_features="float64",
    )
    return Converted(
        network_class="",
        arch=arch,
        shape=(channels, res0, res0),
        num_classes=label_dim,
        method={},
        weights=weights,
        notes=notes,
    )


def _check_fits(path, found: Converted) -> None:
    """Our network of the found sizes has exactly these tensors and shapes; else the first that differs."""
    try:
        ours = found.build().state_dict()
    except ValueError as e:
        raise _fail(path, f"its network fits none we have ({e})") from None
    for key, value in ours.items():
        if key not in found.weights:
            raise _fail(
                path,
                f"its network has no tensor for our {key} {list(value.shape)}: a shape that fits no network we have",
            )
        if tuple(found.weights[key].shape) != tuple(value.shape):
            raise _fail(
                path,
                f"its {key} is {list(found.weights[key].shape)} where our network of its sizes has"
                f" {list(value.shape)}: a shape that fits no network we have",
            )
    extra = [k for k in found.weights if k not in ours]
    if extra:
        raise _fail(path, f"its tensor {extra[0]} has no place in our {found.arch['name']} network")
    found.weights = {k: found.weights[k].to(ours[k].dtype) for k in ours}
