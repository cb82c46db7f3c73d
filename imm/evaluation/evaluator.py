"""Few-step evaluation of a network: samples at several step counts from FIXED noise and labels,
the metrics of each (point data: against held-out data; images: FID against the training set), and
the step-comparison figure.

The trainer's periodic evaluation, `--config-name evaluate` and `--config-name sample` all sample
through this one class, so a number logged during training and one computed later from the
checkpoint with the same settings are the same number.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import logging
import math
import os
import re
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from imm import metrics
from imm.config import EvalConfig
from imm.core import sampling
from imm.errors import ConfigError
from imm.evaluation import figures
from imm.evaluation.classifier import ClassifierMetric
from imm.evaluation.fid import FIDEvaluator, MissingInceptionWeights
from imm.factory import loss_T
from imm.validation import Sampling, sampling_plan

log = logging.getLogger("imm.evaluation")

LABEL_MODES = ("cycle", "uncond")
_DEFAULT = EvalConfig()  # the option defaults live in the schema (imm.config.SamplingOptions)


def count_tag(n: int) -> str:
    """50000 -> "50k" (as in FID-50k), 64 -> "64"."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def guidance_tag(w: float) -> str:
    """ "" for w = 1 (no guidance), else "_w1.5"."""
    return "" if float(w) == 1.0 else f"_w{float(w):g}"


def metric_name(family: str, steps: int, guidance: float = 1.0, prefix: str = "eval") -> str:
    """eval/energy_1step, eval/fd_2step_w1.5, ...: a metric at a step count (and guidance scale)."""
    return f"{prefix}/{family}_{steps}step{guidance_tag(guidance)}"


def fid_metric(n: int, steps: int, guidance: float = 1.0, prefix: str = "eval") -> str:
    """eval/fid50k_2step, eval/fid50k_2step_w1.5, ..."""
    return metric_name(f"fid{count_tag(n)}", steps, guidance, prefix)


def ratio_family(family: str, n: int) -> str:
    """energy_ratio5k, fd_ratio1438: a metric over its noise floor, labelled with the n both were measured at
    (a ratio at n = 500 reads far better than the same model's at n = 5000; metrics.MIN_POINT_SAMPLES)."""
    return f"{family}_ratio{count_tag(n)}"


def nfe_metric(steps: int, guidance: float = 1.0, prefix: str = "eval") -> str:
    """eval/nfe_2step, eval/nfe_2step_w1.5: the network evaluations of that sampling (sampling.nfe)."""
    return f"{prefix}/nfe_{steps}step{guidance_tag(guidance)}"


