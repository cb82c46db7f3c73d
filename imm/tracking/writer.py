"""The background writer of a training run's MLflow record: the loop never waits on the store, and a store that
goes away loses nothing.

`Writer.submit(record)` puts a record on a queue and returns. Two threads take it from there:
- the journal thread appends it to the run directory's journal (imm.tracking.journal: one whole JSON line,
  written at once), then hands it to
- the sender thread, which sends the records in order. When the store cannot take one (no answer within
  MLflow's retries, a 5xx, a locked or full database), the sender says so in one line and keeps them: it tries
  again every RETRY_S seconds (an HTTP store: once its /health answers), says at most once a minute that the
  store is still away, and when the store takes them again sends what waited, in order, and says so. A record
  the store refuses for what it is (a 4xx) is dropped with one line.
What the store has taken is counted in the journal's `.sent` file, so a relaunch (or `sync`) sends the rest.

`flush(timeout)` waits until the store has taken everything submitted so far, or the timeout passes; `close`
does the same and stops the threads (the journal keeps what the store did not take). Nothing here raises into
the caller, and the caller's thread never touches the network or the disk.

`SystemMetrics` samples CPU, memory, disk and network (psutil) and the GPU (nvidia-ml-py) with MLflow's own
monitors and submits them as system/* metrics; unlike MLflow's monitor it never reads the store.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
import urllib.error
import urllib.request

from imm.diskspace import skipped
from imm.errors import error_line
from imm.tracking.journal import KIND, Journal, apply, groups, rejected

RETRY_S = 10.0  # seconds between tries while the store does not take records
SAY_EVERY_S = 60.0  # while it stays away: one line at most this often
SENT_EVERY_S = 1.0  # the journal's .sent count is rewritten at most this often (and when all is sent)
SENDER = "imm-mlflow-writer"  # the sender thread's name (urllib3's retry warnings from it are not shown)
log = logging.getLogger("imm.tracking")
_STOP = object()


class _QuietRetries(logging.Filter):
    """urllib3 warns at every retry of a request; the sender's outage is said in its own lines instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.threadName != SENDER


logging.getLogger("urllib3.connectionpool").addFilter(_QuietRetries())


