"""One rank's stream of micro-batches and what the trainer has taken from it: the part that the
single-dataset loader (loader.py) and the mixture (mix.py) share.

A loader's spans object (TokenSpans, RowSpans, PairSpans or mix.MixSpans) turns a stream position
into a span (`read`, in the process that reads) and a span into a batch (`finish`, in the training
process). `RankStream` walks one rank's rounds over DataLoader workers; `Taken` counts the rounds
the trainer consumed, which is all a loader's resume position needs, and restarts the walk when a
checkpoint's state is loaded.

DataLoader workers start from a forkserver, never by forking the rank: a rank runs threads (gloo's,
the run lock's heartbeat), and on Python 3.11 a fork while another thread adds or removes a Python
thread state leaves the child blocked for ever in `PyOS_AfterFork_Child` (seen in CI). The server
is a fresh single-threaded interpreter that imports this module once per rank (about 2 s, mostly
torch; started with the loader to overlap the model's build), after which a worker starts in about
0.1 s; a worker ends as soon as its rank does (`_end_with_rank`).
"""
from __future__ import annotations

import faulthandler
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import threading
import warnings
from multiprocessing.connection import wait
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.read.config import WebDatasetConfig
from data_pipeline.read.prefetch import PlannedSpans, Prefetcher
from data_pipeline.read.shard_table import DataWarning


class RankStream(IterableDataset):
    """Rounds first_round, first_round + 1, ... of one rank, split over DataLoader workers."""

    def __init__(self, spans: Any, *, base: int, first_round: int, rank: int, world_size: int,
                 remote: Sequence[tuple[PlannedSpans, WebDatasetConfig]] = ()) -> None:
        """spans: TokenSpans, RowSpans or mix.MixSpans; remote: (what is read, settings) of each
        remote corpus, whose shards a Prefetcher fetches."""
        self.spans, self.base, self.first_round = spans, base, first_round
        self.rank, self.world_size, self.remote = rank, world_size, remote

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        k = self.first_round + worker
        # created here: in the worker process that reads
        fetches = [Prefetcher(planned, cfg, round_pos=self._pos, stride=workers) for planned, cfg in self.remote]
        try:
            while True:
                for fetch in fetches:
                    fetch.advance(k)
                yield self.spans.read(self._pos(k))
                k += workers
        finally:
            self.spans.close()
            for fetch in fetches:
                fetch.close()

    def _pos(self, k: int) -> int:
        return self.base + (k * self.world_size + self.rank) * self.spans.unit


def _as_is(span: Any) -> Any:
    """DataLoader collate_fn: keep numpy (its default would make shared-memory tensors)."""
    return span


def worker_context() -> multiprocessing.context.BaseContext:
    """The DataLoader workers' start method: forkserver (module docstring). The server imports this
    module (torch, numpy) once; each worker then only unpickles its RankStream."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def prestart_workers(cfg: WebDatasetConfig) -> None:
    """Start the forkserver now (loader construction) when workers will be used: its imports then
    overlap the model's build instead of delaying the first batch. A fork+exec, safe in a threaded
    process; a no-op when the server already runs."""
    if cfg.num_workers > 0:
        worker_context()
        multiprocessing.forkserver.ensure_running()


def _end_with_rank(worker_id: int) -> None:
    """DataLoader worker_init_fn: end this worker when its rank ends, SIGKILL included; and let
    SIGUSR2 print its stacks as its rank's does (train/signals.py), instead of killing it.

    torch's workers watch their parent pid, which here is the forkserver; the forkserver in turn
    lives while any worker holds its "alive" pipe, so without this a killed rank's workers and
    server would wait on each other for ever (holding the rank's stdout and stderr). A forked
    worker inherited its rank's SIGUSR2 handler; one from the forkserver has the default action,
    which ends the process (and the rank's loader with it)."""
    faulthandler.register(signal.SIGUSR2, all_threads=True, chain=False)
    rank = multiprocessing.parent_process()
    if rank is not None:
        threading.Thread(target=_exit_on_eof, args=(rank.sentinel,), name="rank-watch", daemon=True).start()


def _exit_on_eof(sentinel: int) -> None:
    wait([sentinel])   # readable (EOF) once the rank has exited
    os._exit(1)


def batch_source(stream: RankStream, cfg: WebDatasetConfig) -> Iterator[Any]:
    """The stream's spans, read in the training process (num_workers=0) or by DataLoader workers."""
    if cfg.num_workers == 0:
        yield from stream
        return
    it = iter(DataLoader(stream, batch_size=None, num_workers=cfg.num_workers,
                         prefetch_factor=cfg.prefetch_factor, collate_fn=_as_is,
                         multiprocessing_context=worker_context(), worker_init_fn=_end_with_rank))
    try:
        yield from it
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def check_shape(rank: int, world_size: int, micro_batch_size: int, seq_len: int) -> None:
    """A loader's constructor arguments, or ValueError naming the wrong one."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside world_size={world_size}")
    if micro_batch_size < 1 or seq_len < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} and seq_len={seq_len} must be >= 1")


def check_same_world(state: dict[str, Any], world_size: int) -> None:
    """load_state_dict takes one rank's state of a run with this world size."""
    if state["world_size"] != world_size:
        raise ValueError(f"loader state is from world_size={state['world_size']}, this run has "
                         f"{world_size}: use load_elastic(states of every old rank)")


def elastic_start(states: list[dict[str, Any]]) -> tuple[dict[str, Any], int]:
    """(the state with the earliest position, how far the latest is past it) of every rank's
    state of one old run (each already checked); ValueError when they are not one run's."""
    if not states:
        raise ValueError("load_elastic needs the loader states of every rank of the old run")
    old = {int(s["world_size"]) for s in states}
    if len(old) != 1 or len(states) != old.pop():
        raise ValueError(f"load_elastic got {len(states)} states with world sizes {sorted(old)}: "
                         "pass the state of every rank of one run")
    earliest = min(states, key=lambda s: int(s["position"]))
    return earliest, max(int(s["position"]) for s in states) - int(earliest["position"])


class Taken:
    """What the trainer has taken from a loader: `rounds` (this rank's micro-batches since the
    last restart), the masked-token count and the bad-data warnings already given. `restart`
    (a loaded state) makes a running `batches` stop and start again from the loader's new position."""

    def __init__(self) -> None:
        self.rounds = 0
        self.generation = 0
        self.masked_tokens = 0
        self._warned: set[str] = set()

    def restart(self) -> None:
        self.rounds = 0
        self.generation += 1

    def batches(self, open_stream: Callable[[], RankStream], cfg: WebDatasetConfig,
                pin_memory: bool) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of the streams `open_stream` gives at the loader's position, counted as taken."""
        while True:
            generation = self.generation
            stream = open_stream()
            source = batch_source(stream, cfg)
            try:
                for span in source:
                    if generation != self.generation:
                        break
                    self.rounds += 1
                    self._note(span.notes)
                    batch = stream.spans.finish(span)
                    if pin_memory:
                        batch = {k: v.pin_memory() for k, v in batch.items()}
                    yield batch
                    if generation != self.generation:
                        break
            finally:
                source.close()

    def _note(self, notes: dict[str, Any]) -> None:
        self.masked_tokens += int(notes["masked_tokens"])
        for msg in notes["bad"]:
            if msg not in self._warned:
                self._warned.add(msg)
                warnings.warn(f"masked bad data (labels -100): {msg}", DataWarning, stacklevel=3)
