"""The queue and the scheduler: which queued job runs next, and running it.

Order: jobs that were running when the server died come first (they resume), then priority (higher
first), then submission (FIFO); the store defines it, once, and hands out the queue in it. The queue is
taken strictly in that order: the first job that cannot start holds back those behind it, so a job that
needs many CPUs is never starved by small ones.

Admission: a free job slot (``--max-concurrent-jobs``) and the CPUs/GPUs the job's workers need,
counted against the cluster's total minus what this service's running jobs hold. Ray's own
``available_resources`` lags actor creation by a moment, so it would let two jobs take the same CPU.

Each job runs ``train_job`` in its own thread of this process (the Ray driver). Whatever a job
raises ends that job ``failed``; nothing a job does can stop the scheduler.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from polyak.contract.errors import ClusterTooSmall, SpecError, one_line
from polyak.contract.spec import JobSpec
from polyak.contract.wire import EpochMetrics, JobInfo, JobState, StopReason
from polyak.service.engine.checkpoint import load_checkpoint
from polyak.service.engine.memory import check_memory, default_limit
from polyak.service.engine.trainer import BEST_WEIGHTS, CHECKPOINT, LAST_WEIGHTS, Hooks, train_job
from polyak.service.server.cluster import Cluster, ClusterUnavailable, Resources, needs
from polyak.service.server.events import Bus
from polyak.service.server.job import CANCELLED, FAILED, QUEUED, RUNNING, JobRecord, new_job_id, utcnow
from polyak.service.server.paths import recheck
from polyak.service.server.store import Store, StoreUnavailable
from polyak.workers.backend import gpu_available

log = logging.getLogger("polyak")

POLL_SECONDS = 5.0  # a pass also runs this often unwoken: a cluster may have grown


class JobNotResumable(RuntimeError):
    """A resubmit that cannot start from a checkpoint; the message says why."""


class ClusterTooSmallFor(ClusterTooSmall):
    """The cluster can never hold this job: ``field`` is the spec field that asks for more than it has, ``reason``
    says how much more. The message is ``field: reason``, as a spec error's."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def unfit(spec: JobSpec, capacity: Resources) -> ClusterTooSmallFor | None:
    """Why the job can never run on a cluster of this size, naming the spec field; None if it can."""
    need, k = needs(spec, capacity), spec.cluster.num_workers
    if need.cpus > capacity.cpus:
        return ClusterTooSmallFor("cluster.num_workers",
                                  f"{k} workers need {_count(k, 'CPU')} (one each) but the Ray cluster has "
                                  f"{capacity.cpus:g}")
    if need.gpus > capacity.gpus:
        return ClusterTooSmallFor("cluster.device",
                                  f"gpu needs {_count(k, 'GPU')} (one per worker) but the Ray cluster has "
                                  f"{capacity.gpus:g}")
    return None


def shortfall(need: Resources, free: Resources) -> str:
    parts = []
    if need.cpus > free.cpus:
        parts.append(f"needs {_count(need.cpus, 'CPU')}, {free.cpus:g} free")
    if need.gpus > free.gpus:
        parts.append(f"needs {_count(need.gpus, 'GPU')}, {free.gpus:g} free")
    return "; ".join(parts)


def _count(n: float, unit: str) -> str:
    return f"{n:g} {unit}{'' if n == 1 else 's'}"


