"""The training loop. Reads top to bottom: set up, restore, loop, finish.

Everything random is reproducible and resumable: the objective's draws (times, noise, label drops)
come from a generator re-seeded from (train.seed, step) at every step, the data order from
(train.seed, epoch) with the position saved, and the global RNG (dropout) is saved in checkpoints.
Relaunching the same command in the same run directory resumes where the last checkpoint left off.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import sys
from pathlib import Path

import torch
from ema_pytorch import EMA
from omegaconf import OmegaConf

from imm import factory, runs
from imm.data import ResumableBatches
from imm.data import digest as data_digest
from imm.diskspace import replacing, skipped
from imm.errors import TrackingError
from imm.evaluation.evaluator import Evaluator
from imm.metrics import lower_is_better, primary_metrics
from imm.nets import count_parameters
from imm.tracking.journal import JOURNAL
from imm.tracking.mlflow_run import Tracker, check_store, flatten, note_tag, offline_resumable, source_tags
from imm.training import checkpoint, diskwatch, distributed
from imm.training.attempt import Attempt
from imm.training.progress import Progress, run_description, stretched_lr
from imm.training.signals import StopFlag
from imm.training.threads import IdleCores, torch_threads
from imm.validation import check_precision, check_same_run, check_steps_reached, load_data, validate

log = logging.getLogger("imm.train")

RUN_ID_FILE = "mlflow_run_id"
SHOWN = ("energy_ratio", "recall", "fd_ratio", "accuracy")  # the metrics of the evaluation's log line


def train(cfg, run_dir, *, tracking_uri: str | None = None, run_name: str = "", extra_tags=None, command=None) -> dict:
    """Train according to `cfg`, writing checkpoints and figures under run_dir; returns final metrics.
    `command` (argv, the script first; default sys.argv) is the command that reproduces this run, for
    its MLflow description and source."""
    run_dir, env = Path(run_dir), distributed.detect()
    device, follow_idle_cores = _set_up(cfg, run_dir, env, tracking_uri)
    with Attempt(run_dir, env, cfg, run_name=run_name, tracking_uri=tracking_uri) as attempt:
        if attempt.finished():
            return attempt.skip(cfg)

        # -- data, network, objective, optimizer (all before any MLflow run is created) ---------------------
        bundle = load_data(cfg)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        net = factory.net(cfg, bundle.shape, bundle.num_classes).to(device)
        _init(cfg, net, run_dir)  # before the EMAs copy the net: they start from the same weights
        objective = factory.objective(cfg, bundle.num_classes, env.rank, env.world_size)
        optimizer = factory.optimizer(cfg, net.parameters(), device)
        ema, target_ema = _emas(cfg, net)
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
        batches = _batches(cfg, bundle, env, device)
        distributed.init(env, device)
        student, target = _student_and_target(cfg, net, target_ema, env, device)
        state = checkpoint.CheckpointIO(
            model=net, ema=ema, target_ema=target_ema, optimizer=optimizer, scaler=scaler, data=batches
        )

        # -- restore ---------------------------------------------------------------------------------------
        ckpt_path = checkpoint.resolve(cfg.resume, run_dir)
        saved = checkpoint.load(ckpt_path, required=state.required) if ckpt_path is not None else None
        resumed_tags = check_same_run(cfg, saved["config"], ckpt_path) if saved else {}
        torch.manual_seed(cfg.train.seed + 1000 * env.rank)  # dropout streams differ per rank
        step = _restore(cfg, state, saved, ckpt_path, device) if saved else 0
        # the next checkpoint must fit: said now, not after train.ckpt_every steps that could not be saved
        space = diskwatch.SpaceWatch(run_dir, cfg.train, diskwatch.estimates(state, device))
        space.check_room(step, attempt.resume_hint("FAILED"))

        # -- evaluation and tracking -------------------------------------------------------------------------
        # missing FID weights fail here, before any MLflow run exists
        evaluator = Evaluator.from_config(cfg, bundle, objective.param, device=device) if env.is_main else None
        stop = StopFlag()  # before the MLflow run exists: a signal from here on ends it KILLED, never RUNNING
        if env.is_main and cfg.tracking.enabled:
            tags = {**_run_tags(run_dir, device, env, ckpt_path, step), **(extra_tags or {}), **resumed_tags}
            attempt.tracker = _open_tracker(cfg, run_dir, tracking_uri, run_name, saved, tags, bundle, net, command)
        tracker, summary = attempt.tracker, attempt.summary
        _log_start(cfg, env, run_dir, net, tracker, tracking_uri, step)
        extras = _checkpoint_extras(cfg, bundle, tracker)
        best = checkpoint.read_best(run_dir)  # the bests of the evaluations before a resume
        snapshot = functools.partial(_snapshot_for_best, cfg, state, run_dir, env, extras)

        # -- the loop ------------------------------------------------------------------------------------------
        progress, mark = Progress(cfg, env, tracker, step, device, ema), {}
        rescue = functools.partial(_rescue, state, device, run_dir, env, cfg, extras, mark)  # any error: a checkpoint
        attempt.begin(step, resumed=saved is not None, closing=(stop.restore, progress.close), rescue=rescue)
        generator = torch.Generator(device)
        autocast = _autocast(cfg.train.precision, device)
        while step < cfg.train.steps:
            follow_idle_cores()  # a lone point-net training takes the cores nobody else uses (imm/training/threads.py)
            mark.update(step=step, data=batches.state_dict(), rng=checkpoint.rng_state(device))  # for _rescue
            x, labels = (None if v is None else v.to(device, non_blocking=True) for v in next(batches))
            generator.manual_seed(_step_seed(cfg.train.seed, step))
            for group in optimizer.param_groups:
                group["lr"] = factory.lr_at(cfg, step)
            with autocast:  # for the whole share, whatever train.micro_batch; iCT's curriculum N(k) needs the step
                step_kw = {"step": step} if getattr(objective, "needs_step", False) else {}
                draws = objective.draw(x, labels, generator, **step_kw)
            optimizer.zero_grad(set_to_none=True)
            loss, diag = _backward(cfg, env, objective, student, target, x, draws, scaler, autocast)
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.optim.grad_clip or math.inf)
            finite = torch.isfinite(loss) & (torch.isfinite(grad_norm) | scaler.is_enabled())
            ok, stop_signum = distributed.agree(env, finite, stop.signum)  # the same verdict on every rank
            if ok:
                scaler.step(optimizer)  # with fp16, inf gradients make the scaler skip and back off
                scaler.update()
                ema.update()
                if target_ema is not None:
                    target_ema.update()
                progress.good(loss)
            else:
                progress.skipped(step, loss, diag, net, run_dir)  # raises after train.max_nonfinite in a row
            step = attempt.step = step + 1

            if (metrics := progress.tick(step, grad_norm, optimizer, diag)) is not None:
                summary["final/loss"] = metrics["train/loss"]
            if cfg.train.snapshot_every and step % cfg.train.snapshot_every == 0 and step < cfg.train.steps:
                _snapshot(state, run_dir, env, step, extras)  # before the evaluation: a best links to it
            if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
                results = _evaluate(evaluator, ema.ema_model, tracker, run_dir, step)
                _track_best(best, results, step, tracker, run_dir, snapshot)
            if step % cfg.train.ckpt_every == 0 and step < cfg.train.steps:
                _save(state, device, run_dir, env, cfg, step, extras)
            if env.is_main:
                space.check(step, tracker)  # a warning while the next two saves still fit
            if stop_signum is not None:
                stop.request(stop_signum)
                _save(state, device, run_dir, env, cfg, step, extras)
                stop.hand_over()  # submitit requeues on preemption; otherwise raises Interrupted

        # -- the end: last state, snapshot and evaluation ----------------------------------------------------
        progress.close()  # the finished bar stays on screen once; the lines below print under it
        _save(state, device, run_dir, env, cfg, step, extras)
        if cfg.train.snapshot_every or cfg.tracking.log_weights:
            _snapshot(state, run_dir, env, step, extras)
        if cfg.tracking.log_weights and tracker.enabled:  # the final EMA weights, what `sample` and `evaluate` load
            tracker.log_artifact(checkpoint.list_snapshots(run_dir)[-1], "weights")
        final = _evaluate(evaluator, ema.ema_model, tracker, run_dir, step)
        _track_best(best, final, step, tracker, run_dir, snapshot)
        # the noise floors are logged at the first evaluation only; the summary shows them
        floors = evaluator.floors() if evaluator is not None else {}
        summary.update({f"final/{k[5:]}": v for k, v in {**final, **floors}.items()}, **best)
        tracker.log_metrics(summary, step)
        return summary


def _restore(cfg, state: checkpoint.CheckpointIO, saved: dict, ckpt_path, device) -> int:
    """Load a checkpoint's training state (model, EMA, optimizer, data position, RNG); the step it reached."""
    check_steps_reached(cfg, saved["step"], ckpt_path)
    state.load_state_dict(saved, device)
    log.info("resumed from %s at step %d", ckpt_path, saved["step"])
    before = OmegaConf.select(OmegaConf.create(saved["config"]), "train.steps")
    if (lr_note := stretched_lr(cfg, saved["step"], before, cfg.train.steps)) is not None:
        log.warning("%s", lr_note)
    return saved["step"]


