"""Stop requests from signals, honoured at the next step boundary.

SIGINT/SIGTERM: checkpoint, end the MLflow run as KILLED, exit. The preemption signal submitit uses
(SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL names another): checkpoint, then hand over to submitit's own
handler, which requeues the job; the requeued job resumes from the run directory.
"""

from __future__ import annotations

import os
import signal


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def preempt_signal() -> int:
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, name if name.startswith("SIG") else f"SIG{name}")


def in_submitit_job() -> bool:
    return "SUBMITIT_EXECUTOR" in os.environ


class StopFlag:
    """Installs handlers that only record the signal; `restore()` puts the previous handlers back.

    Inside a submitit job SIGTERM is left to submitit, which ignores it: SLURM sends it before the
    preemption signal, and stopping on it would end the job instead of requeueing it.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        signals = (
            (signal.SIGINT, preempt_signal())
            if in_submitit_job()
            else (signal.SIGINT, signal.SIGTERM, preempt_signal())
        )
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._record)
            except ValueError:  # not the main thread (e.g. inside some launchers): no handlers
                pass

    def _record(self, signum, frame):
        self.signum = signum

    def request(self, signum: int) -> None:
        """Record a stop another process of the job received (distributed consensus)."""
        self.signum = self.signum or signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def hand_over(self) -> None:
        """After the checkpoint: let a preemption handler installed before ours (submitit's) requeue
        the job; otherwise raise Interrupted."""
        signum, previous = self.signum, self._previous.get(self.signum)
        self.restore()
        if signum == preempt_signal() and callable(previous):
            previous(signum, None)  # submitit: checkpoint() of the job, requeue, exit
        raise Interrupted(signum)
