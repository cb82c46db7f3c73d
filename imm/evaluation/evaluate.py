"""Few-step evaluation of a network: samples at several step counts from FIXED noise and labels,
the metrics of each against held-out data, and the step-comparison figure.

The trainer's periodic evaluation and the evaluation command share this code.
"""

from __future__ import annotations

import torch

from ..core import sampling
from . import figures, metrics


def time_grid(N: int, *, schedule, T: float, eps: float, grid: str = "uniform",
              two_step_eta: float | None = 1.4) -> torch.Tensor:
    """The sampling grid for N steps: the paper's eta(t_1) = 1.4 for N = 2 (App. I.2) unless
    two_step_eta is None, else the named grid."""
    if N == 2 and two_step_eta is not None:
        return sampling.time_grid("eta", 2, schedule=schedule, T=T, eps=eps, etas=[two_step_eta])
    return sampling.time_grid(grid, N, schedule=schedule, T=T, eps=eps)


class Evaluator:
    """Evaluates networks at `steps` sampling steps on fixed noise (and fixed labels)."""

    def __init__(self, bundle, param, *, T: float, eps: float, steps=(1, 2, 4, 8), n_samples: int = 5000,
                 batch_size: int = 1000, sampler: str = "pushforward", grid: str = "uniform",
                 two_step_eta: float | None = 1.4, guidance: float = 1.0, seed: int = 1234, device="cpu"):
        self.bundle, self.param, self.device = bundle, param, torch.device(device)
        self.steps, self.sampler, self.guidance = [int(n) for n in steps], sampler, guidance
        self.grids = {N: time_grid(N, schedule=param.schedule, T=T, eps=eps, grid=grid, two_step_eta=two_step_eta)
                      for N in self.steps}
        if bundle.kind == "images":
            n_samples = min(n_samples, 64)  # a picture, not a metric; FID has its own count
        g = torch.Generator().manual_seed(seed)
        self.noise = param.sigma_data * torch.randn(n_samples, *bundle.shape, generator=g)
        self.restart_seed = seed + 1
        nc = bundle.num_classes
        self.labels = torch.arange(n_samples) % nc if nc else None
        self.batch_size = batch_size
        self.floor, self.floor_reported = None, False
        if bundle.kind == "points":
            reference = bundle.train.data[torch.randperm(len(bundle.train), generator=g)[:len(bundle.heldout)]]
            self.floor = metrics.noise_floor(reference, bundle.heldout)

    @torch.no_grad()
    def samples(self, net, N: int) -> torch.Tensor:
        """n_samples generated with N steps, in model space, float64 on the CPU."""
        out = []
        g = torch.Generator(self.device).manual_seed(self.restart_seed)
        was_training = net.training
        net.eval()
        try:
            for i in range(0, len(self.noise), self.batch_size):
                noise = self.noise[i:i + self.batch_size].to(self.device)
                labels = None if self.labels is None else self.labels[i:i + self.batch_size].to(self.device)
                out.append(sampling.sample(net, self.param, noise, self.grids[N], sampler=self.sampler, labels=labels,
                                           guidance=self.guidance, null_label=self.bundle.num_classes,
                                           generator=g).cpu())
        finally:
            net.train(was_training)
        return torch.cat(out)

    def __call__(self, net):
        """(metrics {name: float}, figures {artifact file: Figure}, samples {N: tensor})."""
        results, by_steps, panel_text = {}, {}, {}
        for N in self.steps:
            x = self.samples(net, N)
            by_steps[N] = x
            if self.bundle.kind == "points":
                m = metrics.point_metrics(x.float(), self.bundle.heldout)
                for k, v in m.items():
                    results[f"eval/{k}_{N}step"] = v
                results[f"eval/energy_ratio_{N}step"] = m["energy"] / max(self.floor["energy"], 1e-12)
                panel_text[N] = {"ED/floor": results[f"eval/energy_ratio_{N}step"], "recall": m["recall"]}
        if self.floor is not None and not self.floor_reported:  # the noise floor is logged once
            results.update({f"eval/{k}_floor": v for k, v in self.floor.items()})
            self.floor_reported = True
        return results, self.figures(by_steps, panel_text), by_steps

    def figures(self, by_steps, panel_text=None) -> dict:
        if self.bundle.kind == "points":
            unscale = self.bundle.unscale
            n = min(2000, len(self.bundle.heldout))
            fig = figures.step_comparison_points({N: unscale(x[:n].float()) for N, x in by_steps.items()},
                                                 unscale(self.bundle.heldout[:n]), panel_text)
            return {"figures/steps.png": fig}
        return {"figures/steps.png": figures.step_comparison_images({N: x.float() for N, x in by_steps.items()})}
