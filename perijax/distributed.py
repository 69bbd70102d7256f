"""Multi-process initialization: explicit settings, environment variables, or cluster detection.

Precedence: `distributed.*` config keys > PERIJAX_COORDINATOR_ADDRESS / PERIJAX_NUM_PROCESSES /
PERIJAX_PROCESS_ID (set by `perijax launch-local`) > automatic detection on SLURM, Open MPI and
multi-host TPU VMs (jax.distributed's own cluster detection) > a single process.
Must run before anything initializes a JAX backend.

`start_agreement` / `finish_agreement` are how a multi-process run takes a decision that every
process must take alike (stop, save on a clock): one small collective, started at steps where
the training loop synchronizes anyway and read one step later (docs/checkpointing.md).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from perijax.config import ConfigError, DistributedConfig


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError as e:
        raise ConfigError(f"environment variable {name}={value!r} must be an integer") from e


def detected_cluster() -> str | None:
    """The multi-process cluster this process runs in, if any."""
    if os.environ.get("SLURM_JOB_ID") and _env_int("SLURM_NTASKS", 1) > 1:
        return "slurm"
    if _env_int("OMPI_COMM_WORLD_SIZE", 1) > 1:
        return "mpi"
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or os.environ.get(
        "MEGASCALE_COORDINATOR_ADDRESS"
    ):
        return "tpu"
    return None


def _keep_signals_for_the_trainer() -> None:
    """JAX's preemption service (on by default) takes SIGTERM for itself, and then the trainer
    never sees it; perijax agrees on the stop itself (SIGINT included), so it is turned off."""
    jax.config.update("jax_enable_preemption_service", False)


def initialize(cfg: DistributedConfig) -> int:
    """Starts jax.distributed when this is a multi-process run; returns the process count."""
    address = cfg.coordinator_address or os.environ.get("PERIJAX_COORDINATOR_ADDRESS", "")
    num = cfg.num_processes or _env_int("PERIJAX_NUM_PROCESSES", 0)
    pid = cfg.process_id if cfg.process_id >= 0 else _env_int("PERIJAX_PROCESS_ID", -1)
    if address or num > 1:
        if not address or num < 1 or not 0 <= pid < num:
            raise ConfigError(
                "a multi-process run needs distributed.coordinator_address (host:port), "
                f"distributed.num_processes and distributed.process_id in [0, num_processes); "
                f"got {address!r}, {num}, {pid}"
            )
        _keep_signals_for_the_trainer()
        jax.distributed.initialize(address, num_processes=num, process_id=pid)
        return num
    if detected_cluster():
        _keep_signals_for_the_trainer()
        jax.distributed.initialize()
        return jax.process_count()
    return 1


@functools.cache
def _flag_layout() -> tuple[NamedSharding, Callable]:
    """(sharding of a [processes, k] array with row p on process p, the jitted all-gather)."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    mesh = Mesh(np.array(devices).reshape(jax.process_count(), -1), ("process", "local"))
    gather = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, PartitionSpec()))
    return NamedSharding(mesh, PartitionSpec("process")), gather


def start_agreement(stop: bool, save: bool) -> Any:
    """Starts the agreement on two decisions: whether to stop (any process may ask) and whether
    to save (process 0's answer counts). Returns a handle for `finish_agreement`.

    Every process must call this at the same step: it is one collective, an all-gather of two
    flags that runs on the devices after the steps already queued, so starting it does not make
    the host wait. A decision read from a process's own clock is taken from process 0 alone, so
    clocks that drift apart cannot make some processes save (a collective) and others not.
    """
    if jax.process_count() == 1:
        return stop, save
    sharding, gather = _flag_layout()
    local = np.asarray([[stop, save]], np.int32)
    n = jax.process_count()
    return gather(jax.make_array_from_process_local_data(sharding, local, (n, 2)))


def finish_agreement(handle: Any) -> tuple[bool, bool]:
    """(stop, save), the same on every process; waits for the steps queued before the start."""
    if isinstance(handle, tuple):
        return handle
    flags = np.asarray(handle.addressable_data(0))
    return bool(flags[:, 0].any()), bool(flags[0, 1])
