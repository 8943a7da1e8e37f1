"""Evaluation over several processes and machines with torch.distributed.

A distributed run is started by torchrun (`torchrun --nproc-per-node N -m effconv eval ...`, or across
machines through its rendezvous), or by `effconv eval --nproc N`, which starts torchrun's launcher (the
elastic agent) for this machine. Each process reads who it is (RANK, WORLD_SIZE, LOCAL_RANK) from the
environment the launcher gives it, joins the process group (gloo on CPU, nccl on CUDA: one GPU per process,
its LOCAL_RANK's), takes its contiguous share of the sorted image list, and exchanges results with the
others through the few collectives here. Without a launcher's environment everything here is the
one-process case: no group, one share holding everything.

A collective that fails because another process died (killed, lost with its machine) becomes a
DistributedError naming this rank: one line, not a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from effconv.errors import EffconvError, UsageError, one_line

# How long a process waits for the others at a collective (a slow rank, rank 0 writing the final files).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


class DistributedError(EffconvError):
    """A process of a distributed run failed, or lost contact with the others: the run stops, nothing written."""


@dataclass(frozen=True)
class Ranks:
    """Who this process is in its run: `rank` of `world_size` processes, `local_rank` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the outputs and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_ranks() -> Ranks | None:
    """The ranks torchrun's launcher gave this process through its environment; None without a launcher."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        world = int(env["WORLD_SIZE"])
        return Ranks(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", world)))
    except ValueError:
        raise UsageError("RANK, WORLD_SIZE, LOCAL_RANK must be whole numbers (as torchrun sets them)") from None


def current() -> Ranks:
    """This process's ranks in the joined process group; one process of one when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    launched = launched_ranks() or Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), launched.local_rank, launched.local_world_size)


def device_for(device: torch.device, ranks: Ranks) -> torch.device:
    """The device this process computes on: for CUDA under a launcher, its LOCAL_RANK's GPU."""
    if device.type != "cuda" or ranks.world_size == 1 and ranks.local_world_size == 1:
        return device
    if device.index is not None and ranks.local_world_size > 1:
        raise UsageError(
            f"--device {device} with {ranks.local_world_size} processes on this machine: give --device cuda "
            "(each process takes the GPU of its LOCAL_RANK)"
        )
    if device.index is not None:
        return device
    count = torch.cuda.device_count()
    if ranks.local_rank >= count:
        raise UsageError(
            f"local rank {ranks.local_rank} has no GPU: this machine has {count}; start at most {count} processes"
        )
    return torch.device("cuda", ranks.local_rank)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[tuple[torch.device, Ranks]]:
    """Join the process group the launcher prepared (gloo on CPU, nccl on CUDA) for the block.

    Yields this process's device (under a launcher, `--device cuda` becomes its LOCAL_RANK's GPU) and its
    ranks. Without a launcher's environment, or with a group already joined: nothing to join.
    """
    launched = launched_ranks()
    if launched is None or dist.is_initialized():
        yield device, current()
        return
    device = device_for(device, launched)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu" or launched.world_size == 1:
        backend = "gloo"
    else:
        raise UsageError(f"--device {device}: distributed evaluation runs on cpu (gloo) or cuda (nccl)")
    try:
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"rank {launched.rank} could not join the others: {one_line(e, max_lines=1)}") from e
    try:
        yield device, current()
    finally:
        with contextlib.suppress(RuntimeError, ValueError):
            dist.destroy_process_group()


@contextlib.contextmanager
def _contact() -> Iterator[None]:
    """A collective broken by another process's failure becomes one DistributedError line."""
    try:
        yield
    except RuntimeError as e:  # torch.distributed.DistBackendError and gloo's own errors are RuntimeErrors
        raise DistributedError(
            f"rank {dist.get_rank()} lost contact with the other processes ({_backend_message(e)}): "
            "another process failed or was stopped"
        ) from e


def _backend_message(error: BaseException) -> str:
    """gloo's and nccl's message without its source location and advice: "Read error [127.0.0.1]:21404: ..."."""
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", one_line(error, max_lines=1))
    return text.split(". This is typically caused", 1)[0]