class Writer:
    """The queue, the journal thread and the sender thread of one MLflow run (see the module docstring)."""

    def __init__(self, client, run_id: str, journal: Journal, uri: str, *, retry_every: float = RETRY_S):
        self.client, self.run_id, self.journal, self.uri = client, run_id, journal, uri
        self.retry_every = retry_every
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._seq, self._order = itertools.count(1), threading.Lock()
        self._submitted = 0
        self._pending: collections.deque = collections.deque()  # (seq, record, journal offset or None)
        self._sent_seq, self._sent_offset = 0, journal.sent()
        self._marked, self._marked_at, self._said = self._sent_offset, 0.0, {}
        self._down_since: float | None = None
        self._next_try, self._said_at = 0.0, 0.0
        self._stopping = False
        self._cond = threading.Condition()
        for record, end in journal.records(self._sent_offset):  # what an earlier attempt left: sent first
            if record["op"] != "run":
                self._pending.append((self._next(), record, end))
        if self._pending:
            log.info("%d MLflow records that %s did not take before are sent first", len(self._pending), uri)
        self._journal_thread = threading.Thread(target=self._journal_loop, name="imm-mlflow-journal", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name=SENDER, daemon=True)
        self._journal_thread.start()
        self._sender.start()

    def _next(self) -> int:
        self._submitted = next(self._seq)
        return self._submitted

    # -- the caller's side ------------------------------------------------------------------------------------
    def submit(self, record: dict) -> None:
        """Queue `record`; returns at once (the lock orders the loop's and the system-metrics thread's records)."""
        with self._order:
            self._queue.put((self._next(), record))

    def flush(self, timeout: float) -> bool:
        """Wait until the store took everything submitted so far (True), or `timeout` seconds passed (False)."""
        target, deadline = self._submitted, time.monotonic() + timeout
        with self._cond:
            while self._sent_seq < target:
                left = deadline - time.monotonic()
                if left <= 0 or not self._sender.is_alive():
                    return False
                self._cond.wait(min(left, 1.0))
            return True

    def close(self, timeout: float) -> bool:
        """Journal everything submitted, wait up to `timeout` s for the store to take it, stop; True if it did."""
        complete = self.flush(timeout)
        self._queue.put((None, _STOP))
        self._journal_thread.join(timeout=max(timeout, 30.0))  # local writes only
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._sender.join(timeout=1.0 if complete else 0.1)  # a request in flight is not waited for
        if not self._sender.is_alive():
            self._mark_sent(force=True)
            self.journal.close()
        return complete and self.waiting == 0

    @property
    def waiting(self) -> int:
        """Records the store has not taken yet."""
        return self._submitted - self._sent_seq

    @property
    def down(self) -> bool:
        return self._down_since is not None

    # -- the journal thread ---------------------------------------------------------------------------------
    def _journal_loop(self) -> None:
        while True:
            seq, record = self._queue.get()
            if record is _STOP:
                return
            end = None
            try:
                with skipped(f"MLflow records are not journaled in {self.journal.path} (the store still gets them)"):
                    end = self.journal.append(record)
            except OSError as e:  # not a full disk: said once a minute too
                self._say(
                    "journal",
                    "MLflow records are not journaled in %s (%s); the store still gets them",
                    self.journal.path,
                    error_line(e),
                )
            with self._cond:
                self._pending.append((seq, record, end))
                self._cond.notify_all()

    # -- the sender thread ----------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait(SENT_EVERY_S)
                    self._mark_sent()
                if self._stopping and (not self._pending or self.down):
                    return
                if self.down and (wait := self._next_try - time.monotonic()) > 0:
                    self._cond.wait(min(wait, SENT_EVERY_S))
                    continue
                group = next(groups([record for _, record, _ in itertools.islice(self._pending, 0, 1000)]))
            if self.down and not self._answers():
                self._still_down()
                continue
            try:
                apply(self.client, self.run_id, group)
            except Exception as e:  # noqa: BLE001  whatever MLflow, SQLAlchemy or the network raise
                if not rejected(e):
                    self._went_down(e)
                    continue
                kind = KIND.get(group[0]["op"], group[0]["op"])
                self._say(kind, "MLflow %s not logged: the store refused them (%s)", kind, error_line(e))
            self._sent(len(group))

    def _answers(self) -> bool:
        """Whether an HTTP store's /health answers (within 5 s, no retries); other stores are simply tried."""
        if not self.uri.startswith(("http://", "https://")):
            return True
        try:
            urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=5).read()
            return True
        except urllib.error.HTTPError:  # it answers, if not on /health (a proxy in front): try the record
            return True
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _say(self, kind: str, message: str, *args) -> None:
        """A warning of this kind at most once a minute (a deleted run refuses every record)."""
        now = time.monotonic()
        if now - self._said.get(kind, -SAY_EVERY_S) >= SAY_EVERY_S:
            self._said[kind] = now
            log.warning(message, *args)

    def _went_down(self, e: BaseException) -> None:
        now = time.monotonic()
        self._next_try = now + self.retry_every
        if self._down_since is None:
            self._down_since = self._said_at = now
            log.warning(
                "the MLflow store %s does not take the run's records (%s); training goes on, and they wait in %s"
                " until it does",
                self.uri,
                error_line(e),
                self.journal.path,
            )
        else:
            self._still_down()

    def _still_down(self) -> None:
        now = time.monotonic()
        self._next_try = now + self.retry_every
        if now - self._said_at >= SAY_EVERY_S:
            self._said_at = now
            log.warning(
                "the MLflow store %s is still away (for %s); %d records wait in %s",
                self.uri,
                _minutes(now - self._down_since),
                self.waiting,
                self.journal.path,
            )

    def _sent(self, n: int) -> None:
        with self._cond:
            for _ in range(n):
                seq, _, end = self._pending.popleft()
                self._sent_seq = seq
                self._sent_offset = end if end is not None else self._sent_offset
            if self._down_since is not None:
                log.info(
                    "the MLflow store %s takes records again after %s; the %d that waited are being sent",
                    self.uri,
                    _minutes(time.monotonic() - self._down_since),
                    len(self._pending) + n,
                )
                self._down_since = None
            self._mark_sent(force=not self._pending)
            self._cond.notify_all()

    def _mark_sent(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._sent_offset != self._marked and (force or now - self._marked_at >= SENT_EVERY_S):
            try:
                self.journal.mark_sent(self._sent_offset)
                self._marked, self._marked_at = self._sent_offset, now
            except OSError:  # a full disk: the count stays behind; records are sent again, which adds nothing
                pass


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


class SystemMetrics:
    """system/* metrics every `every` seconds from a thread, through `send(metrics, step)`, from step `first`."""

    def __init__(self, send, every: float, first: int = 0):
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor  # ImportError without psutil
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

        self.monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        if (gpu := _gpu_monitor()) is not None:
            self.monitors.append(gpu)
        self.send, self.every, self.step = send, every, first
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imm-system-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._collect()
            if self._stop.wait(self.every):
                return
            self._publish()

    def _collect(self) -> None:
        for monitor in self.monitors:
            try:
                monitor.collect_metrics()
            except Exception:  # noqa: BLE001  a sensor that fails this time (a GPU gone, /proc unreadable)
                pass

    def _publish(self) -> None:
        metrics = {}
        for monitor in self.monitors:
            try:
                metrics.update(monitor.aggregate_metrics())
            except Exception:  # noqa: BLE001  nothing collected yet (an empty mean), a sensor that failed
                pass
            monitor.clear_metrics()
        if metrics:
            self.send({f"system/{k}": v for k, v in metrics.items()}, self.step)
            self.step += 1

    def finish(self) -> None:
        """Stop, and send the samples of the last, unfinished interval (a run shorter than one has only these)."""
        self._stop.set()
        self._thread.join(timeout=10.0)
        self._publish()


def _gpu_monitor():
    for module, name in (("gpu_monitor", "GPUMonitor"), ("rocm_monitor", "ROCMMonitor")):
        try:
            mod = __import__(f"mlflow.system_metrics.metrics.{module}", fromlist=[name])
            return getattr(mod, name)()
        except Exception:  # noqa: BLE001  no such GPU, driver or library
            continue
    return None
