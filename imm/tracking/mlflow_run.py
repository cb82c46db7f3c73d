"""One MLflow run per training run, through the explicit MlflowClient (no global active-run state).

A tracking URI that cannot work is found before any data is loaded (check_store: an HTTP server that
does not answer, a folder, a SQLite file that is no database or cannot be written, a missing database
driver); a store that fails when the run is created, or an experiment or run deleted in the UI, is
Tracker.open's TrackingError. Either is one sentence and exit status 2, and no run is left behind.

The run ends FINISHED, KILLED (signal) or FAILED (exception), never left RUNNING: the training
loop ends it, and a process that exits without ending it (an exception before the loop's own
try/finally) ends it FAILED at exit. Only SIGKILL leaves it RUNNING, until a relaunch resumes it.
A resumed training run reopens its own MLflow run. Params are logged once, at creation; values that may
change when a run is resumed go to tags.

A training's writes (Tracker.open(..., journal=...)) go through a queue to a background writer that journals
them in the run directory before sending them (imm.tracking.writer, imm.tracking.journal): the loop never waits
on the store, a store that goes away stops nothing and loses nothing (its end status waits in the journal too),
and `python launch.py --config-name sync run=DIR` (imm.tracking.sync) completes a record the store did not take.
"""

from __future__ import annotations

import atexit
import contextlib
import getpass
import json
import logging
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from omegaconf import OmegaConf

from imm.diskspace import DiskFullError, disk_errno, not_disk_full, skipped
from imm.errors import TrackingError, error_line
from imm.runs import file_lock, unwritable
from imm.tracking.journal import KIND, Journal, apply, now_ms
from imm.tracking.writer import SystemMetrics, Writer

PARAM_LIMIT = 6000  # MLflow's max param value length
log = logging.getLogger("imm.tracking")
# MLflow logs every SQLAlchemy error with its traceback before raising it, and its system-metrics thread each
# failed write with the SQL; a full disk is said in one line here
for _name in ("mlflow.store.db.utils", "mlflow.system_metrics.system_metrics_monitor"):
    logging.getLogger(_name).addFilter(not_disk_full)
# A store or artifact write that finds the disk full, the quota used up or a read-only file system: one line,
# and the run goes on (its checkpoints hold what a resume needs; a full disk there stops it, see diskspace).
NOT_LOGGED = "MLflow {} not logged"
FLUSH_TIMEOUT_S = 30.0  # how long a training's end waits for the store to take the rest of its record
SYSTEM_KEY = "system/cpu_utilization_percentage"  # a system metric every machine has (its steps: the sampler's)


def default_uri(launch_dir) -> str:
    """sqlite:///<launch dir>/mlflow.db, absolute, so every process of a run agrees on it."""
    return f"sqlite:///{Path(launch_dir).resolve() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///PATH` tracking URI, None for any other store."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") and uri != "sqlite:///" else None


def artifact_root(uri: str) -> str | None:
    """For a SQLite store, artifacts go beside the database (not ./mlruns of whatever the cwd is)."""
    db = sqlite_path(uri)
    return None if db is None else (db.parent / "mlartifacts").as_uri()


@contextlib.contextmanager
def sqlite_lock(uri: str):
    """One process at a time in the block, for an SQLite database (a lock file beside it; other URIs: no lock).
    MLflow's schema migration is not safe against a second process doing the same (two runs started
    together on a fresh store: one dies with `sqlite3.OperationalError: duplicate column name: step`)."""
    if (db := sqlite_path(uri)) is None:
        yield
        return
    with file_lock(db.parent / f".{db.name}.lock"):
        yield


def client_for(uri: str):
    """An MlflowClient for uri; creating it creates (or migrates) the store, under sqlite_lock."""
    from mlflow.tracking import MlflowClient

    with sqlite_lock(uri):
        return MlflowClient(tracking_uri=uri)


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before training, when an HTTP tracking server is down (MLflow itself retries for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).read()
    except (urllib.error.URLError, OSError, ValueError) as e:  # ValueError: a malformed host (http://[::1)
        raise TrackingError(
            f"the MLflow tracking server at {uri} is not reachable ({e}); start it, fix"
            " tracking.uri, or set tracking.fallback_local=true to log to a local SQLite"
            " store."
        ) from None


