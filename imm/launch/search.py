"""Bayesian hyperparameter search (`hydra/sweeper=optuna`, the `+sweep=search` preset) on optuna's ask/tell API.

Why not hydra-optuna-sweeper: its last release (1.3.0) requires optuna < 3, and optuna 2.10's database
storage fails on the SQLAlchemy 2 that MLflow 3 installs (it asserts on its schema version while
creating the study; docs/clusters.md has the record), so an SQLite study would mean pinning
SQLAlchemy and alembic below what MLflow uses; it also wants the job to return one float and it waits
for a whole batch of trials before asking for the next (Hydra issue 3091).

How this one works:
- The search space is `hydra.sweeper.params` (and sweep overrides on the command line) in Hydra's
  sweep syntax, as hydra-optuna-sweeper reads it: `choice(a,b)` or `a,b` (categorical),
  `range(lo,hi[,step])` (integers lo..hi-1), `interval(lo,hi)` (floats; `int(interval(..))` integers,
  `tag(log, interval(..))` log-uniform); any other override is fixed for every trial.
- The study lives in an SQLite file beside the MLflow store (`optuna.db` next to `mlflow.db`), named
  after the sweep directory (`multirun/<sweep>/<hash>`): running the same command again continues it,
  until it holds `n_trials` trials (a trial whose sweeper process died is marked FAIL and replaced).
- Parallel trials: start several sweeper processes with the same command (on one machine); each asks
  for a trial, launches it, tells its result. `n_jobs` trials per process are launched together and
  the next batch waits for the slowest of them, so n_jobs=1 and N processes keep N jobs busy.
- A trial is job number <trial number> in the sweep directory, a child run of the sweep's MLflow parent
  run (imm/launch/sweep.py), and its objective is `metric` from the run's final summary.
- Before the first trial the corners of the space (every categorical value, the ends of every range)
  are validated, so a bad bound fails in one sentence, not as a crashed trial; `dry_run=true` checks
  those jobs fully and launches nothing (imm/launch/dry_run.py).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from imm import runs
from imm.errors import ConfigError, UserError
from imm.launch import dry_run
from imm.metrics import find_metric
from imm.tracking.mlflow_run import client_for, default_uri, sqlite_lock, sqlite_path
from imm.validation import not_allowed, validate

log = logging.getLogger("imm.search")
SAMPLERS = ("tpe", "random")  # optuna.samplers.TPESampler, RandomSampler (_study)
DIRECTIONS = ("minimize", "maximize")
PROCESS_ATTR = "sweeper_process"  # the trial's user attribute naming the sweeper process that runs it
JOB_FAILED_ATTR = "job_failed"  # a FAIL trial whose job ran and failed (counts toward n_trials)


def search_space(params: dict | None, arguments) -> tuple[dict, list[str]]:
    """({key: optuna distribution}, [fixed overrides]) from the sweeper's params and the command line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    last = {o.get_key_element(): o for o in OverridesParser.create().parse_overrides(lines)}  # the command line wins
    space = {key: distribution(key, o.value()) for key, o in last.items() if o.is_sweep_override()}
    fixed = [f"{key}={o.get_value_element_as_str()}" for key, o in last.items() if not o.is_sweep_override()]
    return space, fixed


