"""`dry_run=true`: the checks a launch makes before it trains, and nothing else.

A dry run composes the config and checks it with the functions training uses (imm.validation.validate for
the world size the job will have, the device and precision, the tracking server, the run directory's
checkpoint and experiment, the data), builds the network on the meta device (no memory, no init) and
prints its parameter count, the data shape, the world size and the run directory. A multirun (-m)
checks every job in the launching process, one line each, and for the SLURM launcher prints the sbatch
script submitit would submit. Nothing is trained, nothing is written to MLflow, nothing is queued, and
no checkpoint or run directory is left behind. A job that fails a check prints its sentence; the
dry run then exits with status 2.
Not checked (they need the run's own machine or minutes of work): FID reference statistics and
Inception weights; a sweep job's directory held by a live process (a single run's is refused before Hydra
writes anything, imm.launch.job.RunDirCheck).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict

from imm import factory, runs
from imm.errors import ConfigError, UserError
from imm.launch import overrides as typed
from imm.launch.job import remove_empty, tracking_uri
from imm.nets import count_parameters
from imm.tracking.mlflow_run import check_store
from imm.training import checkpoint, distributed
from imm.validation import check_precision, check_same_run, check_steps_reached, load_data, validate

SUBMITIT = "hydra_plugins.hydra_submitit_launcher.submitit_launcher."


def check(cfg, *, world_size: int, device, run_dir: Path) -> dict:
    """Everything a launch checks before training (raising the same one-sentence errors), with what it found."""
    validate(cfg, world_size)
    check_precision(cfg.train.precision, device)
    state = _run_dir_state(cfg, run_dir)
    bundle = load_data(cfg)
    with torch.device("meta"):  # the shapes without the memory or the initialisation
        net = factory.net(cfg, bundle.shape, bundle.num_classes)
    if cfg.init and state == "starts at step 0":  # the weights a new run starts from must fit its network
        checkpoint.init_for(cfg.init, net.state_dict(), cfg.arch.name)
    return {
        "parameters": count_parameters(net),
        "data": bundle,
        "world_size": world_size,
        "device": str(device),
        "run_dir": run_dir,
        "state": state,
    }


def _run_dir_state(cfg, run_dir: Path) -> str:
    """What a launch would do in run_dir: start, resume (the same experiment only) or nothing."""
    path = checkpoint.resolve(cfg.resume, run_dir)
    saved = checkpoint.load(path) if path is not None else None
    if saved is not None:
        check_same_run(cfg, saved["config"], path)
    if runs.finished(last := runs.read_status(run_dir), cfg.train.steps):
        return f"FINISHED at step {last['step']} before: a launch would do nothing"
    if saved is not None:
        check_steps_reached(cfg, saved["step"], path)
    return f"resumes from {path} at step {saved['step']}" if saved else "starts at step 0"


def _data_text(bundle) -> str:
    kind = f"{bundle.num_classes} classes" if bundle.num_classes else "unconditional"
    return f"{bundle.name}: {len(bundle.train)} samples of shape {tuple(bundle.shape)}, {kind}"


# -- a single run ----------------------------------------------------------------------------------------
def run(cfg, hc) -> dict:
    """`python launch.py ... dry_run=true`: check this run and print what a launch would do (stdout)."""
    env = distributed.detect()
    run_dir = Path(hc.runtime.output_dir)
    try:
        uri = tracking_uri(cfg, hc.runtime.cwd)
        if cfg.tracking.enabled:
            check_store(uri)
        found = check(cfg, world_size=env.world_size, device=factory.device(cfg.train.device), run_dir=run_dir)
    finally:
        remove_empty(run_dir, Path(hc.runtime.cwd))
    lines = [
        "dry run: the checks a launch makes passed; nothing was trained, logged to MLflow or queued.",
        f"  network     {cfg.arch.name}: {found['parameters']:,} parameters",
        f"  data        {_data_text(found['data'])}",
        f"  world size  {found['world_size']}",
        f"  device      {found['device']} ({cfg.train.precision})",
        f"  run dir     {run_dir.resolve()} ({found['state']})",
        f"  MLflow      {uri}, experiment {cfg.tracking.experiment!r}" if cfg.tracking.enabled else "  MLflow      off",
    ]
    print("\n".join(lines), flush=True)
    return {}


# -- a multirun ------------------------------------------------------------------------------------------
def sweep(hydra_context, config, launcher, jobs, *, keys=None) -> list:
    """`python launch.py -m ... dry_run=true`: check every job as its launcher would run it, one line each."""
    from hydra.errors import HydraException

    world_size, device = launcher_target(launcher)
    str(config.hydra.sweep.dir)  # resolved (and cached) in the launching config, which every job's copies
    print(
        f"dry run of {len(jobs)} job(s) on {type(launcher).__name__} (world size {world_size}, {device});"
        " nothing is trained, logged to MLflow or queued.",
        flush=True,
    )
    failed, passed = 0, 0
    try:
        if config.tracking.enabled:
            check_store(tracking_uri(config, config.hydra.runtime.cwd))
    except UserError as e:
        print(f"tracking: {e}", flush=True)
        failed += 1
    for num, overrides in enumerate(jobs):
        swept = [o for o in overrides if keys is None or runs.override_key(o) in keys]
        shown = " ".join(swept or overrides)
        try:
            cfg = hydra_context.config_loader.load_sweep_config(config, list(overrides))
            with open_dict(cfg.hydra.job):
                cfg.hydra.job.num = num
            run_dir = Path(cfg.hydra.sweep.dir) / str(cfg.hydra.sweep.subdir)
            found = check(cfg, world_size=world_size, device=_job_device(cfg, device), run_dir=run_dir)
        except (UserError, HydraException) as e:
            print(f"job {num} {shown}: {typed.sentence(e, list(overrides)) or e}", flush=True)
            failed += 1
            continue
        bundle = found["data"]
        print(
            f"job {num} {shown}: ok; {cfg.arch.name} {found['parameters']:,} parameters; data {tuple(bundle.shape)}"
            f" x {len(bundle.train)}; run dir {run_dir} ({found['state']})",
            flush=True,
        )
        passed += 1
    if _launcher_name(launcher) == SUBMITIT + "SlurmLauncher":
        print(f"the sbatch script submitit would submit:\n{sbatch_script(launcher.params, len(jobs))}", flush=True)
    print(f"{passed} of {len(jobs)} job(s) passed the checks.", flush=True)
    if failed:
        sys.exit(2)
    return []


def launcher_target(launcher) -> tuple[int, str]:
    """The world size and device type of one job on this launcher (submitit: its nodes x tasks per node,
    on the GPUs it asks for; Hydra's basic launcher: this process)."""
    name = _launcher_name(launcher)
    if not name.startswith(SUBMITIT):
        return distributed.detect().world_size, "local"
    p = launcher.params
    world_size = int(p.get("nodes") or 1) * int(p.get("tasks_per_node") or 1)
    if name.endswith("SlurmLauncher"):
        return world_size, "cuda" if int(p.get("gpus_per_node") or 0) > 0 else "cpu"
    return world_size, "local"


def _launcher_name(launcher) -> str:
    return f"{type(launcher).__module__}.{type(launcher).__name__}"


def _job_device(cfg, device: str):
    """The device a job gets: here for local jobs, the launcher's GPUs or CPUs for SLURM jobs."""
    if device == "local":
        return factory.device(cfg.train.device)
    if cfg.train.device.startswith("cuda") and device != "cuda":
        raise ConfigError(
            f"train.device={cfg.train.device} but the SLURM jobs get no GPU (hydra.launcher.gpus_per_node=0);"
            " ask for GPUs or use train.device=auto."
        )
    return torch.device(device)


def sbatch_script(params: dict, n_jobs: int) -> str:
    """The sbatch script the SLURM launcher's submitit executor would write for n_jobs jobs (an array when
    more than one), built the way hydra-submitit-launcher builds its executor; nothing is submitted."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    init_keys = ("submitit_folder", "max_num_timeout")
    try:
        executor = submitit.AutoExecutor(
            cluster="slurm", folder=params["submitit_folder"], slurm_max_num_timeout=params["max_num_timeout"]
        )
    except RuntimeError as e:  # no srun on this machine
        return f"(not rendered here: {e}; run the dry run where sbatch and srun are installed)"
    shared = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(
        **{k if k in shared else f"slurm_{k}": v for k, v in params.items() if k not in init_keys}
    )
    slurm = executor._executor
    if n_jobs > 1:
        slurm.parameters["map_count"] = n_jobs
    return slurm._make_submission_file_text(slurm._submitit_command_str, "dry-run")