def all_gather(obj: Any) -> list[Any]:
    """Every process's `obj` (picklable), in rank order, on every process."""
    ranks = current()
    if not ranks.distributed:
        return [obj]
    out: list[Any] = [None] * ranks.world_size
    with _contact():
        dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every process (the others pass anything, e.g. None)."""
    if not current().distributed:
        return obj
    box = [obj]
    with _contact():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def from_main(compute: Callable[[], Any]) -> Any:
    """`compute()` run by rank 0 alone (e.g. reading a file only its machine has); its value on every process.

    An EffconvError it raises is raised by every process alike, so that none waits for the others.
    """
    ranks = current()
    if not ranks.distributed:
        return compute()
    outcome: tuple[Any, EffconvError | None] | None = None
    if ranks.is_main:
        try:
            outcome = (compute(), None)
        except EffconvError as e:
            outcome = (None, e)
    value, error = broadcast(outcome)
    if error is not None:
        raise on_every_rank(error)
    return value


def barrier() -> None:
    if current().distributed:
        with _contact():
            dist.barrier()


def share(items: Sequence, ranks: Ranks) -> Sequence:
    """This process's contiguous share of `items`: every item in exactly one share, sizes within one.

    Unlike torch's DistributedSampler nothing is repeated to even the shares out, so no image is
    counted twice.
    """
    count = len(items)
    return items[count * ranks.rank // ranks.world_size : count * (ranks.rank + 1) // ranks.world_size]


def largest_share(count: int, world_size: int) -> int:
    return -(-count // world_size)


def on_every_rank(error: EffconvError) -> EffconvError:
    """Mark an error that every process raises alike (decided from gathered results): rank 0 alone reports it."""
    error.on_every_rank = True
    return error


# --- effconv eval --nproc N: torchrun's launcher for this machine ---------------------------------------

_LAUNCHER_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher")


def launch_here(nproc: int, argv: Sequence[str]) -> int:
    """Run `python -m effconv *argv` in `nproc` processes on this machine through torchrun's launcher.

    Returns 0 when every process succeeded, else the exit code to leave with: a process that exited with an
    error has printed its own line; a process killed by a signal is reported here as a DistributedError.
    The others are stopped by the launcher as soon as one fails.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if "OMP_NUM_THREADS" not in os.environ:  # the cores shared out, as torchrun does (it gives each 1)
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    with tempfile.TemporaryDirectory(prefix="effconv-eval-") as logs, _quiet_launcher():
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=str(uuid.uuid4()),
            rdzv_backend="c10d",
            rdzv_endpoint="localhost:0",  # torchrun --standalone: a store on a free port
            max_restarts=0,
            monitor_interval=0.1,
            logs_specs=DefaultLogsSpecs(log_dir=logs),
        )
        try:
            elastic_launch(config, sys.executable)("-m", "effconv", *argv)
        except ChildFailedError as e:
            return _exit_code(e.failures)
        except SignalException as e:  # Ctrl-C or SIGTERM to this launcher: the launcher stopped every process
            error = DistributedError(f"stopped by {signal.Signals(e.sigval).name}: every process was stopped")
            error.exit_code = 128 + int(e.sigval)  # 130, 143 as for any effconv command
            raise error from None
    return 0


def _exit_code(failures: dict) -> int:
    """What ended the run, out of the failures the launcher lists (those it stopped itself included).

    A process killed by a signal other than SIGTERM (SIGKILL, the out-of-memory killer, a crash) is the cause
    (the launcher stops the others with SIGTERM, and their broken collectives make them fail too); otherwise
    the first process that exited with an error of its own, which printed its line.
    """
    ordered = sorted(failures.items(), key=lambda item: (item[1].timestamp, item[0]))
    killed = [(rank, f) for rank, f in ordered if f.exitcode < 0 and f.exitcode != -signal.SIGTERM]
    errors = [(rank, f) for rank, f in ordered if f.exitcode > 0]
    if killed or not errors:
        rank, failure = (killed or ordered)[0]
        raise DistributedError(
            f"the process of rank {rank} was killed by {failure.signal_name()}; the run stopped, no result written"
        )
    return errors[0][1].exitcode


@contextlib.contextmanager
def _quiet_launcher() -> Iterator[None]:
    """The launcher's log lines (its config, each failure's report) stay out of effconv's one-line errors."""
    loggers = [logging.getLogger(name) for name in _LAUNCHER_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
