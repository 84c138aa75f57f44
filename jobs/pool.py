"""Long-lived training gangs: a sweep pays a gang's start-up once, not once per trial.

    pool = Pool.start(cfg, slots=2, root=sweep_dir / "pool")   # two gangs of N workers
    pool.submit(run_id, cfg, run_dir)                          # queued; a free gang takes it
    for result in pool.results(run_id): ...                    # its reports, then "final"
    pool.cancel(run_id)                                        # stops it at its next report
    pool.close()

A slot is one Ray Train fit (its own placement group of ``scaling.num_workers`` DeepSpeed
workers, its own process group) whose worker loop is ``serve``: it takes run after run
from the dispatcher and trains each with the same ``train_one`` as ``graft finetune``.
What the worker processes keep between runs is what makes a trial cheap: the Python
processes and their imports, the process group, and (``jobs.worker``'s caches) the
tokenised data set and the pretrained weights.

The dispatcher is an async actor holding no resources: the job queue, each run's
reports (rank 0 sends them; the trial that submitted the run reads them) and the
cancelled runs. A run's ranks agree on cancellation at each report (rank 0 asks, then
an all-reduce), so they stop at the same step, tear their engine down and take the next
job. A run that raises kills its slot's fit (Ray Train stops the whole gang); the
slot's actor starts a fresh fit, and the run is queued again while it has failures left
(``train.max_failures``: it resumes from its own checkpoints), else its error goes to
its reader. A preempted run (jobs.preempt) checkpoints, ends its gang's fit and is
queued again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conf.schema import FinetuneConfig

# What a slot's driver actor and the dispatcher hold: no CPU (they wait), some memory.
DRIVER_MEMORY = 256 * 1024**2


class Cancelled(Exception):
    """Raised on every rank of a run the dispatcher was told to cancel."""


class Dispatcher:
    """The pool's state (a Ray actor; every method is a coroutine, none blocks another)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.taken: dict[tuple[int, int], asyncio.Future[dict[str, Any] | None]] = {}
        self.results: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self.cancelled: set[str] = set()
        self.running: dict[int, dict[str, Any]] = {}  # slot -> the job it trains
        self.closed = False
        self.error: str | None = None  # set when a gang cannot start at all

    def _results(self, run_id: str) -> asyncio.Queue[dict[str, Any]]:
        return self.results.setdefault(run_id, asyncio.Queue())

    async def submit(self, job: dict[str, Any]) -> None:
        self.cancelled.discard(job["run_id"])
        self.results[job["run_id"]] = asyncio.Queue()
        if self.error is not None:
            self.results[job["run_id"]].put_nowait({"error": self.error})
            return
        await self.queue.put(job)

    async def take(self, slot: int, seq: int) -> dict[str, Any] | None:
        """The ``seq``-th job of ``slot``: the first rank to ask pops the queue, the
        others get the same job. None when the pool closes."""
        key = (slot, seq)
        if key not in self.taken:
            future: asyncio.Future[dict[str, Any] | None] = (
                asyncio.get_running_loop().create_future()
            )
            self.taken[key] = future
            while True:
                job = None if self.closed else await self.queue.get()
                if job is None or job["run_id"] not in self.cancelled:
                    break
                self._results(job["run_id"]).put_nowait({"cancelled": True})
            if job is not None:
                self.running[slot] = job
            future.set_result(job)
            self.taken.pop((slot, seq - 1), None)
        return await self.taken[key]

    async def report(self, run_id: str, metrics: dict[str, Any]) -> None:
        self._results(run_id).put_nowait(metrics)

    async def done(self, slot: int, run_id: str, outcome: str) -> None:
        mine = self.running.get(slot, {}).get("run_id") == run_id
        job = self.running.pop(slot) if mine else None
        if outcome == "cancelled":
            self._results(run_id).put_nowait({"cancelled": True})
        elif outcome == "preempted" and job is not None:  # checkpointed: a fresh gang goes on
            self.queue.put_nowait(job)

    async def failed(self, slot: int, error: str) -> bool:
        """The slot's gang died. The run it was training is queued again (it resumes
        from its own checkpoints) while it has failures left (``max_failures``), else it
        ends with ``error``. False when it was training none (it died starting up)."""
        job = self.running.pop(slot, None)
        if job is not None:
            limit = job.get("max_failures", 0)
            if limit < 0 or job.get("failures", 0) < limit:
                job["failures"] = job.get("failures", 0) + 1
                self.queue.put_nowait(job)
            else:
                failures = job.get("failures", 0) + 1
                self._results(job["run_id"]).put_nowait(
                    {"error": f"{failures} failure(s) (train.max_failures={limit}):\n{error}"}
                )
        for key in [k for k in self.taken if k[0] == slot]:
            del self.taken[key]
        return job is not None

    async def broken(self, error: str) -> None:
        """A slot cannot start a gang: every queued and later run ends with ``error``."""
        self.error = error
        while not self.queue.empty():
            job = self.queue.get_nowait()
            if job is not None:
                self._results(job["run_id"]).put_nowait({"error": error})

    async def next_result(self, run_id: str, timeout: float) -> dict[str, Any] | None:
        try:
            return await asyncio.wait_for(self._results(run_id).get(), timeout)
        except TimeoutError:
            return None

    async def cancel(self, run_id: str) -> None:
        self.cancelled.add(run_id)

    async def is_cancelled(self, run_id: str) -> bool:
        return run_id in self.cancelled

    async def is_closed(self) -> bool:
        return self.closed

    async def close(self, slots: int) -> None:
        self.closed = True
        for _ in range(slots + len(self.taken)):
            self.queue.put_nowait(None)


