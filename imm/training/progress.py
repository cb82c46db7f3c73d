"""What a training run shows: progress while it runs, a summary when it ends.

- On a terminal (stderr is a TTY) the main process draws one tqdm bar; log lines (checkpoints,
  evaluations, warnings) print above it (tqdm's logging redirect), and the periodic loss line goes
  to launch.log only, as the bar's postfix shows the loss.
- Otherwise (a pipe, a file, a cluster job) the loss line is logged every train.log_every steps.
- Either way launch.log (Hydra's file handler) receives every loss line.
- At the end, one summary: steps and time, the final metrics per step count next to their noise floor,
  where the run directory, checkpoints and MLflow run are, and the command that continues the run.
"""

from __future__ import annotations

import logging
import math
import re
import shlex
import sys
import time
from pathlib import Path

import torch

from imm import factory
from imm.metrics import metric_parts
from imm.runs import command_line
from imm.training import checkpoint, distributed

log = logging.getLogger("imm.train")

SHOWN_BY_BAR = "shown_by_bar"  # a LogRecord attribute: the console leaves the line to the bar's postfix


def _console_handlers() -> list[logging.Handler]:
    """The root logger's handlers that write to the terminal (not Hydra's launch.log file handler)."""
    return [
        h
        for h in logging.root.handlers
        if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stdout, sys.stderr)
    ]


def _not_shown_by_bar(record: logging.LogRecord) -> bool:
    return not getattr(record, SHOWN_BY_BAR, False)