def _set_up(cfg, run_dir: Path, env, tracking_uri: str | None):
    """The launch's checks that need no data (config, device, precision, run directory, tracking store), then
    this process's device, numerics and threads; the device and what the loop calls each step to follow the idle
    cores (nothing unless the thread count follows them)."""
    if not env.is_main:  # one process owns the logs, files and MLflow
        logging.getLogger("imm").setLevel(logging.WARNING)
    validate(cfg, env.world_size)
    if cfg.init:  # a missing init= file is one sentence before the data are loaded
        checkpoint.resolve(cfg.init, key="init", snapshots=True)
    device = factory.device(cfg.train.device, local_rank=env.local_rank)
    _configure_precision(cfg.train.precision, device)
    threads = torch_threads(cfg.train.threads, cfg.arch.name)
    torch.set_num_threads(threads.count)
    log.info("torch threads: %d (%s)", threads.count, threads.source)
    if env.is_main:  # fails now, not at the first save (after train.ckpt_every steps)
        written = [checkpoint.CKPT_DIR, "figures"] + [checkpoint.SNAPSHOT_DIR] * bool(cfg.train.snapshot_every)
        runs.check_writable(run_dir, *written)
    if env.is_main and cfg.tracking.enabled:
        _check_store(run_dir, tracking_uri)
    return device, IdleCores().follow if threads.follow else lambda: None