def distribution(key: str, sweep):
    """The optuna distribution of one Hydra sweep value (see the module docstring)."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(sweep, ChoiceSweep):
        return CategoricalDistribution(sweep.list)
    if isinstance(sweep, RangeSweep):  # Hydra's range excludes its stop
        n = math.ceil((sweep.stop - sweep.start) / sweep.step)
        if n < 1:
            raise ConfigError(f"{key}=range({sweep.start},{sweep.stop},{sweep.step}) is empty; give start < stop.")
        last = sweep.start + (n - 1) * sweep.step
        if all(isinstance(v, int) for v in (sweep.start, sweep.stop, sweep.step)):
            return IntDistribution(sweep.start, last, step=sweep.step)
        return FloatDistribution(sweep.start, last, step=sweep.step)
    if isinstance(sweep, IntervalSweep):
        log_scale = "log" in sweep.tags
        if isinstance(sweep.start, int) and isinstance(sweep.end, int):
            return IntDistribution(sweep.start, sweep.end, log=log_scale)
        return FloatDistribution(float(sweep.start), float(sweep.end), log=log_scale)
    raise ConfigError(f"{key}: {sweep} cannot be searched; use choice(...), range(...) or interval(...).")


def corners(space: dict) -> list[dict]:
    """Points that reach every categorical value and both ends of every range: job i takes value i of each
    categorical (cycling) and the low end of each range when i is even, the high end when odd."""
    from optuna.distributions import CategoricalDistribution

    n = max([2] + [len(d.choices) for d in space.values() if isinstance(d, CategoricalDistribution)])
    return [
        {
            key: d.choices[i % len(d.choices)] if isinstance(d, CategoricalDistribution) else (d.low, d.high)[i % 2]
            for key, d in space.items()
        }
        for i in range(n)
    ]


def job_overrides(fixed: list[str], params: dict) -> list[str]:
    return [
        *fixed,
        *(f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}" for key, value in params.items()),
    ]


def default_storage(config) -> str:
    """sqlite:///<the directory of the SQLite MLflow store>/optuna.db, else in the launch directory."""
    uri = config.tracking.uri or default_uri(config.hydra.runtime.cwd)
    db = sqlite_path(uri)
    folder = db.parent if db is not None else Path(config.hydra.runtime.cwd)
    return f"sqlite:///{folder.resolve() / 'optuna.db'}"


def run(sweeper, arguments) -> list:
    """The search: check the space, open (or continue) the study, ask, launch, tell, until it has n_trials."""

    try:
        return _run(sweeper, arguments)
    except UserError as e:  # a search that cannot run: one sentence, before any trial
        log.error("%s", e)
        sys.exit(2)


def _run(sweeper, arguments) -> list:
    opts, config = sweeper.options, sweeper.config
    space, fixed = search_space(opts["params"], arguments)
    _check_options(opts, space)
    sweep_dir = Path(config.hydra.sweep.dir)  # resolved once here: every job's config copies it
    jobs = [job_overrides(fixed, point) for point in corners(space)]
    if config.dry_run:
        return dry_run.sweep(sweeper.hydra_context, config, sweeper.launcher, jobs, keys=set(space))
    for job in jobs:  # the corners compose and validate before any trial runs
        cfg = sweeper.hydra_context.config_loader.load_sweep_config(config, job)
        try:
            validate(cfg, dry_run.launcher_target(sweeper.launcher)[0])
        except ConfigError as e:
            raise ConfigError(f"the search space reaches {' '.join(job[len(fixed) :])}, where {e}") from None

    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, sweep_dir / "multirun.yaml")
    storage = opts["storage"] or default_storage(config)
    study = _study(opts, storage, study_name=opts["study_name"] or str(sweep_dir))
    log.info(
        "search of %s %s over %s: study %r in %s, %d of %d trials there",
        opts["direction"],
        opts["metric"],
        ", ".join(space),
        study.study_name,
        storage,
        _counted(study),
        opts["n_trials"],
    )
    while trials := _ask(study, storage, space, opts):
        started = time.time()
        try:
            sweeper.launcher.launch([job_overrides(fixed, t.params) for t in trials], initial_job_idx=trials[0].number)
        except (Exception, SystemExit) as e:  # a failed job: its trial is FAIL below, the search goes on
            why = f"exit status {e.code}" if isinstance(e, SystemExit) else (str(e).splitlines() or [repr(e)])[0]
            log.info("a job of trials %s failed: %s", ", ".join(str(t.number) for t in trials), why)
        for trial in trials:  # the result is the run's own record: status.json in its job directory
            _tell(study, trial, runs.read_status(sweep_dir / str(trial.number)), started, opts["metric"])
    _report_best(study, opts["metric"], config)
    return []


def _check_options(opts: dict, space: dict) -> None:
    if not space:
        raise ConfigError(
            "hydra/sweeper=optuna has nothing to search; set hydra.sweeper.params (or give key=choice(...),"
            " range(...) or interval(...) on the command line)."
        )
    if not str(opts["metric"]).startswith(("final/", "best/")):
        raise ConfigError(
            f"hydra.sweeper.metric={opts['metric']} is not a result of a run; use a final/ or best/ metric such as"
            " final/energy_ratio_1step."
        )
    for key, allowed in (("direction", DIRECTIONS), ("sampler", SAMPLERS)):
        if opts[key] not in allowed:
            raise not_allowed(f"hydra.sweeper.{key}", opts[key], allowed)
    for key in ("n_trials", "n_jobs"):
        if not int(opts[key]) >= 1:
            raise ConfigError(f"hydra.sweeper.{key}={opts[key]} must be a positive integer.")