@dataclass
class _Run:
    """A job this process is running: what it holds, and its cancel flag."""

    holds: Resources
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class Scheduler:
    def __init__(
        self,
        store: Store,
        cluster: Cluster,
        max_concurrent: int = 1,
        train: Callable = train_job,
        max_job_memory: int | None = None,
    ):
        self.store = store
        self.cluster = cluster
        self.max_concurrent = max_concurrent
        # A job's estimated memory (engine/memory.py) above this is refused at submit, and failed at dispatch (a job
        # queued before the limit was lowered, or resumed after a restart): default, half the machine's memory.
        self.max_job_memory = default_limit() if max_job_memory is None else max_job_memory
        self.bus = Bus()
        self._train = train  # tests hand in a stand-in for train_job
        self._lock = threading.Lock()  # one decision at a time about who runs: dispatch, cancel
        self._running: dict[str, _Run] = {}
        # Ends of jobs whose thread is over but whose final state the store refused: written by the next pass that
        # can (or by a cancel), so that no job stays "running" with nothing running it.
        self._unrecorded: dict[str, tuple[JobState, StopReason, str | None]] = {}
        # Queued jobs a pass found within max_job_memory: not estimated again by the next passes (a pass reads the
        # whole queue after every submit); the dispatcher's alone, and forgotten once they leave the queue.
        self._fits: set[str] = set()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._dispatcher: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Requeue the jobs a previous server left running (they resume), then start dispatching."""
        for job in self.store.jobs(RUNNING):
            # A write the crash cut short; the file it was to replace is still whole.
            for tmp in self.store.job_dir(job.id).glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
            if job.cancel_requested:
                self._set_state(job.id, CANCELLED, StopReason.CANCELLED, note="cancelled before the server stopped")
            else:
                note = "server restarted: resumes from its last checkpoint"
                self._set_state(job.id, QUEUED, recovery=True, note=note)
        if self.store.ray_queued():
            self.cluster.start_background(self._wake.set)
        self._dispatcher = threading.Thread(target=self._loop, name="polyak-scheduler", daemon=True)
        self._wake.set()
        self._dispatcher.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop dispatching and interrupt running jobs at their next step; they stay ``running`` in the
        store, so the next start resumes them from their checkpoints."""
        self._stopping.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        if self._dispatcher is not None:
            self._dispatcher.join(timeout)
        with self._lock:
            threads = [r.thread for r in self._running.values() if r.thread is not None]
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # -- the API's verbs -----------------------------------------------------------------------------
    def submit(self, spec: JobSpec) -> JobInfo:
        """Queue a job and describe it as queued; ClusterTooSmallFor if the cluster (or, for a job without workers,
        this process) is known to be too small for it ever to run, SpecError if its estimated memory is over
        ``max_job_memory``. Never waits for Ray: before Ray is up the job is queued, and dispatch checks it."""
        check_memory(spec, self.max_job_memory)
        capacity = self.cluster.known_capacity()
        if spec.cluster.num_workers > 0 and capacity is None:
            self.cluster.start_background(self._wake.set)
        elif spec.cluster.num_workers > 0:
            error = unfit(spec, capacity)
            if error is not None:
                raise error
        elif spec.cluster.device == "gpu" and not gpu_available():  # in-process jobs compute right here
            raise ClusterTooSmallFor("cluster.device",
                                     "gpu with num_workers 0 computes in the server's process, which sees no GPU")
        with self._lock:  # so that created_at runs in seq's order: FIFO reads the same by either
            job = self.store.add(JobRecord(id=new_job_id(), spec=spec, state=QUEUED, created_at=utcnow()))
        _log_state(job)
        info = self._info(job)
        self._wake.set()
        return info

    def resubmit(self, job_id: str) -> JobInfo | None:
        """A new job with the same spec that starts from this one's last checkpoint (a job that failed when
        its cluster lost a node, or was cancelled), or from the start when it ended before its first checkpoint;
        None if there is no such job, JobNotResumable if it cannot be resumed."""
        old = self.store.get(job_id)
        if old is None:
            return None
        if not old.state.is_terminal():
            raise JobNotResumable(f"job {job_id} is {old.state.value}: only a finished job can be resubmitted")
        source = self.store.job_dir(job_id)
        epoch = self._checkpoint_epoch(job_id, source)  # None: it ended before its first checkpoint, so it starts over
        new = JobRecord(id=new_job_id(), spec=old.spec, state=QUEUED, created_at=utcnow(), resumed_from=job_id)
        if epoch is not None:
            target = self.store.job_dir(new.id)
            try:
                target.mkdir(parents=True, exist_ok=True)
                for name in (CHECKPOINT, BEST_WEIGHTS, LAST_WEIGHTS):
                    if (source / name).is_file():
                        shutil.copyfile(source / name, target / name)
            except OSError as e:  # a full or read-only data dir: no half-copied job is left behind
                shutil.rmtree(target, ignore_errors=True)
                why = e.strerror or e
                raise StoreUnavailable(f"cannot copy job {job_id}'s checkpoint into {target}: {why}") from None
        with self._lock:
            job = self.store.add(new)
        if epoch is None:
            _log_state(job, f"resubmitted from the start: job {job_id} ended before its first checkpoint")
        else:
            self.store.copy_metrics(job_id, job.id, epoch)
            _log_state(job, f"resubmitted from job {job_id}'s checkpoint of epoch {epoch}")
        self._wake.set()
        return self._info(job)

    @staticmethod
    def _checkpoint_epoch(job_id: str, source: Path) -> int | None:
        """The epoch of the job's checkpoint, None without one; JobNotResumable when it cannot be read."""
        if not (source / CHECKPOINT).is_file():
            return None
        try:
            _, meta = load_checkpoint(source / CHECKPOINT)
        except (OSError, ValueError) as e:  # UnreadableFile names the file
            raise JobNotResumable(f"job {job_id} cannot be resumed: {e}") from None
        return meta["epoch"]

    def cancel(self, job_id: str) -> JobRecord | None:
        """A queued job is cancelled at once; a running one is asked to stop at its next step."""
        with self._lock:
            job = self.store.get(job_id)
            if job is None:
                return None
            if job.state == QUEUED:
                job = self._set_state(job_id, CANCELLED, StopReason.CANCELLED, note="cancelled while queued")
            elif job.state == RUNNING and job_id in self._running:
                self.store.request_cancel(job_id)
                self._running[job_id].cancel.set()
                log.info("job %s: cancel requested; it stops at its next step", job_id)
            elif job.state == RUNNING:  # its run is over, but the store refused its end: write that now
                end = self._unrecorded.get(job_id, (CANCELLED, StopReason.CANCELLED, None))
                job = self._set_state(job_id, *end, note="its end recorded when it was cancelled")
                self._unrecorded.pop(job_id, None)
        self._wake.set()
        return job

    def queue(self) -> list[JobRecord]:
        """Queued jobs in the order they will start."""
        return self.store.queue()

    def info(self, job_id: str) -> JobInfo | None:
        job = self.store.get(job_id)
        return None if job is None else self._info(job)

    def infos(
        self, state: JobState | None = None, group: str | None = None, limit: int | None = None, offset: int = 0
    ) -> list[JobInfo]:
        """Newest first, a page of them."""
        jobs = self.store.jobs(state, group, newest_first=True, limit=limit, offset=offset)
        positions = self.store.queue_positions() if any(j.state == QUEUED for j in jobs) else {}
        latest = self.store.latest_metrics_of([j.id for j in jobs])
        return [j.info(positions.get(j.id), latest.get(j.id)) for j in jobs]

    # -- dispatching ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self._wake.wait(POLL_SECONDS)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self._dispatch()
            except StoreUnavailable as e:
                log.warning("scheduling pass skipped: %s; retrying in %g s", e, POLL_SECONDS)
            except Exception:
                log.exception("scheduling pass failed; retrying in %g s", POLL_SECONDS)

    def _record_ends(self) -> None:
        """The ends the store refused, written now (StoreUnavailable again: the next pass tries again)."""
        with self._lock:
            for job_id, end in list(self._unrecorded.items()):
                if self.store.get(job_id).state == RUNNING:
                    self._set_state(job_id, *end, note="its end recorded once the job database took writes again")
                del self._unrecorded[job_id]

    def _dispatch(self) -> None:
        self._record_ends()
        # Ray starts in the background (seconds; a minute to fail): until it is up, in-process jobs still start
        # and jobs that need Ray wait. Its size is asked before taking the lock cancel() needs.
        capacity, no_ray = None, "waiting for Ray to start"
        if self.store.ray_queued():
            if self.cluster.connected:
                try:
                    capacity = self.cluster.capacity()
                except ClusterUnavailable as e:
                    no_ray = str(e)
            else:
                self.cluster.start_background(self._wake.set)
                no_ray = self.cluster.status().get("error", no_ray)
        with self._lock:
            if self._stopping.is_set():
                return
            ray_ready = capacity is not None
            capacity = capacity or Resources()
            free = capacity
            for run in self._running.values():
                free -= run.holds
            free = free.clamped()  # below zero when the cluster shrank under running jobs
            behind = None  # the waiting reason of every job after the first that lacks resources
            queue = self.queue()
            self._fits.intersection_update(job.id for job in queue)
            for job in queue:
                if (too_big := self._too_big(job)) is not None:
                    self._set_state(job.id, FAILED, StopReason.ERROR, too_big, note="over --max-job-memory")
                    continue
                if behind is not None:
                    reason = behind
                elif len(self._running) >= self.max_concurrent:
                    reason = f"all {self.max_concurrent} job slot(s) busy (--max-concurrent-jobs)"
                elif job.spec.cluster.num_workers > 0 and not ray_ready:
                    reason = no_ray  # or it came in after this pass asked: the next one will
                    behind = f"behind job {job.id}, which needs Ray ({reason})"
                elif (error := unfit(job.spec, capacity)) is not None:
                    note = "the cluster is too small for it"
                    self._set_state(job.id, FAILED, StopReason.ERROR, error.message, note=note)
                    continue
                elif not (need := needs(job.spec, capacity)).fits_in(free):
                    reason = shortfall(need, free)
                    behind = f"behind job {job.id}, which {reason}"
                else:
                    self._start(job, need)
                    free -= need
                    continue
                if reason != job.waiting_reason:
                    self.store.set_waiting_reason(job.id, reason)

    def _too_big(self, job: JobRecord) -> str | None:
        if job.id in self._fits:
            return None
        try:
            check_memory(job.spec, self.max_job_memory)
        except SpecError as e:
            return e.message
        self._fits.add(job.id)
        return None

    def _start(self, job: JobRecord, need: Resources) -> None:
        job = self._set_state(job.id, RUNNING)
        run = _Run(need)
        run.thread = threading.Thread(target=self._run, args=(job, run), name=f"job-{job.id}", daemon=True)
        self._running[job.id] = run
        run.thread.start()

    # -- one job, in its own thread ------------------------------------------------------------------
    def _run(self, job: JobRecord, run: _Run) -> None:
        hooks = Hooks(
            on_epoch=lambda m: self._on_epoch(m, run),
            on_start=lambda where: self._on_start(job.id, where),
            should_cancel=lambda: run.cancel.is_set() or self._stopping.is_set(),
            job_dir=self.store.job_dir(job.id),
        )
        try:
            recheck(job.spec)  # checked at submit; a symlink swapped in since must not be followed now
            if job.spec.cluster.num_workers > 0:
                self.cluster.connect()
            result = self._train(job.spec, job.id, hooks)
            state, reason, error = result.state, result.stop_reason, result.error
        except (ValueError, SpecError, StoreUnavailable) as e:  # bad data, weights, spec; an epoch not stored
            state, reason, error = FAILED, StopReason.ERROR, str(e)
        except Exception as e:
            log.exception("job %s raised", job.id)
            state, reason, error = FAILED, StopReason.ERROR, error_line(e)
        try:
            if self._interrupted_by_shutdown(run, reason):
                log.info("job %s interrupted by shutdown: resumes from its checkpoint at next start", job.id)
            else:
                self._set_state(job.id, state, reason, error)
        except Exception as e:
            log.error("job %s: could not record its end (%s); retried until the store takes it", job.id, e)
            with self._lock:
                self._unrecorded[job.id] = (state, reason, error)
        finally:
            with self._lock:
                self._running.pop(job.id, None)
            self._wake.set()

    def _on_start(self, job_id: str, placement: str) -> None:
        log.info("job %s runs %s", job_id, placement)
        self.store.set_placement(job_id, placement)
        self.bus.publish(job_id, "state", self.info(job_id))

    def _on_epoch(self, m: EpochMetrics, run: _Run) -> None:
        # The partial epoch a shutdown cuts short is redone when the job resumes: not history.
        if m.stop == StopReason.CANCELLED and self._interrupted_by_shutdown(run, m.stop):
            return
        self.store.record_epoch(m)
        self.bus.publish(m.job_id, "epoch", m)

    def _interrupted_by_shutdown(self, run: _Run, reason: StopReason) -> bool:
        if not self._stopping.is_set() or run.cancel.is_set():
            return False
        return reason in (StopReason.CANCELLED, StopReason.ERROR)

    # -- state changes -------------------------------------------------------------------------------
    def _set_state(
        self,
        job_id: str,
        state: JobState,
        stop_reason: StopReason | None = None,
        error: str | None = None,
        *,
        recovery: bool = False,
        note: str | None = None,
    ) -> JobRecord:
        """Record, announce to listeners and log one state change."""
        job = self.store.transition(
            job_id, state, recovery=recovery, note=note, stop_reason=stop_reason, error=error
        )
        self.bus.publish(job_id, "state", self._info(job))
        _log_state(job, note)
        return job

    def _info(self, job: JobRecord) -> JobInfo:
        position = self.store.queue_positions().get(job.id) if job.state == QUEUED else None
        return job.info(position, self.store.latest_metrics(job.id))


def _log_state(job: JobRecord, note: str | None = None) -> None:
    name = f" ({job.name})" if job.name else ""
    details = [f"priority {job.priority}"] if job.state == QUEUED else []
    if job.stop_reason and job.state.is_terminal():
        details.append(f"stop: {job.stop_reason.value}")
    if job.error:
        details.append(f"error: {job.error}")
    if note:
        details.append(note)
    log.info("job %s%s %s%s", job.id, name, job.state.value, f" [{'; '.join(details)}]" if details else "")


def error_line(e: Exception) -> str:
    """An unexpected exception as the job's one error line. A Ray task's error (``RayTaskError(X)``) carries the
    remote traceback in its message, over many lines: the line is its cause's (the traceback is in the log)."""
    cause = getattr(e, "cause", None) if type(e).__name__.startswith("RayTaskError") else None
    e = cause if isinstance(cause, Exception) else e
    return f"{type(e).__name__}: {one_line(e)}"