class Slot:
    """One gang's driver (a Ray actor): runs the serving Train fit, again after a failure."""

    def serve(self, cfg: FinetuneConfig, root: str, slot: int, dispatcher: Any) -> int:
        """Returns how many fits it took (1 unless a run killed its gang)."""
        import ray

        from jobs.finetune import make_trainer

        fits = idle_failures = 0
        while True:
            fits += 1
            trainer = make_trainer(
                cfg,
                Path(root) / f"slot_{slot}",
                started=time.time(),
                serve={"dispatcher": dispatcher, "slot": slot},
            )
            try:
                trainer.fit()
                if ray.get(dispatcher.is_closed.remote()):
                    return fits
                continue  # (a preempted run ended the fit: a fresh gang goes on)
            except Exception:  # noqa: BLE001  # the run's error goes to its reader
                error = traceback.format_exc(limit=20)
                if ray.get(dispatcher.failed.remote(slot, error)):
                    idle_failures = 0
                else:
                    idle_failures += 1
                if ray.get(dispatcher.is_closed.remote()):
                    return fits
                if idle_failures >= 2:  # it cannot start: say so instead of retrying forever
                    ray.get(dispatcher.broken.remote(error))
                    return fits


@dataclasses.dataclass
class Pool:
    """The driver's handle on the gangs (see the module docstring)."""

    dispatcher: Any
    slots: list[Any]
    serving: list[Any]  # each slot's serve() ref (ends when the pool closes)

    @classmethod
    def start(cls, cfg: FinetuneConfig, *, slots: int, root: Path) -> Pool:
        import ray

        remote = ray.remote(num_cpus=0, memory=DRIVER_MEMORY)
        dispatcher = remote(Dispatcher).options(max_concurrency=1000).remote()
        actors = [remote(Slot).remote() for _ in range(slots)]
        serving = [
            a.serve.remote(cfg, str(root), i, dispatcher)  # type: ignore[attr-defined]
            for i, a in enumerate(actors)
        ]
        return cls(dispatcher, actors, serving)

    def submit(self, run_id: str, cfg: FinetuneConfig, run_dir: Path) -> None:
        submit(self.dispatcher, run_id, cfg, run_dir)

    def results(self, run_id: str, *, poll_s: float = 30.0) -> Iterator[dict[str, Any]]:
        """The run's reports as they come; ends after the final one. Raises the run's
        error (with the workers' traceback) if its gang died."""
        return results(self.dispatcher, run_id, poll_s=poll_s)

    def run_all(self, jobs: list[tuple[str, FinetuneConfig, Path]]) -> list[dict[str, Any]]:
        """Submit all (free gangs train them side by side) and wait: each final report."""
        for run_id, cfg, run_dir in jobs:
            self.submit(run_id, cfg, run_dir)
        finals = []
        for run_id, _, _ in jobs:
            reports = list(self.results(run_id))
            finals.append(reports[-1] if reports else {})
        return finals

    def cancel(self, run_id: str) -> None:
        import ray

        ray.get(self.dispatcher.cancel.remote(run_id))

    def close(self) -> list[int]:
        """Ends every gang's fit; how many fits each slot took."""
        import ray

        ray.get(self.dispatcher.close.remote(len(self.slots)))
        fits = ray.get(self.serving)
        for actor in self.slots:
            ray.kill(actor)
        ray.kill(self.dispatcher)
        return list(fits)


def submit(dispatcher: Any, run_id: str, cfg: FinetuneConfig, run_dir: Path) -> None:
    import ray

    from jobs.finetune import debug_knobs, max_failures

    job = {
        "run_id": run_id,
        "cfg": cfg,
        "run_dir": str(run_dir),
        "started": time.time(),
        "max_failures": max_failures(cfg),
    }
    ray.get(dispatcher.submit.remote({**job, **debug_knobs()}))


def results(dispatcher: Any, run_id: str, *, poll_s: float = 30.0) -> Iterator[dict[str, Any]]:
    import ray

    while True:
        result = ray.get(dispatcher.next_result.remote(run_id, poll_s))
        if result is None:
            continue
        if "error" in result:
            raise RuntimeError(f"run {run_id} failed in its gang:\n{result['error']}")
        if result.get("cancelled"):
            return
        yield result
        if result.get("final"):
            return