def _check_store(run_dir: Path, uri: str) -> None:
    """The tracking store can be used (imm.tracking.mlflow_run.check_store), or it is an HTTP store that does not
    answer now and this run directory already logs to its run there: the run goes on, its records journaled."""
    try:
        check_store(uri)
    except TrackingError:
        if not offline_resumable(uri, run_dir / JOURNAL, run_id := _read_run_id(run_dir)):
            raise
        log.warning(
            "the MLflow store %s does not answer; this run goes on into its MLflow run %s, whose records wait in %s"
            " until the store takes them",
            uri,
            run_id,
            run_dir / JOURNAL,
        )


def _autocast(precision: str, device: torch.device):
    """bf16 or fp16 autocast for train.precision=bf16|fp16 (CUDA), else a context that does nothing."""
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=precision in ("bf16", "fp16"))


def _backward(cfg, env, objective, student, target, x, draws, scaler, autocast):
    """The objective's loss over this rank's share, backpropagated in micro-batches of train.micro_batch
    (gradient accumulation: the mean of the micro losses); the loss and diagnostics of the whole share."""
    micro_batches = _micro_batches(student, x.shape[0], cfg.train.micro_batch, env.enabled)
    losses, diags = [], []
    for samples, sync in micro_batches:
        with sync:
            with autocast:
                loss, diag = objective.loss(student, x[samples], draws[samples], target=target)
            scaler.scale(loss / len(micro_batches)).backward()
        losses.append(loss.detach())
        diags.append(diag)
    return torch.stack(losses).mean(), {k: torch.stack([d[k] for d in diags]).mean() for k in diags[0]}


