"""Cells of a sweep in several processes that share the machine's CPU cores (``--jobs N``).

Each of the N worker processes imports Lightning once, sets its PyTorch threads to its share of the
cores (or to ``--threads``) and runs cells (each exactly as ``pl-pathsgd fit`` would) until none are left. A cell that
fails stops the handing out of new cells; the cells already running finish. SIGTERM to the runner
is passed on to the workers, whose trainers stop cleanly at their next step; the finished cells are
kept either way.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import time
import traceback
from dataclasses import dataclass, field

from pl_pathsgd.experiments.runner import SIGTERM_STATUS, fit_cell, stop_on_sigterm

_RESEND_SECONDS = 2.0  # a signal that reached a worker between cells is sent again once its trainer runs


@dataclass
class Outcome:
    finished: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    stopped: bool = False  # by SIGTERM


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_job(jobs: int) -> int:
    return max(1, available_cores() // jobs)


def run_in_workers(tasks: list[tuple[str, list[str]]], jobs: int, threads: int | None = None) -> Outcome:
    """Run ``pl-pathsgd fit <args>`` for every ``(name, args)`` of ``tasks`` in ``jobs`` worker processes with
    ``threads`` PyTorch threads each (default: their share of the cores)."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no copied locks or thread pools
    todo, results, stop = context.Queue(), context.Queue(), context.Event()
    for task in tasks:
        todo.put(task)
    jobs = min(jobs, len(tasks))
    for _ in range(jobs):
        todo.put(None)
    threads = threads or threads_per_job(jobs)
    workers = [context.Process(target=_work, args=(todo, results, stop, threads), name=f"pl-pathsgd-cell-{i}")
               for i in range(jobs)]
    print(f"running {len(tasks)} cells in {jobs} processes, {threads} thread(s) each", flush=True)
    outcome, reported = Outcome(), set()
    def forward() -> None:
        stop.set()
        _signal_all(workers)

    with stop_on_sigterm(forward) as sigterm:
        for worker in workers:
            worker.start()
        last_sent = time.monotonic()
        while any(w.is_alive() for w in workers) or not results.empty():
            try:
                name, status, detail = results.get(timeout=0.5)
            except queue.Empty:
                if sigterm.requested and time.monotonic() - last_sent > _RESEND_SECONDS:
                    _signal_all(workers)
                    last_sent = time.monotonic()
                continue
            reported.add(name)
            if status == "finished":
                outcome.finished.append(name)
            elif status == "interrupted":
                outcome.interrupted.append(name)
            else:
                outcome.failed.append((name, detail))
                stop.set()
        for worker in workers:
            worker.join()
            if worker.exitcode not in (0, SIGTERM_STATUS, -signal.SIGTERM) and not sigterm.requested:
                outcome.failed.append((worker.name, f"worker process ended with status {worker.exitcode}"))
        outcome.stopped = sigterm.requested
    return outcome


def _signal_all(workers) -> None:
    for worker in workers:
        if worker.is_alive() and worker.pid is not None:
            try:
                os.kill(worker.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def _work(todo, results, stop, threads: int) -> None:
    """A worker: run cells from ``todo`` until it is empty, a cell fails or SIGTERM arrives."""
    import torch

    torch.set_num_threads(threads)
    with stop_on_sigterm() as sigterm:
        while not stop.is_set() and not sigterm.requested:
            task = todo.get()
            if task is None:
                break
            name, args = task
            try:
                fit_cell(args)
            except SystemExit as error:
                if error.code == SIGTERM_STATUS:
                    results.put((name, "interrupted", ""))
                    break
                results.put((name, "failed", f"pl-pathsgd fit ended with exit status {error.code}"))
                break
            except Exception:  # noqa: BLE001 - reported to the runner, which stops handing out cells
                results.put((name, "failed", traceback.format_exc(limit=-8)))
                break
            results.put((name, "finished", ""))