class Progress:
    """The loss and step counts between log lines, samples/s, non-finite steps, and the display."""

    def __init__(self, cfg, env, tracker, step: int, device, ema):
        self.cfg, self.env, self.tracker, self.ema = cfg, env, tracker, ema
        self.loss_sum, self.n_good, self.nonfinite_run, self.n_skipped = torch.zeros((), device=device), 0, 0, 0
        self.t_last, self.samples = time.perf_counter(), 0
        self.bar, self._redirect = None, None
        if env.is_main and sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            for handler in _console_handlers():  # copied onto the redirecting handler below
                handler.addFilter(_not_shown_by_bar)
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
            self.bar = tqdm(total=cfg.train.steps, initial=step, dynamic_ncols=True, desc="train", file=sys.stderr)

    def good(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss.detach()  # on the device: no host sync per step
        self.n_good += 1
        self.nonfinite_run = 0

    def skipped(self, step: int, loss, diag: dict, net, run_dir: Path) -> None:
        """Count a skipped step; after train.max_nonfinite in a row raise FloatingPointError naming the terms."""
        self.nonfinite_run += 1
        self.n_skipped += 1
        bad = "loss" if not torch.isfinite(loss) else "gradient norm"
        log.warning("step %d: non-finite %s, step skipped (%d in a row)", step, bad, self.nonfinite_run)
        self.tracker.log_metrics({"train/skipped_steps": self.n_skipped}, step + 1)
        if self.nonfinite_run < self.cfg.train.max_nonfinite:
            return
        terms = [k for k, v in diag.items() if not torch.isfinite(v)] or [
            f"the gradient of {n}"
            for n, p in net.named_parameters()
            if p.grad is not None and not torch.isfinite(p.grad).all()
        ][:1]
        raise FloatingPointError(
            f"step {step}: the {bad} went non-finite {self.nonfinite_run} steps in a row"
            f" (train.max_nonfinite={self.cfg.train.max_nonfinite}); non-finite terms:"
            f" {', '.join(terms) or 'none on this process'}; the last good checkpoint is"
            f" {checkpoint.resolve(None, run_dir) or 'none yet'}; lower optim.lr or check the data."
        )

    def tick(self, step: int, grad_norm, optimizer, diag: dict) -> dict | None:
        """After each step: advance the bar; every train.log_every steps (and at the end) log and reset."""
        self.samples += self.cfg.train.batch_size
        if self.bar is not None:
            self.bar.update(1)
        if step % self.cfg.train.log_every and step != self.cfg.train.steps:
            return None
        now = time.perf_counter()
        metrics = {
            "train/loss": distributed.mean(self.env, self.loss_sum / max(self.n_good, 1)).item(),
            "train/grad_norm": grad_norm.item(),
            "train/lr": optimizer.param_groups[0]["lr"],
            "train/ema_decay": self.ema.get_current_decay(),  # the decay of the last update (imm.config.EMAConfig)
            "train/skipped_steps": self.n_skipped,
            "train/samples_per_s": self.samples / (now - self.t_last),
            **{f"diag/{k}": v.item() for k, v in diag.items()},
        }
        self.tracker.log_metrics(metrics, step)
        self._show(step, metrics)
        self.loss_sum.zero_()
        self.n_good, self.t_last, self.samples = 0, now, 0
        return metrics

    def _show(self, step: int, m: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{m['train/loss']:.4g}", sps=f"{m['train/samples_per_s']:.0f}")
        rate = m["train/samples_per_s"]
        log.info(
            "step %d/%d loss %.5g grad %.3g lr %.3g %s samples/s",
            step,
            self.cfg.train.steps,
            m["train/loss"],
            m["train/grad_norm"],
            m["train/lr"],
            f"{rate:.0f}" if rate >= 100 else f"{rate:.2f}",  # a slow step's rate to 0.1%, not to the unit
            extra={SHOWN_BY_BAR: self.bar is not None},
        )

    def close(self) -> None:
        """Finish the bar (once: the loop closes it before the final save and evaluation log their lines)."""
        if self.bar is None:
            return
        self.bar.close()
        self.bar = None
        self._redirect.__exit__(None, None, None)
        for handler in _console_handlers():
            handler.removeFilter(_not_shown_by_bar)


# -- the summary ------------------------------------------------------------------------------------
def duration(seconds: float) -> str:
    """4.1 s, 2 min 03 s, 1 h 02 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def metric_table(summary: dict) -> list[str]:
    """The final/* metrics as rows per step count (and a `floor` row) and columns per metric family."""
    rows: dict[tuple, dict[str, float]] = {}
    for key, value in summary.items():
        if not key.startswith("final/"):
            continue
        parts = metric_parts(key)
        if parts is not None:
            family, steps, guidance = parts
            row = (steps, f"{steps} step{'s' if steps > 1 else ''}" + (f" w={guidance}" if guidance else ""))
        elif key.endswith("_floor"):
            family, row = key[len("final/") : -len("_floor")], (math.inf, "floor")
        else:
            continue
        if family != "energy_sd":  # the spread of the energy over noise draws: in MLflow, not in the table
            rows.setdefault(row, {})[family] = value
    for (steps, label), cells in list(rows.items()):  # NFE beside the step count where guidance doubles it
        nfe = cells.pop("nfe", steps)
        if not cells:
            del rows[steps, label]
        elif nfe != steps:
            rows[steps, f"{label} (NFE {nfe:g})"] = rows.pop((steps, label))
    if not rows:
        return []
    seen = list(dict.fromkeys(f for cells in rows.values() for f in cells))
    # each ratio beside its metric: energy, energy_ratio, sw2, ...
    base = {f: b if (b := re.sub(r"_ratio\d*k?$", "", f)) in seen else f for f in seen}  # energy_ratio5k: energy
    families = sorted(seen, key=lambda f: (seen.index(base[f]), f != base[f]))
    table = [["", *families]] + [
        [label, *(f"{cells[f]:.4g}" if f in cells else "" for f in families)]
        for (_, label), cells in sorted(rows.items())
    ]
    widths = [max(len(r[i]) for r in table) for i in range(len(families) + 1)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table]


def summary_text(
    *,
    status: str,
    start_step: int,
    step: int,
    steps: int,
    seconds: float,
    summary: dict,
    run_dir: Path,
    uri: str | None,
    run_id: str | None,
    resume: str | None,
    lr_note: str | None = None,
    links: tuple[str, str] | None = None,
    incomplete: tuple | None = None,
) -> str:
    """The end-of-run summary, one block of lines (logged as one record, so it reads as a table); `links`: the run's
    page and its experiment's runs table in the MLflow UI (imm.tracking.mlflow_run.ui_links); `incomplete`:
    (records, journal, command) when the MLflow store did not take the whole record."""
    head = f"run {status}: step {start_step} -> {step} of {steps} in {duration(seconds)}"
    if "final/loss" in summary:
        head += f", last train/loss {summary['final/loss']:.4g}"
    lines = [head, *metric_table(summary)]
    newest = checkpoint.resolve(None, run_dir)
    where = [
        ("run dir", str(run_dir.resolve())),
        ("checkpoints", f"{checkpoint.ckpt_dir(run_dir).resolve()}" + (f" (newest {newest.name})" if newest else "")),
    ]
    if checkpoint.snapshot_dir(run_dir).is_dir():
        where.append(("snapshots", str(checkpoint.snapshot_dir(run_dir).resolve())))
    if (run_dir / "figures").is_dir():
        where.append(("figures", str((run_dir / "figures").resolve())))
    if uri:
        where += mlflow_lines(uri, run_id, links)
    if uri and incomplete:
        records, journal, command = incomplete
        where.append(
            (
                "MLflow record",
                f"INCOMPLETE: the store did not take {records} records, which wait in {journal}; complete the run"
                f" with: {command} (add tracking.uri=... to copy it into another store)",
            )
        )
    if resume:
        where.append(("train on" if status == "FINISHED" else "resume", resume))
        if status == "FINISHED" and lr_note:
            where.append(("", lr_note))
    width = max(len(label) for label, _ in where)
    return "\n  ".join([*lines, *(f"{label.ljust(width)}  {value}" for label, value in where)])


def stretched_lr(cfg, step: int, before: int, after: int) -> str | None:
    """What training on from `step` with train.steps `after` instead of `before` does to the learning rate, in
    words (the cosine spans train.steps, so extending a run stretches it); None when the lr does not change."""
    if cfg.optim.lr_schedule != "cosine" or before == after:
        return None
    old, new = factory.lr_at(cfg, step, before), factory.lr_at(cfg, step, after)
    return (
        f"train.steps {before} -> {after}: the cosine learning-rate schedule spans train.steps, so the lr at step"
        f" {step} goes from {old:.3g} to {new:.3g} and decays to step {after} (docs/runs.md#extending-a-run)"
    )


def mlflow_lines(uri: str, run_id: str | None, links: tuple[str, str] | None) -> list[tuple[str, str]]:
    """The summary's MLflow rows: the run and its store, how to start the UI, the direct addresses to open."""
    rows = [("MLflow", f"run {run_id} in {uri}")]
    if not uri.startswith(("http://", "https://")):  # a server is its own UI; a local store needs `mlflow ui`
        ui = f"mlflow ui --workers 1 --backend-store-uri {uri}"  # one web worker starts faster (docs/runs.md)
        rows.append(("MLflow UI", ui + (", then open" if links else "")))
    if links:
        rows += [("run page", links[0]), ("runs table", links[1])]
    return rows


def run_description(cfg, bundle, net, command) -> str:
    """The MLflow run description (markdown): the command that reproduces the run, then what it trains."""
    loss = cfg.loss
    if loss.objective == "imm":
        method = (
            f"IMM (k={loss.k}, a={loss.a:g}, b={loss.b:g}, M={loss.M}, mapping {loss.mapping}, kernel"
            f" {cfg.kernel.weighting}/{cfg.kernel.function}, target {cfg.target.kind})"
        )
    else:
        method = "flow matching (the baseline)"
    classes = f", {bundle.num_classes} classes" if bundle.num_classes else ""
    n_params = sum(p.numel() for p in net.parameters())
    return (
        f"`{shlex.join(command_line(command))}`\n\n"
        f"{method} on {bundle.name} ({len(bundle.train)} samples of shape {tuple(bundle.shape)}{classes}) with"
        f" {cfg.arch.name} ({n_params / 1e6:.2f}M parameters), schedule {cfg.schedule.name} ({cfg.schedule.param});"
        f" {cfg.train.steps} steps of batch {cfg.train.batch_size}, {cfg.optim.name} lr {cfg.optim.lr:g}."
    )


def log_file(run_dir: Path) -> Path | None:
    """The log file Hydra writes in run_dir (launch.log), flushed; None when logging goes elsewhere (tests)."""
    run_dir = run_dir.resolve()
    for handler in logging.root.handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_dir:
            try:
                handler.flush()
            except OSError:  # a full disk: the file holds what fit (imm.diskspace.quiet_log_files said so once)
                pass
            return Path(handler.baseFilename)
    return None