def check_store(uri: str) -> None:
    """Fail fast on a tracking URI that cannot work, before any data is loaded and without creating a store: an
    HTTP server that does not answer, a folder (MLflow's file store, which MLflow 3 refuses), a SQLite URI
    whose file is no database or whose folder cannot be written, a database whose driver is not installed.
    A store that fails later, when the run is created, is Tracker.open's TrackingError."""
    scheme = uri.partition("://")[0] if "://" in uri else ("databricks" if uri == "databricks" else "")
    if scheme in ("http", "https"):
        check_reachable(uri)
    elif scheme in ("", "file"):
        raise TrackingError(
            f"tracking.uri={uri} is a folder (MLflow's file store), which MLflow no longer writes runs to; use a"
            " SQLite file, tracking.uri=sqlite:////absolute/path/mlflow.db, or a server, tracking.uri=http://host:port."
        )
    elif scheme == "sqlite":
        _check_sqlite(uri)
    else:  # another database or a hosted service: its client must load (the driver) and answer
        try:
            client_for(uri).search_experiments(max_results=1)
        except Exception as e:  # noqa: BLE001  a missing driver, a refused connection, bad credentials, ...
            raise unusable(uri, e) from None


def _check_sqlite(uri: str) -> None:
    if (db := sqlite_path(uri)) is None:
        raise TrackingError(
            f"tracking.uri={uri} names no SQLite file; write sqlite:/// and the file's path"
            " (sqlite:////absolute/path/mlflow.db or sqlite:///relative/path/mlflow.db)."
        )
    try:
        head = db.read_bytes()[:16] if db.is_file() else b""
    except OSError as e:
        raise TrackingError(f"the MLflow store {db} (tracking.uri={uri}) cannot be read ({e.strerror}).") from None
    if db.is_dir() or head not in (b"", b"SQLite format 3\x00"):
        what = "a folder" if db.is_dir() else "not a SQLite database"
        raise TrackingError(
            f"the MLflow store {db} (tracking.uri={uri}) is {what}; move it away or point tracking.uri at another file."
        )
    if why := unwritable(db.parent):
        raise TrackingError(
            f"the MLflow store {db} (tracking.uri={uri}) cannot be written: {why}; launch from a folder you can"
            " write or set tracking.uri=sqlite:////writable/path/mlflow.db."
        )


def unusable(uri: str, e: Exception) -> TrackingError:
    """The one sentence for a store that fails in MLflow, SQLAlchemy or the OS (whatever they raise)."""
    return TrackingError(f"the MLflow tracking store {uri} cannot be used ({error_line(e)}).")


def flatten(cfg) -> dict[str, str]:
    """The resolved config as {dotted.key: str(value)}."""
    out: dict[str, str] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = str(node)[:PARAM_LIMIT]

    walk(OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg, "")
    return out


def _git(*args: str) -> str:
    root = Path(__file__).resolve().parents[2]
    return subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()