def _study(opts: dict, storage: str, study_name: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the search logs its own line per trial
    sampler = (optuna.samplers.TPESampler if opts["sampler"] == "tpe" else optuna.samplers.RandomSampler)(
        seed=opts["seed"]
    )
    # several sweeper processes write one SQLite file: wait for its lock instead of failing at once
    with sqlite_lock(storage):  # one sweeper process at a time creates the tables and the study, fails stale trials
        rdb = optuna.storages.RDBStorage(storage, engine_kwargs={"connect_args": {"timeout": 60}})
        study = optuna.create_study(
            storage=rdb, study_name=study_name, direction=opts["direction"], sampler=sampler, load_if_exists=True
        )
        _fail_stale(study)
    return study


def _fail_stale(study) -> None:
    """A trial left RUNNING by a sweeper process that died (on this host) is FAIL and no longer counts."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(PROCESS_ATTR)
        if owner and owner.get("host") == runs.this_process()["host"] and not runs.alive_here(owner):
            study.tell(t.number, state=TrialState.FAIL)
            log.info(
                "trial %d: its sweeper process %s is gone; marked FAIL, another trial replaces it",
                t.number,
                owner["pid"],
            )


def _counted(study) -> int:
    """Trials that count toward n_trials: all but the FAIL ones whose job never reported (their sweeper died)."""
    from optuna.trial import TrialState

    return sum(
        t.state != TrialState.FAIL or t.user_attrs.get(JOB_FAILED_ATTR, False) for t in study.get_trials(deepcopy=False)
    )


def _ask(study, storage: str, space: dict, opts: dict) -> list:
    """The next batch (at most n_jobs, up to the study's n_trials), with consecutive trial numbers."""
    with sqlite_lock(storage):  # consecutive trial numbers per batch: its jobs' numbers
        n = min(int(opts["n_jobs"]), int(opts["n_trials"]) - _counted(study))
        trials = [study.ask(space) for _ in range(max(n, 0))]
        for t in trials:
            t.set_user_attr(PROCESS_ATTR, runs.this_process())
    numbers = [t.number for t in trials]
    if numbers and numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        raise ConfigError(f"the study's trial numbers {numbers} are not consecutive; give each search its own study.")
    return trials


def _tell(study, trial, status: dict, since: float, metric: str) -> None:
    """The trial's value: `metric` of its run's summary (metrics.find_metric: a ratio named without its n
    means the one the run logged), if the run FINISHED in this launch; else FAIL."""
    from optuna.trial import TrialState

    shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    fresh = status.get("time", 0) >= since
    summary = status.get("summary", {})
    value = summary.get(find_metric(metric, summary)) if fresh and status.get("status") == "FINISHED" else None
    if value is None or not math.isfinite(value):
        trial.set_user_attr(JOB_FAILED_ATTR, True)
        study.tell(trial, state=TrialState.FAIL)
        why = f"{status.get('status')} at step {status.get('step')}" if fresh else "the job did not finish"
        if fresh and status.get("status") == "FINISHED":
            why = f"no finite {metric} among its results {sorted(status.get('summary', {}))}"
        log.info("trial %d %s: FAIL (%s)", trial.number, shown, why)
        return
    study.tell(trial, value)
    log.info("trial %d %s: %s=%.4g (best so far %.4g)", trial.number, shown, metric, value, study.best_value)


def _report_best(study, metric: str, config) -> None:
    """The best trial, in the log and as tags of the sweep's MLflow parent run."""
    try:
        best = study.best_trial
    except ValueError:  # no trial completed
        log.info("search finished: no trial completed")
        return
    params = " ".join(f"{k}={v}" for k, v in best.params.items())
    log.info("search finished: best trial %d, %s=%.4g, with %s", best.number, metric, best.value, params)
    parent = runs.sweep_info(config.hydra.sweep.dir).get("parent_run_id")
    if config.tracking.enabled and parent:
        client = client_for(config.tracking.uri or default_uri(config.hydra.runtime.cwd))
        for key, value in {
            "search.study": study.study_name,
            "search.best_trial": best.number,
            "search.best_value": best.value,
            "search.best_params": params,
        }.items():
            client.set_tag(parent, key, str(value))