def default_fid_cache() -> Path:
    """$XDG_CACHE_HOME/imm/fid, i.e. ~/.cache/imm/fid by default."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "imm" / "fid"


def fid_dataset_key(bundle, root: str | None = None) -> str:
    """What identifies the FID reference set: dataset, image shape, size (and the folder for data=folder);
    for data=latents the images the latents were encoded from."""
    if bundle.latents is not None:
        src = bundle.latents.source
        name, shape, n, root = src["name"], src["shape"], src["count"], src["root"]
    else:
        name, shape, n = bundle.name, bundle.shape, len(bundle.train)
    key = f"{name}|{'x'.join(map(str, shape))}|n={n}"
    return f"{key}|root={Path(root).expanduser().resolve()}" if name == "folder" and root else key


def fid_cache_file(cache_dir, dataset_key: str, feature_net: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9.=-]+", "-", dataset_key.split("|root=")[0]).strip("-")
    digest = hashlib.sha1(dataset_key.encode()).hexdigest()[:8]
    net = re.sub(r"[^A-Za-z0-9.=-]+", "-", feature_net)  # module:Class -> module-Class
    return Path(cache_dir).expanduser() / f"{slug}-{digest}-{net}.pt"


def has_classifier_metric(bundle) -> bool:
    """Labelled images with a held-out split (digits, MNIST) get the classifier metric."""
    return bundle.kind == "images" and bundle.heldout is not None and bundle.num_classes > 0


def feature_network(name: str) -> type[nn.Module] | None:
    """The network class whose features FID compares: None for "inception" (imm.evaluation.fid loads Inception-v3),
    or the class that "module:Class" names: an importable nn.Module whose instance takes uint8 images [N, 3, H, W]
    to features [N, F] (another feature network; its numbers are then not FID). One sentence when it cannot be had."""
    if name == "inception":
        return None
    module, _, attr = name.partition(":")
    hint = "eval.feature_net is inception or module:Class (an importable nn.Module)"
    if not module or not attr:
        raise ConfigError(f"eval.feature_net={name}: {hint}.")
    try:
        found = getattr(importlib.import_module(module), attr, None)
    except ImportError as e:
        raise ConfigError(f"eval.feature_net={name}: module {module} cannot be imported ({e}); {hint}.") from None
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise ConfigError(f"eval.feature_net={name}: {module} has no nn.Module class {attr}; {hint}.")
    return found


FLOOR_DRAWS = 8


@dataclasses.dataclass(frozen=True)
class FIDSettings:
    """What an Evaluator's FID measures: n_samples images per step count and guidance scale (guidances; None:
    the plan's scale), against the reference statistics cached in the folder `cache`, in the features of
    `feature_net` (inception, or module:Class: feature_network); dataset_key names the reference set."""

    n_samples: int = 5000
    guidances: list | None = None
    cache: Path | None = None
    inception_weights: str | None = None
    feature_net: str = "inception"
    allow_download: bool = True
    dataset_key: str | None = None
    reference: str | None = None  # a file of reference statistics (mu, sigma) instead of the training images'


def _typed(options):
    """A config node as the dataclass of its schema (typed attributes), or options as they are."""
    return OmegaConf.to_object(options) if OmegaConf.is_config(options) else options


def mean_noise_floor(bundle, n: int, g: torch.Generator, energy_only: bool = False) -> dict:
    """Each metric between the held-out set and an independent n-point training sample, averaged over
    FLOOR_DRAWS samples: a single draw of the energy distance's floor (about 2 E|X - X'| / n) varies
    by a factor of 2-3 between draws, which would make every model/floor ratio as noisy. `energy_only`:
    the energy distance alone (a tenth of the time: the k-NN metrics dominate), for ED/floor only."""
    train = bundle.train.data

    def floor(sample):
        if energy_only:
            return {"energy": metrics.energy_distance(sample, bundle.heldout)}
        return metrics.noise_floor(sample, bundle.heldout)

    draws = [floor(train[torch.randperm(len(train), generator=g)[:n]]) for _ in range(FLOOR_DRAWS)]
    return {k: sum(d[k] for d in draws) / FLOOR_DRAWS for k in draws[0]}


class Evaluator:
    """Evaluates networks at the plan's step counts (imm.validation.Sampling: its grids, sampler, guidance
    scale, seed and batch size) on fixed noise (and fixed labels).

    Images: `n_samples` is capped at `max_images` (64: the figure; None: no cap) and, with `fid`
    (FIDSettings), FID is computed on fid.n_samples images streamed in batches (noise drawn from the plan's
    seed, so every step count and guidance scale decodes the same noise) for each step count and each scale
    in fid.guidances (default: the plan's), against the training set's statistics, cached in the folder
    fid.cache. fid.feature_net: "inception" (the FID network) or "module:Class" (feature_network). The Inception
    weights are resolved at construction: a missing file fails here, before anything is sampled. Labelled
    images with a held-out split get the classifier metric when `classifier_cache` names its cache folder.

    Points: the energy distance, read against its floor, is the mean over `draws` independent noise
    draws of n_samples each (like the floor, which is a mean over FLOOR_DRAWS data draws): one draw
    of a model's energy distance near the floor varies by about as much as the floor itself (the
    same checkpoint measured 1.9x-4.0x over four draws of 5000). Its standard deviation over the
    draws is logged as energy_sd. Sliced W2, k-NN precision/recall and the figure use the first draw.

    `labels`: "cycle" (classes 0..C-1 in turn), "uncond" (the null label) or a list of class ids
    (cycled); ignored for unconditional data. `energy_floor_only`: the floor of the energy distance alone, for
    a figure's ED/floor (panel_text; `sample`), not the metrics a record logs.
    """

    def __init__(
        self,
        bundle,
        param,
        plan: Sampling,
        *,
        n_samples: int = _DEFAULT.n_samples,
        draws: int = 1,
        device="cpu",
        labels="cycle",
        max_images: int | None = 64,
        fid: FIDSettings | None = None,
        classifier_cache: Path | None = None,
        classifier_n_samples: int | None = None,
        energy_floor_only: bool = False,
    ):
        if int(draws) < 1:
            raise ValueError(f"draws must be a positive integer, got {draws}")
        self.bundle, self.param, self.plan, self.device = bundle, param, plan, torch.device(device)
        if bundle.latents is not None:  # the VAE that decodes: loaded once, here, on the process that evaluates
            bundle.latents.load(self.device)
        self.steps, self.guidance, self.grids = list(plan.steps), plan.guidance, plan.grids
        self.seed, self.batch_size, self.label_spec = plan.seed, plan.batch_size, labels
        # before the cap below: the classifier metric's count is n_samples
        self.classifier = self._classifier(classifier_cache, classifier_n_samples or n_samples)
        if bundle.kind == "images" and max_images is not None:
            n_samples = min(n_samples, max_images)  # a picture, not a metric; FID has its own count
        g = torch.Generator().manual_seed(plan.seed)
        self.noise = param.sigma_data * torch.randn(n_samples, *bundle.shape, generator=g)
        self.restart_seed = plan.seed + 1
        self.labels = self.labels_for(0, n_samples)
        self.floor, self.floor_reported = None, False
        if bundle.kind == "points":
            self._point_floor(n_samples, g, energy_floor_only)
        # further noise draws for the mean energy distance (drawn after the floor: draw 0 and the floor
        # do not depend on `draws`)
        self.more_noise = (
            [param.sigma_data * torch.randn(self.noise.shape, generator=g) for _ in range(int(draws) - 1)]
            if bundle.kind == "points"
            else []
        )
        self.fid_evaluator = None if fid is None else self._fid(fid)

    def _classifier(self, cache_dir: Path | None, n: int):
        """The classifier metric of labelled images with a held-out split, when asked for (a cache folder)."""
        if cache_dir is None or not has_classifier_metric(self.bundle):
            return None
        key = fid_dataset_key(self.bundle)
        return ClassifierMetric(self.bundle, n, fid_cache_file(cache_dir, key, "classifier"), key)

    def _point_floor(self, n_samples: int, g: torch.Generator, energy_only: bool) -> None:
        """The metrics' noise floor at the samples' size: reference draws of the training data."""
        self.floor_n = min(max(n_samples, 16), len(self.bundle.train))  # k-NN needs > k = 5
        self.floor = mean_noise_floor(self.bundle, self.floor_n, g, energy_only)
        if n_samples < metrics.MIN_POINT_SAMPLES:
            log.warning(
                "%d samples per evaluation: below %d the energy distance's noise floor (which grows like"
                " 1/n) swamps the model's own distance, so ED/floor reads far better than at"
                " eval.n_samples=5000; compare ratios at equal n only (docs/results.md#how-many-samples)",
                n_samples,
                metrics.MIN_POINT_SAMPLES,
            )

    def _fid(self, fid: FIDSettings) -> FIDEvaluator:
        """The FID of fid.n_samples images per step count and scale, against the training images' statistics."""
        if self.bundle.kind != "images":
            raise ValueError(f"FID is defined for images, not for {self.bundle.kind} data ({self.bundle.name})")
        self.fid_n_samples = int(fid.n_samples)
        self.fid_guidances = [float(w) for w in (fid.guidances if fid.guidances is not None else [self.guidance])]
        self.fid_key = fid.dataset_key or fid_dataset_key(self.bundle)
        cache = None if fid.cache is None or fid.reference else fid_cache_file(fid.cache, self.fid_key, fid.feature_net)
        evaluator = FIDEvaluator(
            feature_net=net() if (net := feature_network(fid.feature_net)) else None,
            inception_weights=fid.inception_weights,
            reference_cache=cache,
            device=self.device,
            batch_size=self.batch_size,
            allow_download=fid.allow_download,
        )
        if fid.reference:  # the paper's protocol: fixed statistics (checked now, before anything is sampled)
            try:
                evaluator.load_reference(fid.reference)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        elif self.bundle.latents is not None and (cache is None or not cache.is_file()):
            self.bundle.latents.check_source()  # the reference images are read at the first FID, long after this
        return evaluator

    @classmethod
    def from_options(cls, options, bundle, param, plan: Sampling, *, device="cpu", data_root=None, **overrides):
        """The one way to build an Evaluator from sampling options (imm.config.SamplingOptions and its
        subclasses: the training run's `eval` node, `evaluate`'s `eval` node, `sample`'s config) and their
        Sampling (imm.validation.sampling_plan): every option the object has is used, `overrides` (Evaluator
        arguments, and `fid`) replace what a command decides itself. FID is on when `fid` (an option or an
        override) is true and the data are images, with fid_n_samples (default 5000), fid_cache (default
        ~/.cache/imm/fid), inception_weights, feature_net and allow_download, and fid_guidances (an override;
        default: the plan's scale); `data_root` is the folder a data=folder reference set is keyed by. A missing
        Inception weights file raises ConfigError with fid.py's message."""
        options = _typed(options)

        def option(key, default=None):  # an override, else the option (absent from some commands' options)
            value = overrides.pop(key, None)
            value = getattr(options, key, None) if value is None else value
            return default if value is None else value

        cache = Path(option("fid_cache", default_fid_cache()))
        kwargs = dict(n_samples=option("n_samples", _DEFAULT.n_samples), draws=option("draws", 1), device=device)
        if option("classifier", False):
            kwargs["classifier_cache"] = cache
        fid = FIDSettings(
            n_samples=option("fid_n_samples", FIDSettings.n_samples),
            guidances=option("fid_guidances"),
            cache=cache,
            inception_weights=option("inception_weights"),
            feature_net=option("feature_net", FIDSettings.feature_net),
            allow_download=option("allow_download", True),
            reference=option("fid_ref"),
        )
        if option("fid", False) and bundle.kind == "images":
            key = f"file={fid.reference}" if fid.reference else fid_dataset_key(bundle, data_root)
            kwargs["fid"] = dataclasses.replace(fid, dataset_key=key)
        kwargs.update(overrides)
        try:
            return cls(bundle, param, plan, **kwargs)
        except MissingInceptionWeights as e:  # a config the user can fix (eval.inception_weights): one message
            raise ConfigError(str(e)) from None

    @classmethod
    def from_config(cls, cfg, bundle, param, *, device="cpu", **overrides) -> "Evaluator":
        """The evaluator a training config asks for: from_options with its `eval` node, its plan on loss.T and
        eps (`steps` and `guidance` may override the node's), and data.root."""
        T, eps, steps = loss_T(cfg), cfg.loss.eps, overrides.pop("steps", cfg.eval.steps)
        plan = sampling_plan(
            cfg.eval,
            {"eval.steps": steps},
            schedule=cfg.schedule.name,
            T=T,
            eps=eps,
            guidance=overrides.pop("guidance", None),
            numerics=cfg.schedule.numerics,
        )
        data_root = cfg.data.get("root", None)
        return cls.from_options(cfg.eval, bundle, param, plan, device=device, data_root=data_root, **overrides)

    # -- sampling -------------------------------------------------------------------------------
    def labels_for(self, start: int, count: int) -> torch.Tensor | None:
        """Labels of samples start..start+count-1 (None for unconditional data)."""
        nc = self.bundle.num_classes
        if not nc:
            return None
        index = torch.arange(start, start + count)
        spec = self.label_spec
        if spec is None or spec == "cycle":
            return index % nc
        if spec == "uncond":
            return torch.full((count,), nc, dtype=torch.long)
        if isinstance(spec, str):
            raise ValueError(f"labels={spec!r} is not one of {', '.join(LABEL_MODES)} or a list of class ids")
        ids = torch.as_tensor([int(c) for c in spec], dtype=torch.long)
        if len(ids) == 0 or ids.min() < 0 or ids.max() >= nc:
            raise ValueError(f"labels={list(spec)} must be class ids in 0..{nc - 1}")
        return ids[index % len(ids)]

    @torch.no_grad()
    def _decode(self, net, N: int, batches, guidance: float, draw: int = 0):
        """Yields the samples (float64, on self.device) of each (noise, labels) batch, with N steps
        (the restart sampler's fresh noise is seeded per draw)."""
        grid = self.grids[N]  # built once, by the plan
        g = torch.Generator(self.device).manual_seed(self.restart_seed + 1000 * draw)
        was_training = net.training
        net.eval()
        try:
            for noise, labels in batches:
                yield sampling.sample(
                    net,
                    self.param,
                    noise.to(self.device),
                    grid,
                    sampler=self.plan.sampler,
                    labels=None if labels is None else labels.to(self.device),
                    guidance=guidance,
                    null_label=self.bundle.num_classes,
                    generator=g,
                )
        finally:
            net.train(was_training)

    def _batches(self, noise: torch.Tensor):
        for i in range(0, len(noise), self.batch_size):
            j = min(i + self.batch_size, len(noise))
            yield noise[i:j], None if self.labels is None else self.labels[i:j]

    def _fresh_batches(self, n: int):
        """n noise draws from `seed` in batches, generated as needed (FID-50k never holds them all)."""
        g = torch.Generator().manual_seed(self.seed)
        for i in range(0, n, self.batch_size):
            b = min(self.batch_size, n - i)
            yield self.param.sigma_data * torch.randn(b, *self.bundle.shape, generator=g), self.labels_for(i, b)

    def samples(self, net, N: int, n: int | None = None, guidance: float | None = None) -> torch.Tensor:
        """The first n (default all n_samples) fixed-noise samples with N steps, model space, float64 CPU."""
        n = len(self.noise) if n is None else min(n, len(self.noise))
        return self._decode_all(net, N, self.noise[:n], self.guidance if guidance is None else guidance)

    def _decode_all(self, net, N: int, noise: torch.Tensor, guidance: float, draw: int = 0) -> torch.Tensor:
        """All of `noise` (with the fixed labels) decoded with N steps, float64 on the CPU."""
        return torch.cat([x.cpu() for x in self._decode(net, N, self._batches(noise), guidance, draw)])

    # -- metrics ----------------------------------------------------------------------------------
    def point_results(self, x: torch.Tensor, N: int, net=None) -> tuple[dict, dict]:
        """Point data: ({eval/<metric>_<N>step: value}, the figure panel's text) for the samples x of the
        first draw; with `net`, the energy distance is the mean over x and the further draws."""
        m = metrics.point_metrics(x.float(), self.bundle.heldout)
        if net is not None and self.more_noise:
            energies = [m["energy"]]
            for draw, noise in enumerate(self.more_noise, start=1):
                y = self._decode_all(net, N, noise, self.guidance, draw)
                energies.append(metrics.energy_distance(y.float(), self.bundle.heldout))
            m["energy"] = mean = sum(energies) / len(energies)
            m["energy_sd"] = math.sqrt(sum((e - mean) ** 2 for e in energies) / (len(energies) - 1))
        results = {metric_name(k, N): v for k, v in m.items()}
        ratio = m["energy"] / max(self.floor["energy"], 1e-12)
        results[metric_name(ratio_family("energy", self.floor_n), N)] = ratio
        draws = 1 + (len(self.more_noise) if net is not None else 0)
        return results, self._panel(ratio, m["recall"], draws)

    def _panel(self, ratio: float, recall: float, draws: int) -> dict:
        """A figure panel's text: ED/floor labelled with its n and its noise draws (one draw reads differently
        from the mean of eight, so the label says which) and the recall."""
        return {f"ED/floor (n={count_tag(self.floor_n)}, {draws} draw{'s' * (draws > 1)})": ratio, "recall": recall}

    def panel_text(self, x: torch.Tensor) -> dict:
        """Point data: the figure panel's text alone for the samples x (one draw): the energy distance and
        the k-NN recall, without point_results' other metrics (a figure, not a record)."""
        heldout = self.bundle.heldout
        ratio = metrics.energy_distance(x.float(), heldout) / max(self.floor["energy"], 1e-12)
        return self._panel(ratio, metrics.knn_recall(heldout, x.float()), 1)

    def fid_results(self, net, steps=None, guidances=None) -> dict:
        """{eval/fid<n>_<N>step[_w<g>]: FID} over fid_n_samples images per step count and scale."""
        fe = self.fid_evaluator
        if fe is None:
            raise RuntimeError("this Evaluator was built without fid=True")
        if fe.reference_source is None:
            fe.prepare_reference(self._reference_batches(), self.fid_key)
        results = {}
        for w in self.fid_guidances if guidances is None else guidances:
            for N in self.steps if steps is None else steps:
                stream = self._decode(net, N, self._fresh_batches(self.fid_n_samples), float(w))
                try:
                    value = fe.fid(self.bundle.to_images(x).float() for x in stream)
                finally:
                    stream.close()
                results[fid_metric(self.fid_n_samples, N, w)] = value  # NaN (with a warning) for non-finite samples
        return results

    def classifier_results(self, net, steps=None, guidances=None) -> dict:
        """{eval/fd_<N>step, eval/fd_ratio<n>_<N>step, eval/accuracy_<N>step (with _w<g>)}: the classifier
        metric (imm/evaluation/classifier.py) of n samples from the fixed seed per step count and scale."""
        cm, results = self.classifier, {}
        labels = self.labels_for(0, cm.n)
        for w in [self.guidance] if guidances is None else guidances:
            for N in self.steps if steps is None else steps:
                x = torch.cat([b.cpu() for b in self._decode(net, N, self._fresh_batches(cm.n), float(w))])
                for family, value in cm.results(x, labels).items():
                    family = ratio_family("fd", cm.n) if family == "fd_ratio" else family
                    results[metric_name(family, N, w)] = value
        return results

    def floors(self) -> dict:
        """{eval/<metric>_floor: value}: what the same metrics give for data against data."""
        out = {f"eval/{k}_floor": v for k, v in (self.floor or {}).items()}
        if self.classifier is not None:
            out.update({f"eval/{k}_floor": v for k, v in self.classifier.floor.items()})
        return out

    def _reference_batches(self):
        """The training images (unflipped; for latents the encoded ones) in batches, read only when the cache has
        no statistics."""
        ds = self.bundle.train if self.bundle.latents is None else self.bundle.latents.source_images()
        data = getattr(ds, "data", None)
        if isinstance(data, torch.Tensor):  # in-memory sets: float [-1, 1] or uint8
            yield from data.split(self.batch_size)
            return
        for i in range(0, len(ds), self.batch_size):
            items = range(i, min(i + self.batch_size, len(ds)))
            yield torch.stack([ds.get(j, False)[0] if hasattr(ds, "get") else ds[j][0] for j in items])

    def __call__(self, net):
        """(metrics {name: float}, figures {artifact file: Figure}, samples {N: tensor})."""
        results, by_steps, panel_text = {}, {}, {}
        for N in self.steps:
            x = self.samples(net, N)
            by_steps[N] = x
            if self.bundle.kind == "points":
                r, panel_text[N] = self.point_results(x, N, net)
                results.update(r)
        if not self.floor_reported:  # the noise floors are logged once
            results.update(self.floors())
            self.floor_reported = True
        if self.classifier is not None:
            results.update(self.classifier_results(net))
        if self.fid_evaluator is not None:
            results.update(self.fid_results(net))
        results.update(self.nfe_results())
        return results, self.figures(by_steps, panel_text), by_steps

    def nfe_results(self) -> dict:
        """{eval/nfe_<N>step[_w<g>]: NFE} for every step count and guidance scale evaluated (Table 2's count)."""
        scales = dict.fromkeys([self.guidance, *(self.fid_guidances if self.fid_evaluator is not None else [])])
        return {nfe_metric(N, w): sampling.nfe(N, w) for w in scales for N in self.steps}

    def figures(self, by_steps, panel_text=None) -> dict:
        if self.bundle.kind == "points":
            unscale = self.bundle.unscale
            n = min(2000, len(self.bundle.heldout))
            fig = figures.step_comparison_points(
                {N: unscale(x[:n].float()) for N, x in by_steps.items()}, unscale(self.bundle.heldout[:n]), panel_text
            )
            return {"figures/steps.png": fig}
        return {
            "figures/steps.png": figures.step_comparison_images(
                {N: self.bundle.to_images(x[:10].float()) for N, x in by_steps.items()}, max_images=10
            )
        }  # classes 0-9 for labelled sets
