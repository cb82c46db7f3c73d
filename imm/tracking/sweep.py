"""One MLflow parent run per Hydra sweep, opened by the launching process before any job starts.

The launching process also creates (or migrates) the tracking store once: jobs starting together
on a fresh SQLite store otherwise race on creating its schema (seen: `sqlite3.OperationalError:
duplicate column name: step`, one job lost). The parent run id and the swept keys
are written to `<sweep dir>/sweep.json` where every job, local or on a cluster node, finds them; jobs
log child runs tagged with it (`mlflow.parentRunId`, `sweep.id`), named after their swept values.
"""

from __future__ import annotations

import atexit
import json
import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from imm.tracking.mlflow_run import default_uri, ensure_store

log = logging.getLogger("imm.sweep")
SWEEP_FILE = "sweep.json"


def sweep_info(sweep_dir) -> dict:
    """{"parent_run_id": ..., "keys": [...]} written by the launching process ({} if none)."""
    p = Path(sweep_dir) / SWEEP_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def swept_keys(config: DictConfig) -> list[str]:
    """The keys a multirun varies: sweeper params plus comma-separated command-line overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = list((config.hydra.sweeper.get("params") or {}).keys())
    for o in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task)):
        if o.is_sweep_override() and o.get_key_element().lstrip("+~") not in keys:  # a=1,2 but not a=[1,2]
            keys.append(o.get_key_element().lstrip("+~"))
    return keys


class MLflowSweepCallback(Callback):
    """Hydra callback: on_multirun_start opens the parent run; on_multirun_end closes it."""

    def __init__(self):
        self.client, self.run_id = None, None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if not config.tracking.enabled:
            return

        from imm.tracking.mlflow_run import Tracker

        uri = config.tracking.uri or default_uri(config.hydra.runtime.cwd)
        ensure_store(uri)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        keys = swept_keys(config)
        choices = config.hydra.runtime.choices
        name = f"sweep {choices.get('sweep') or ','.join(keys)} {sweep_dir.name}"
        tracker = Tracker.open(
            uri,
            config.tracking.experiment,
            run_name=name,
            params={},
            tags={"sweep.dir": str(sweep_dir.resolve()), "sweep.keys": ",".join(keys), "sweep.role": "parent"},
        )
        tracker.set_tags({"sweep.id": tracker.run_id})
        self.client, self.run_id = tracker.client, tracker.run_id
        (sweep_dir / SWEEP_FILE).write_text(json.dumps({"parent_run_id": tracker.run_id, "keys": keys}) + "\n")
        # Hydra raises out of the sweep when a job fails, skipping on_multirun_end: never leave RUNNING.
        atexit.register(self._end, "FAILED")
        log.info("MLflow parent run %s for the sweep over %s in %s", tracker.run_id, ", ".join(keys), uri)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.client is None:
            return
        children = self.client.search_runs(
            [self.client.get_run(self.run_id).info.experiment_id],
            filter_string=f"tags.`sweep.id` = '{self.run_id}' and tags.`sweep.role` = 'child'",
        )
        statuses = [r.info.status for r in children]
        self.client.set_tag(self.run_id, "sweep.children", str(len(statuses)))
        failed = sum(s != "FINISHED" for s in statuses)
        self._end("FAILED" if failed else "FINISHED")
        log.info("sweep finished: %d child runs, %d not FINISHED", len(statuses), failed)

    def _end(self, status: str) -> None:
        if self.client is not None and self.client.get_run(self.run_id).info.status == "RUNNING":
            self.client.set_terminated(self.run_id, status=status)
