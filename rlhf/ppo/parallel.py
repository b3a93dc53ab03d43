"""Where the value model's half of PPO's work runs: beside the policy's on a second thread, or after it.

The trainer hands every piece of work that splits into a value half and a policy half (the rollout's
forwards and scoring, each update's forward, backward and optimizer step) to a runner's `run`, and
evaluation to its `all_threads`; `make_runner` picks the runner. Both compute the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol, TypeVar

import torch

A = TypeVar("A")
B = TypeVar("B")

# Measured on 2 cores: the side thread made PPO 1.05-1.3x faster at 0.1-3M parameters and 1.3x slower
# on SmolLM2-135M (26 vs 20 s per update: a 135M model keeps both cores busy alone, and generation
# then runs on half the threads).
SIDE_THREAD_MAX_PARAMS = 50_000_000


class Runner(Protocol):
    parallel: bool  # whether the two halves run at the same time (reported in metrics.json)

    def run(self, side: Callable[[], A], main: Callable[[], B]) -> tuple[A, B]:
        """(side(), main()); an exception in either is raised here."""
        ...

    def all_threads(self) -> AbstractContextManager[None]:
        """Every torch thread for work with nothing beside it (evaluation before and after)."""
        ...

    def close(self) -> None:
        ...


class Sequential:
    """Both halves on the calling thread, the side half first."""

    parallel = False

    def run(self, side: Callable[[], A], main: Callable[[], B]) -> tuple[A, B]:
        return side(), main()

    @contextmanager
    def all_threads(self) -> Iterator[None]:
        yield

    def close(self) -> None:
        pass


class SideThread:
    """A second thread for the value model's half of the work (its forward and backward, and the
    scoring), while the policy's half runs on the calling thread: on a CPU these models are too
    small to keep two cores busy with one op at a time, and the two halves share nothing (separate
    graphs, parameters, losses). PyTorch releases the GIL inside ops and runs each backward on the
    thread that calls it. Each thread keeps half the torch threads for the whole run: switching the
    count back and forth costs more than it saves (measured: OpenMP teams re-forming each update
    made the tiny bench 8% slower than no side thread; fixed halves made it 1.36x faster)."""

    parallel = True

    def __init__(self, threads: int) -> None:
        self.threads, self.half = threads, max(1, threads // 2)
        torch.set_num_threads(self.half)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="rlhf-value",
                                       initializer=torch.set_num_threads, initargs=(self.half,))

    def run(self, side: Callable[[], A], main: Callable[[], B]) -> tuple[A, B]:
        """(side(), main()), computed at the same time; an exception in either is raised here."""
        future = self.pool.submit(side)
        try:
            main_result = main()
        finally:
            side_result = future.result()
        return side_result, main_result

    @contextmanager
    def all_threads(self) -> Iterator[None]:
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(self.half)

    def close(self) -> None:
        """Hands the torch threads back (the pipeline runs the next stage in this process)."""
        self.pool.shutdown(wait=True)
        torch.set_num_threads(self.threads)


def make_runner(wanted: bool, world: int, device: torch.device, n_params: int) -> Runner:
    """The side thread where it pays: asked for, one process on a CPU with at least two torch
    threads, and a policy small enough not to keep the cores busy alone; else Sequential."""
    threads = torch.get_num_threads()
    if wanted and world == 1 and device.type == "cpu" and threads >= 2 and n_params < SIDE_THREAD_MAX_PARAMS:
        return SideThread(threads)
    return Sequential()
