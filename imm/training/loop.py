"""The training loop. Reads top to bottom: set up, restore, loop, finish.

Everything random is reproducible and resumable: the objective's draws (times, noise, label drops)
come from a generator re-seeded from (train.seed, step) at every step, the data order from
(train.seed, epoch) with the position saved, and the global RNG (dropout) is saved in checkpoints.
Relaunching the same command in the same run directory resumes where the last checkpoint left off.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
import time
from pathlib import Path

import torch
from ema_pytorch import EMA
from omegaconf import OmegaConf

from imm import factory
from imm.config import ConfigError, validate
from imm.data import ResumableBatches
from imm.evaluation.evaluate import Evaluator
from imm.tracking.mlflow_run import Tracker, check_reachable, flatten, git_tags
from imm.training import checkpoint, distributed
from imm.training.signals import Interrupted, StopFlag

log = logging.getLogger("imm.train")

RUN_ID_FILE = "mlflow_run_id"

# Keys that may differ when a run is resumed (longer training, other logging, another machine).
RESUMABLE_KEYS = (
    "resume",
    "train.steps",
    "train.log_every",
    "train.ckpt_every",
    "train.keep_last",
    "train.device",
    "train.threads",
    "train.compile",
    "eval.",
    "tracking.",
    "data.num_workers",
    "data.root",
    "data.path",
    "data.download",
    "hydra",
)


def train(cfg, run_dir, *, tracking_uri: str | None = None, run_name: str = "", extra_tags=None) -> dict:
    """Train according to `cfg`, writing checkpoints and figures under run_dir; returns final metrics."""
    run_dir = Path(run_dir)
    env = distributed.detect()
    if not env.is_main:  # one process owns the logs, files and MLflow
        logging.getLogger("imm").setLevel(logging.WARNING)
    validate(cfg, env.world_size)
    device = _device(cfg.train.device, env)
    _configure_precision(cfg.train.precision, device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if env.is_main and cfg.tracking.enabled:
        check_reachable(tracking_uri)  # a dead server costs seconds, not a queued job

    # -- data, network, objective, optimizer (all before any run is created) -------------------
    bundle = factory.dataset(cfg)
    if cfg.eval.guidance != 1.0 and bundle.num_classes == 0:
        why = (
            f"data.use_labels=false trains data.name={cfg.data.name!r} unconditionally"
            if not cfg.data.use_labels
            else f"data.name={cfg.data.name!r} has no labels"
        )
        raise ConfigError(
            f"eval.guidance={cfg.eval.guidance} needs class-conditional data, but {why}; use"
            f" eval.guidance=1{' or data.use_labels=true' if not cfg.data.use_labels else ''}."
        )
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    net = factory.net(cfg, bundle.shape, bundle.num_classes).to(device)
    objective = factory.objective(cfg, bundle.num_classes, env.rank, env.world_size)
    optimizer = factory.optimizer(cfg, net.parameters(), device)
    ema = EMA(
        net,
        beta=cfg.ema.decay,
        power=cfg.ema.power,
        inv_gamma=cfg.ema.inv_gamma,
        update_every=cfg.ema.update_every,
        update_after_step=0,
        include_online_model=False,
    )
    target_ema = (
        EMA(net, beta=cfg.target.ema_decay, update_after_step=0, update_every=1, power=1.0, include_online_model=False)
        if cfg.target.kind == "ema"
        else None
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    batches = ResumableBatches(
        bundle.train,
        cfg.train.batch_size,
        seed=cfg.train.seed,
        rank=env.rank,
        world_size=env.world_size,
        num_workers=cfg.data.num_workers,
        pin_memory=cfg.data.pin_memory and device.type == "cuda",
        persistent_workers=cfg.data.num_workers > 0,
    )
    distributed.init(env, device)
    student = net
    if cfg.train.compile:
        student = torch.compile(net)
    if env.enabled:
        student = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    target = target_ema.ema_model if target_ema else (torch.compile(net) if cfg.train.compile else net)

    # -- restore ----------------------------------------------------------------------------------
    step, run_id, state, resumed_tags = 0, None, None, {}
    ckpt_path = checkpoint.resolve(cfg.resume, run_dir)
    if ckpt_path is not None:
        state = checkpoint.load(ckpt_path)
        resumed_tags = _check_same_run(cfg, state["config"], ckpt_path)
        net.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        if target_ema is not None:
            target_ema.load_state_dict(state["target_ema"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        batches.load_state_dict(state["data"])
        step, run_id = state["step"], state.get("mlflow_run_id")
        log.info("resumed from %s at step %d", ckpt_path, step)
    run_id = _read_run_id(run_dir) or run_id  # a job requeued before its first checkpoint reopens its run too
    torch.manual_seed(cfg.train.seed + 1000 * env.rank)  # dropout streams differ per rank
    if state is not None:
        torch.set_rng_state(state["rng"]["cpu"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)

    stop = StopFlag()  # before the MLflow run exists: a signal from here on ends it KILLED, never RUNNING
    tracker = Tracker.disabled()
    if env.is_main and cfg.tracking.enabled:
        tags = {
            "run_dir": str(run_dir.resolve()),
            "device": str(device),
            "world_size": str(env.world_size),
            **git_tags(),
            **(extra_tags or {}),
            **resumed_tags,
        }
        if ckpt_path is not None:
            tags[f"resumed_from_step_{step}"] = str(ckpt_path)
        tracker = Tracker.open(
            tracking_uri, cfg.tracking.experiment, run_name=run_name, run_id=run_id, params=flatten(cfg), tags=tags
        )
        (run_dir / RUN_ID_FILE).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_ID_FILE).write_text(tracker.run_id + "\n")
        if run_id is None:
            tracker.log_text(OmegaConf.to_yaml(cfg), "config.yaml")
            tracker.log_text(str(checkpoint.ckpt_dir(run_dir).resolve()) + "\n", "checkpoints.txt")
    evaluator = Evaluator.from_config(cfg, bundle, objective.param, device=device) if env.is_main else None
    if env.is_main:
        log.info("run directory: %s", run_dir.resolve())
        log.info("network: %s, %.2fM parameters", cfg.arch.name, sum(p.numel() for p in net.parameters()) / 1e6)
        if tracker.enabled:
            log.info("MLflow run %s in %s (experiment %r)", tracker.run_id, tracking_uri, cfg.tracking.experiment)
            tracker.log_metrics({"model/parameters": sum(p.numel() for p in net.parameters())}, step)

    def save():
        if env.is_main:
            rng = {
                "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            }
            path = checkpoint.save(
                {
                    "step": step,
                    "model": net.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "target_ema": target_ema.state_dict() if target_ema else None,
                    "scaler": scaler.state_dict(),
                    "data": batches.state_dict(),
                    "rng": rng,
                    "config": OmegaConf.to_yaml(cfg),
                    "mlflow_run_id": tracker.run_id,
                    "shape": list(bundle.shape),
                    "num_classes": bundle.num_classes,
                    "standardizer": bundle.standardizer.state_dict() if bundle.standardizer else None,
                },
                run_dir,
                step,
                cfg.train.keep_last,
            )
            log.info("checkpoint %s", path)
        distributed.barrier(env)

    def evaluate():
        if evaluator is None:
            return {}
        results, figs, _ = evaluator(ema.ema_model)
        tracker.log_metrics(results, step)
        for name, fig in figs.items():
            fig_path = run_dir / name.replace("figures/", f"figures/step{step:08d}-")
            fig_path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(fig_path, dpi=110)
            tracker.log_artifact(fig_path, "figures")
        log.info(
            "eval @ %d: %s",
            step,
            ", ".join(f"{k[5:]}={v:.4g}" for k, v in results.items() if "energy_ratio" in k or "recall" in k),
        )
        return results

    # -- the loop -----------------------------------------------------------------------------------
    status, summary, best = "FAILED", {}, {}
    bar = _progress(step, cfg.train.steps, env)
    generator = torch.Generator(device)
    loss_sum, n_logged, nonfinite_run, skipped = torch.zeros((), device=device), 0, 0, 0
    t_last, samples_since = time.perf_counter(), 0
    autocast = torch.autocast(
        device.type,
        dtype=torch.float16 if cfg.train.precision == "fp16" else torch.bfloat16,
        enabled=cfg.train.precision in ("bf16", "fp16"),
    )
    try:
        while step < cfg.train.steps:
            x, labels = next(batches)
            x = x.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True) if labels is not None else None
            generator.manual_seed(_step_seed(cfg.train.seed, step))
            for group in optimizer.param_groups:
                group["lr"] = factory.lr_at(cfg, step)
            with autocast:
                loss, diag = objective(student, x, labels, target=target, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
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
                nonfinite_run = 0
                loss_sum += loss.detach()
                n_logged += 1
            else:
                nonfinite_run, skipped = nonfinite_run + 1, skipped + 1
                bad = "loss" if not torch.isfinite(loss) else "gradient norm"
                log.warning("step %d: non-finite %s, step skipped (%d in a row)", step, bad, nonfinite_run)
                tracker.log_metrics({"train/skipped_steps": skipped}, step + 1)
                if nonfinite_run >= cfg.train.max_nonfinite:
                    terms = [k for k, v in diag.items() if not torch.isfinite(v)] or [
                        f"the gradient of {n}"
                        for n, p in net.named_parameters()
                        if p.grad is not None and not torch.isfinite(p.grad).all()
                    ][:1]
                    raise FloatingPointError(
                        f"step {step}: the {bad} went non-finite {nonfinite_run} steps in a row"
                        f" (train.max_nonfinite={cfg.train.max_nonfinite}); non-finite terms:"
                        f" {', '.join(terms) or 'none on this process'}; the last good"
                        f" checkpoint is {checkpoint.resolve(None, run_dir) or 'none yet'}; lower optim.lr or check the"
                        " data."
                    )
            step += 1
            samples_since += cfg.train.batch_size
            if bar:
                bar.update(1)

            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                now = time.perf_counter()
                metrics = {
                    "train/loss": distributed.mean(env, loss_sum / max(n_logged, 1)).item(),
                    "train/grad_norm": grad_norm.item(),
                    "train/lr": optimizer.param_groups[0]["lr"],
                    "train/skipped_steps": skipped,
                    "train/samples_per_s": samples_since / (now - t_last),
                }
                metrics.update({f"diag/{k}": v.item() for k, v in diag.items()})
                tracker.log_metrics(metrics, step)
                _report(bar, step, cfg.train.steps, metrics)
                loss_sum.zero_()
                n_logged, t_last, samples_since = 0, now, 0
                summary["final/loss"] = metrics["train/loss"]
            if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
                _track_best(best, evaluate())
            if step % cfg.train.ckpt_every == 0 and step < cfg.train.steps:
                save()
            if stop_signum is not None:
                stop.request(stop_signum)
                save()
                stop.hand_over()  # submitit requeues on preemption; otherwise raises Interrupted
        save()
        final = evaluate()
        _track_best(best, final)
        summary.update({f"final/{k[5:]}": v for k, v in final.items()})
        summary.update(best)
        tracker.log_metrics(summary, step)
        status = "FINISHED"
        return summary
    except (Interrupted, KeyboardInterrupt, SystemExit):  # SystemExit: submitit exits after requeueing
        status = "KILLED"
        raise
    finally:
        stop.restore()
        if bar:
            bar.close()
        tracker.end(status)
        distributed.shutdown(env)
        if env.is_main:
            _where(run_dir, tracking_uri if tracker.enabled else None, tracker.run_id, status)


# ------------------------------------------------------------------------------------------------
def _device(name: str, env) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{env.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA device is available; use train.device=auto or cpu.")
    return device


def _configure_precision(precision: str, device: torch.device) -> None:
    """Mixed precision and TF32 are CUDA-only; TF32 is on for tf32/bf16/fp16 (the paper trains in TF32)."""
    if precision != "fp32" and device.type != "cuda":
        raise ConfigError(
            f"train.precision={precision} needs a CUDA device, but this run is on {device}; use train.precision=fp32."
        )
    if device.type == "cuda":
        tf32 = precision != "fp32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def _read_run_id(run_dir: Path) -> str | None:
    p = run_dir / RUN_ID_FILE
    return p.read_text().strip() or None if p.is_file() else None


def _step_seed(seed: int, step: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _check_same_run(cfg, saved_yaml: str, path) -> dict[str, str]:
    """Resuming must continue the same experiment: only RESUMABLE_KEYS may differ. Returns those that
    did, as tags (MLflow params are logged once, when the run is created, and cannot change)."""
    saved = flatten(OmegaConf.create(saved_yaml))
    now = flatten(cfg)
    changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    for k in changed:
        if not k.startswith(RESUMABLE_KEYS):
            raise ConfigError(
                f"{path} belongs to a run with a different config ({k} was {saved.get(k)!r}, now"
                f" {now.get(k)!r}); start a new run directory instead of resuming this one."
            )
    return {f"resumed.{k}": str(now.get(k)) for k in changed}


def _track_best(best: dict, results: dict) -> None:
    for k, v in results.items():
        if ("energy" in k or "sw2" in k or "fid" in k) and not k.endswith("floor") and "_sd_" not in k:
            name = f"best/{k[5:]}"
            best[name] = min(best.get(name, math.inf), v)


def _progress(start: int, total: int, env):
    if not env.is_main or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, dynamic_ncols=True, desc="train")


def _report(bar, step: int, total: int, metrics: dict) -> None:
    if bar is not None:
        bar.set_postfix(loss=f"{metrics['train/loss']:.4g}", sps=f"{metrics['train/samples_per_s']:.0f}")
    else:
        log.info(
            "step %d/%d loss %.5g grad %.3g lr %.3g %.0f samples/s",
            step,
            total,
            metrics["train/loss"],
            metrics["train/grad_norm"],
            metrics["train/lr"],
            metrics["train/samples_per_s"],
        )


def _where(run_dir: Path, uri, run_id, status: str) -> None:
    lines = [
        f"run {status.lower()}: checkpoints in {checkpoint.ckpt_dir(run_dir).resolve()},"
        f" figures in {(run_dir / 'figures').resolve()}"
    ]
    if uri:
        lines.append(f"MLflow run {run_id} in {uri}; open the UI with: mlflow ui --backend-store-uri {uri}")
    for line in lines:
        log.info(line)