def source_tags(entry_point: str) -> dict[str, str]:
    """MLflow's standard tags for who ran what: user, source file and type, and the commit, branch and dirty
    flag of the source tree the package runs from (no git tags outside git). MLflow's UI shows them in
    its User, Source and Version columns."""
    from mlflow.utils import mlflow_tags

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = str(os.getuid())
    tags = {
        mlflow_tags.MLFLOW_USER: user,
        mlflow_tags.MLFLOW_SOURCE_NAME: str(Path(entry_point).resolve()),
        mlflow_tags.MLFLOW_SOURCE_TYPE: "LOCAL",
    }
    try:
        tags[mlflow_tags.MLFLOW_GIT_COMMIT] = _git("rev-parse", "HEAD")
        tags[mlflow_tags.MLFLOW_GIT_BRANCH] = _git("rev-parse", "--abbrev-ref", "HEAD")
        tags["git.dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def note_tag(text: str) -> dict[str, str]:
    """The run's description (MLflow's `mlflow.note.content`, markdown, shown on the run page)."""
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    return {MLFLOW_RUN_NOTE: text}


class Tracker:
    """Logs one MLflow run. `Tracker.disabled()` does nothing (other ranks, tracking.enabled=false).

    With a journal (a training run: `Tracker.open(..., journal=<run dir>/mlflow_journal.jsonl)`) every write is a
    record handed to a background writer (imm.tracking.writer) and returns at once: the caller never waits on
    the store nor gets its errors, and what the store cannot take waits in the journal. Without one (a sweep's
    parent run, `sample`, `evaluate`) each write goes to the store at once; a full disk there is one line."""

    def __init__(self, client=None, run_id: str | None = None, *, end_at_exit: bool = True, writer=None):
        self.client, self.run_id, self.writer = client, run_id, writer
        self.monitor, self.ended, self.flush_timeout, self.offline = None, False, FLUSH_TIMEOUT_S, False
        if client is not None and end_at_exit:  # never RUNNING after this process exits, whatever way it exits
            atexit.register(self._end_at_exit)

    @classmethod
    def disabled(cls) -> "Tracker":
        return cls()

    @classmethod
    def open(
        cls,
        uri: str,
        experiment: str,
        *,
        run_name: str,
        params: dict[str, str],
        tags: dict[str, str],
        run_id: str | None = None,
        end_at_exit: bool = True,
        journal=None,
        flush_timeout: float = FLUSH_TIMEOUT_S,
    ) -> "Tracker":
        """Create a run (logging params once) or, with run_id, reopen that run as RUNNING. A store that fails,
        or an experiment or run deleted in the UI, is TrackingError (one sentence), before any run exists.
        end_at_exit=False: the caller ends it (a sweep's parent run, which the last of its sweeper processes ends).
        journal: the journal file of a training run (writes go through the background writer; what an earlier
        attempt's writer could not send is sent first); flush_timeout: how long end() waits for the store. A run
        whose journal names run_id in this store reopens it even while the store does not answer (offline)."""
        if journal is not None and offline_resumable(uri, journal, run_id):
            client = client_for(uri)  # no request yet: the writer's first one waits in the journal
            tracker = cls(client, run_id, end_at_exit=end_at_exit, writer=Writer(client, run_id, Journal(journal), uri))
            tracker.flush_timeout, tracker.offline = flush_timeout, True
            tracker._send({"op": "status", "status": "RUNNING"})
            tracker.set_tags(tags)
            return tracker
        try:
            client = client_for(uri)
            exp = client.get_experiment_by_name(experiment)
            if exp is not None and exp.lifecycle_stage == "deleted":
                raise TrackingError(
                    f"the MLflow experiment {experiment!r} in {uri} was deleted (it is in the store's trash); restore"
                    f" it (mlflow experiments restore --experiment-id {exp.experiment_id}) or set another"
                    " tracking.experiment."
                )
            run = None
            if run_id is not None and (run := _run_or_none(client, run_id, uri)) is not None:
                if run.info.lifecycle_stage == "deleted":
                    raise TrackingError(
                        f"the MLflow run {run_id} this run logs to was deleted in {uri}; restore it (mlflow runs"
                        f" restore --run-id {run_id}) or start a new run of this experiment with fresh=true."
                    )
                if journal is None:
                    client.update_run(run_id, status="RUNNING")
            else:
                exp_id = exp.experiment_id if exp else _create_experiment(client, experiment, uri)
                run = client.create_run(exp_id, run_name=run_name, tags=tags)
        except TrackingError:
            raise
        except Exception as e:  # noqa: BLE001  MLflow's, SQLAlchemy's and the OS's errors of a store
            if (code := disk_errno(e)) is not None and sqlite_path(uri) is not None:
                raise DiskFullError(sqlite_path(uri), code) from None
            raise unusable(uri, e) from None
        reopened = run.info.run_id == run_id
        writer = None
        if journal is not None:
            head = {"run_id": run.info.run_id, "uri": uri, "experiment": experiment, "run_name": run_name}
            writer = Writer(client, run.info.run_id, _journal_for(journal, run, head, tags), uri)
        tracker = cls(client, run.info.run_id, end_at_exit=end_at_exit, writer=writer)
        tracker.flush_timeout = flush_timeout
        if reopened:
            if writer is not None:  # after what the journal holds from before (an earlier attempt's end, say)
                tracker._send({"op": "status", "status": "RUNNING"})
            tracker.set_tags(tags)
        else:
            tracker.log_params(params)
        return tracker

    @property
    def enabled(self) -> bool:
        return self.client is not None

    @property
    def journal(self) -> Path | None:
        return self.writer.journal.path if self.writer is not None else None

    def _send(self, record: dict) -> None:
        """To the writer (a training run), else to the store now (a full disk there: one line)."""
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.submit(record)
            return
        with skipped(NOT_LOGGED.format(KIND[record["op"]])):
            apply(self.client, self.run_id, [record])

    def log_params(self, params: dict[str, str]) -> None:
        self._send({"op": "params", "params": {k: str(v) for k, v in params.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if metrics:
            self._send(
                {
                    "op": "metrics",
                    "step": int(step),
                    "time": now_ms(),
                    "metrics": {k: float(v) for k, v in metrics.items()},
                }
            )

    def set_tags(self, tags: dict[str, str]) -> None:
        if tags:
            self._send({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        """The file at `path` (a training's: it must stay in the run directory until the store took it)."""
        self._send({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._send({"op": "text", "text": text, "file": artifact_file})

    def log_dataset(self, *, name: str, digest: str, source: str, shape, rows: int, num_classes: int) -> None:
        """The training data as the run's input (MLflow's Datasets column): name, digest, source, and the
        sample shape and row count as its schema and profile."""
        if not self.enabled:
            return
        import numpy as np
        from mlflow.data.schema import TensorDatasetSchema
        from mlflow.types.schema import Schema, TensorSpec

        labels = Schema([TensorSpec(np.dtype("int64"), (-1,), "label")]) if num_classes else None
        schema = TensorDatasetSchema(Schema([TensorSpec(np.dtype("float32"), (-1, *shape), "x")]), labels)
        local = Path(source).expanduser()
        kind, where = (
            ("local", {"uri": str(local.resolve())}) if local.exists() else ("code", {"tags": {"data": source}})
        )
        profile = {"num_rows": rows, "sample_shape": list(shape), "num_classes": num_classes}
        self._send(
            {
                "op": "dataset",
                "name": name,
                "digest": digest,
                "source_type": kind,
                "source": json.dumps(where),
                "schema": json.dumps(schema.to_dict()),
                "profile": json.dumps(profile),
                "context": "train",
            }
        )

    def start_system_metrics(self, uri: str, every: float, *, resume: bool) -> None:
        """CPU, memory, disk and network (psutil), and GPU (nvidia-ml-py, on CUDA machines) every `every`
        seconds as system/* metrics, from a thread that only samples (they are written as any metric), until
        end(). A resumed run continues their step count."""
        if not self.enabled:
            return
        try:
            self.monitor = SystemMetrics(self.log_metrics, every, self._next_system_step() if resume else 0)
        except ImportError as e:  # psutil missing: the run goes on without them
            logging.getLogger("imm.train").warning("no system metrics (%s); pip install psutil", e)

    def _next_system_step(self) -> int:
        """One past the last system/* step: from the journal, or (a run logged before it had one) the store."""
        steps = [-1]
        if self.writer is not None:
            for record, _ in self.writer.journal.records():
                if record["op"] == "metrics" and any(k.startswith("system/") for k in record["metrics"]):
                    steps.append(record["step"])
        if len(steps) == 1 and not self.offline:
            with contextlib.suppress(Exception):
                steps += [m.step for m in self.client.get_metric_history(self.run_id, SYSTEM_KEY)]
        return max(steps) + 1

    def flush(self) -> bool:
        """Wait up to flush_timeout seconds for the store to take what was logged so far; whether it did."""
        if self.writer is None or self.writer.flush(min(0.5, self.flush_timeout)):
            return True
        if self.flush_timeout > 0.5:  # a pause at the end of the run, said
            log.info(
                "waiting up to %.0f s (tracking.flush_timeout) for the MLflow store %s to take the run's last %d"
                " records",
                self.flush_timeout,
                self.writer.uri,
                self.writer.waiting,
            )
        return self.writer.flush(self.flush_timeout - 0.5)

    def end(self, status: str = "FINISHED", log_file=None, note: str | None = None, *, wait: bool = True) -> bool:
        """Stop the system metrics, upload log_file (launch.log), put `note` (why it stopped) above the run's
        description and end the run with `status`. With a journal: wait (up to flush_timeout seconds; wait=False:
        not at all) for the store to take all of it; returns whether it did (the journal keeps the rest)."""
        if not self.enabled or self.ended:
            return True
        self.ended = True
        atexit.unregister(self._end_at_exit)
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None
        if log_file is not None and Path(log_file).is_file():
            self.log_artifact(log_file)
        if note:
            self._send({"op": "note", "note": note})
        record = {"op": "end", "status": status, "time": now_ms()}
        if self.writer is not None:
            self._send(record)
            return self.writer.close(self.flush_timeout if wait else 0.0)
        with skipped(f"the MLflow run {self.run_id} stays RUNNING until the same command runs again"):
            apply(self.client, self.run_id, [record])
        return True

    def _end_at_exit(self) -> None:
        if self.writer is not None:  # an exception before the training's own end: FAILED, journaled if need be
            self.end("FAILED")
            return
        try:  # only a run still RUNNING (one ended by end() is not)
            if self.client.get_run(self.run_id).info.status == "RUNNING":
                self.client.set_terminated(self.run_id, status="FAILED")
        except Exception:  # noqa: BLE001  the store may be gone at exit; nothing left to do
            pass


def offline_resumable(uri: str, journal, run_id: str | None) -> bool:
    """Whether a training may go on although its HTTP store does not answer: the run directory's journal belongs
    to run_id in that very store (an earlier attempt created the run there), so its records can wait in the
    journal until the store answers. A new run, or another store, still needs the store now."""
    if run_id is None or not uri.startswith(("http://", "https://")):
        return False
    head = Journal(journal).head()
    if head is None or head.get("run_id") != run_id or head.get("uri") != uri:
        return False
    try:
        check_reachable(uri)
    except TrackingError:
        return True
    return False


def _journal_for(path, run, head: dict, tags: dict) -> Journal:
    """The journal of `run` at `path`: the existing one if it is this run's (a resume), else a new one beginning
    with the run's record; one of another MLflow run (tracking.uri changed since) is moved aside, said with the
    command that sends what it still holds."""
    journal = Journal(path)
    old = journal.head()
    if old is not None and old.get("run_id") != run.info.run_id:
        unsent, moved = journal.unsent(), journal.rotate(old.get("run_id", "unknown"))
        if unsent:
            log.warning(
                "%s holds %d records the MLflow store %s did not take, of the earlier MLflow run %s; it is kept as"
                " %s, and `python launch.py --config-name sync run=%s` sends them",
                path,
                unsent,
                old.get("uri"),
                old.get("run_id"),
                moved,
                Path(path).parent,
            )
        old = None
    if old is None:
        record = {"op": "run", **head, "tags": tags, "start_time": run.info.start_time, "time": now_ms()}
        try:
            journal.mark_sent(journal.append(record))
        except OSError as e:  # a full disk: the writer says so at its first record
            log.debug("journal head not written: %s", e)
    return journal


def _run_or_none(client, run_id: str, uri: str):
    """The run run_id, or None (with a warning: a new run is created) when this store does not hold it, as when
    tracking.uri changed since the run directory's last attempt."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        log.warning("MLflow run %s is not in %s; logging to a new run there", run_id, uri)
        return None


def _create_experiment(client, name: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        root = artifact_root(uri)
        return client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)
    except MlflowException:  # created meanwhile by a parallel job
        return client.get_experiment_by_name(name).experiment_id


def ensure_store(uri: str) -> None:
    """Create or migrate the store once (sweeps call this before any job starts)."""
    check_store(uri)
    try:
        client_for(uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001  as in Tracker.open
        raise unusable(uri, e) from None


UI_ADDRESS = "http://127.0.0.1:5000"  # where `mlflow ui` serves unless told otherwise


def ui_links(uri: str, run_id: str) -> tuple[str, str] | None:
    """(the run's page, its experiment's runs table) in the MLflow UI, as direct addresses: MLflow 3's UI opens
    on its GenAI pages ("Send your first trace"), two clicks away from a training run. A tracking server's own
    address, else `mlflow ui`'s default; None when the store cannot say the run's experiment."""
    try:
        experiment = client_for(uri).get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001  a summary line is not worth an error: the run id and URI are printed anyway
        return None
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_ADDRESS
    runs = f"{base}/#/experiments/{experiment}/runs"
    return f"{runs}/{run_id}", runs