# -- set-up ---------------------------------------------------------------------------------------
def _configure_precision(precision: str, device: torch.device) -> None:
    """TF32 is on for tf32/bf16/fp16 (the paper trains in TF32)."""
    check_precision(precision, device)
    if device.type == "cuda":
        tf32 = precision != "fp32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def ema_decay_at(update: int, decay: float, power: float, inv_gamma: float) -> float:
    """The decay ema-pytorch applies at its `update`-th update, counted from 0 (update 0 copies the weights,
    training step 1): min(decay, 1 - (1 + update / inv_gamma)^-power) (imm.config.EMAConfig)."""
    if update < 1:
        return 0.0
    return min(decay, 1.0 - (1.0 + update / inv_gamma) ** -power)


def _say_ema(e, steps: int) -> None:
    """Log the step from which the evaluation EMA uses ema.decay; warn when the run ends before it."""
    full = math.ceil(e.inv_gamma * ((1.0 - e.decay) ** (-1.0 / e.power) - 1.0) - 1e-6) + 1  # the step it begins
    if full > steps:  # the stated decay is never used: say which one is
        log.warning(
            "ema.decay=%g is reached at step %d (ema.power=%g, ema.inv_gamma=%g), after train.steps=%d;"
            " the last step uses %.6g",
            e.decay,
            full,
            e.power,
            e.inv_gamma,
            steps,
            ema_decay_at(steps - 1, e.decay, e.power, e.inv_gamma),
        )
    else:
        log.info("evaluation EMA: decay %g from step %d of %d", e.decay, full, steps)


def _init(cfg, net, run_dir: Path) -> None:
    """init=DIR|FILE: the weights the training starts from (step 0, a fresh optimizer; the EMAs copy them); a
    resume continues its own weights instead."""
    if not cfg.init or checkpoint.resolve(cfg.resume, run_dir) is not None:
        return
    weights, what = checkpoint.init_for(cfg.init, net.state_dict(), cfg.arch.name)
    net.load_state_dict(weights)
    log.info("weights from %s (init=%s)", what, cfg.init)


def _emas(cfg, net) -> tuple[EMA, EMA | None]:
    """The evaluation EMA (ema.*) and, with target.kind=ema, the EMA that serves as theta^-."""
    e = cfg.ema
    _say_ema(e, cfg.train.steps)
    ema = EMA(
        net,
        beta=e.decay,
        power=e.power,
        inv_gamma=e.inv_gamma,
        update_every=e.update_every,
        update_after_step=0,
        include_online_model=False,
    )
    if cfg.target.kind != "ema":
        return ema, None
    target = EMA(
        net, beta=cfg.target.ema_decay, update_after_step=0, update_every=1, power=1.0, include_online_model=False
    )
    return ema, target


def _batches(cfg, bundle, env, device) -> ResumableBatches:
    """This rank's share of every global batch, in a resumable order from (train.seed, epoch)."""
    return ResumableBatches(
        bundle.train,
        cfg.train.batch_size,
        seed=cfg.train.seed,
        rank=env.rank,
        world_size=env.world_size,
        num_workers=cfg.data.num_workers,
        pin_memory=cfg.data.pin_memory and device.type == "cuda",
        persistent_workers=cfg.data.num_workers > 0,
    )


def _student_and_target(cfg, net, target_ema, env, device):
    """The network the loss differentiates (compiled, DDP-wrapped) and the one theta^- runs through."""
    student = torch.compile(net) if cfg.train.compile else net
    if env.enabled:
        student = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    if target_ema is not None:
        return student, target_ema.ema_model
    return student, torch.compile(net) if cfg.train.compile else net


def _read_run_id(run_dir: Path) -> str | None:
    p = run_dir / RUN_ID_FILE
    return p.read_text().strip() or None if p.is_file() else None


def _micro_batches(student, n: int, micro: int | None, ddp: bool) -> list:
    """(samples, context) for each micro-batch of train.micro_batch of this rank's n samples (one when
    null); under DDP all but the last run in no_sync, so the gradients are all-reduced once per step."""
    size = micro or n
    return [
        (slice(a, a + size), student.no_sync() if ddp and a + size < n else contextlib.nullcontext())
        for a in range(0, n, size)
    ]


def _step_seed(seed: int, step: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# -- tracking and outputs ---------------------------------------------------------------------------
def _run_tags(run_dir: Path, device, env, ckpt_path, step: int) -> dict[str, str]:
    """Where the run runs, and the checkpoint an attempt resumed from (a tag per resume)."""
    tags = {"run_dir": str(run_dir.resolve()), "device": str(device), "world_size": str(env.world_size)}
    return tags if ckpt_path is None else {**tags, f"resumed_from_step_{step}": str(ckpt_path)}


def _open_tracker(cfg, run_dir: Path, uri: str, run_name: str, saved, tags: dict, bundle, net, command) -> Tracker:
    """Create the MLflow run (or reopen the run directory's, or a requeued job's checkpoint's before its first save)
    with `tags`, the source and the description of `command`, its records journaled in the run directory (the
    loop never waits on the store: imm.tracking.writer); record its id there and start its system metrics."""
    command = list(command or sys.argv)
    tags = {**source_tags(command[0]), **note_tag(run_description(cfg, bundle, net, command)), **tags}
    run_id = _read_run_id(run_dir) or (saved or {}).get("mlflow_run_id")
    tracker = Tracker.open(
        uri,
        cfg.tracking.experiment,
        run_name=run_name,
        run_id=run_id,
        params=flatten(cfg),
        tags=tags,
        journal=run_dir / JOURNAL,
        flush_timeout=cfg.tracking.flush_timeout,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    with replacing(run_dir / RUN_ID_FILE) as tmp:  # a full disk: the id a relaunch reopens stays
        tmp.write_text(tracker.run_id + "\n")
    if run_id is None:
        tracker.log_text(OmegaConf.to_yaml(cfg), "config.yaml")
        tracker.log_text(str(checkpoint.ckpt_dir(run_dir).resolve()) + "\n", "checkpoints.txt")
        tracker.log_text(str(checkpoint.snapshot_dir(run_dir).resolve()) + "\n", "snapshots.txt")
        tracker.log_dataset(
            name=bundle.name,
            digest=data_digest(bundle),
            source=cfg.data.path or cfg.data.root or f"imm.data.build_dataset({bundle.name!r})",
            shape=bundle.shape,
            rows=len(bundle.train),
            num_classes=bundle.num_classes,
        )
    if cfg.tracking.system_metrics:
        tracker.start_system_metrics(uri, cfg.tracking.system_metrics_every, resume=run_id is not None)
    return tracker


def _log_start(cfg, env, run_dir: Path, net, tracker: Tracker, uri, step: int) -> None:
    if not env.is_main:
        return
    n_params = count_parameters(net)
    log.info("run directory: %s", run_dir.resolve())
    log.info("network: %s, %.2fM parameters", cfg.arch.name, n_params / 1e6)
    if tracker.enabled:
        log.info("MLflow run %s in %s (experiment %r)", tracker.run_id, uri, cfg.tracking.experiment)
        tracker.log_metrics({"model/parameters": n_params}, step)


def _checkpoint_extras(cfg, bundle, tracker: Tracker) -> dict:
    """What a checkpoint holds besides the training state: enough to sample from it without the data."""
    return {
        "config": OmegaConf.to_yaml(cfg),
        "mlflow_run_id": tracker.run_id,
        "shape": list(bundle.shape),
        "num_classes": bundle.num_classes,
        "standardizer": bundle.standardizer.state_dict() if bundle.standardizer else None,
        "latents": bundle.latents.state_dict() if bundle.latents else None,  # data=latents: how to decode
    }


def _save(state: checkpoint.CheckpointIO, device, run_dir: Path, env, cfg, step: int, extras: dict) -> None:
    """A full training state at `step` (main process), then every rank waits for it."""
    if env.is_main:
        path = checkpoint.save(state.state_dict(device, step=step, **extras), run_dir, step, cfg.train.keep_last)
        log.info("checkpoint %s", path)
    distributed.barrier(env)


def _rescue(state: checkpoint.CheckpointIO, device, run_dir: Path, env, cfg, extras: dict, mark: dict, step: int):
    """After an exception ended the loop: the training state of `step`, the last completed step, unless a
    checkpoint of it exists (main process; no rank waits: the others may be gone). An error inside the next step
    leaves the state as that step found it but for the batch it took and its dropout draws: those are put back
    from `mark` (what the step saw when it began), so the same command resumes exactly there."""
    if not env.is_main or ((newest := checkpoint.resolve(None, run_dir)) and newest.name == f"step-{step:08d}.pt"):
        return
    values = state.state_dict(device, step=step, **extras)
    if mark.get("step") == step:
        values.update(data=mark["data"], rng=mark["rng"])
    path = checkpoint.save(values, run_dir, step, cfg.train.keep_last)
    log.info("checkpoint %s (the last completed step before the error)", path)


def _snapshot(state: checkpoint.CheckpointIO, run_dir: Path, env, step: int, extras: dict) -> None:
    """The EMA weights at `step` with what sampling needs (main process; small, so no rank waits for it)."""
    if env.is_main:
        log.info("snapshot %s", checkpoint.save_snapshot(state.snapshot_dict(step=step, **extras), run_dir, step))


def _snapshot_for_best(cfg, state, run_dir: Path, env, extras: dict, at: int) -> Path | None:
    """The EMA snapshot of step `at` for a best to link to (written if train.snapshot_every did not); None:
    snapshots are off (train.snapshot_every=0)."""
    if not cfg.train.snapshot_every:
        return None
    if not checkpoint.snapshot_path(run_dir, at).is_file():
        _snapshot(state, run_dir, env, at, extras)
    return checkpoint.snapshot_path(run_dir, at)


def _evaluate(evaluator: Evaluator | None, model, tracker: Tracker, run_dir: Path, step: int) -> dict:
    """The evaluator's metrics and figures for `model` (main process only), logged at `step`."""
    if evaluator is None:
        return {}
    results, figs, _ = evaluator(model)
    tracker.log_metrics(results, step)
    for name, fig in figs.items():
        fig_path = run_dir / name.replace("figures/", f"figures/step{step:08d}-")
        with skipped("figure not saved; training goes on", fig_path, partial=fig_path):
            fig_path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(fig_path, dpi=110)
        if fig_path.is_file():
            tracker.log_artifact(fig_path, "figures")
    shown = ", ".join(f"{k[5:]}={v:.4g}" for k, v in results.items() if k.split("/")[1].startswith(SHOWN))
    log.info("eval @ %d: %s", step, shown)
    return results


def _track_best(best: dict, results: dict, step: int, tracker: Tracker, run_dir: Path, snapshot) -> None:
    """best/<metric>: the lowest value so far of each lower-is-better metric (per step count). A new best
    of a step count's primary metric (metrics.primary_metrics: ED/floor for points, the classifier metric or
    FID for images) links snapshots/best-<N>step.pt to this step's EMA snapshot (`snapshot(step)`) and
    logs best_step/<metric>: the 1-step best and the 8-step best are different checkpoints."""
    if not results:
        return
    primary = {name: key for key, name in primary_metrics(results).items()}  # {metric: "2step", "1step_w1.5"}
    for k, v in results.items():
        name = f"best/{k[5:]}"
        if not lower_is_better(k) or v >= best.get(name, math.inf):
            continue
        best[name] = v
        if k in primary and (path := snapshot(step)) is not None:
            best[f"best_step/{k[5:]}"] = step
            checkpoint.link_best(run_dir, primary[k], path)
            tracker.log_metrics({f"best_step/{k[5:]}": step}, step)
    checkpoint.write_best(run_dir, best)
