"""Multi-process initialization: explicit settings, environment variables, or cluster detection.

Precedence: `distributed.*` config keys > PERIJAX_COORDINATOR_ADDRESS / PERIJAX_NUM_PROCESSES /
PERIJAX_PROCESS_ID (set by `perijax launch-local`) > automatic detection on SLURM, Open MPI and
multi-host TPU VMs (jax.distributed's own cluster detection) > a single process.
Must run before anything initializes a JAX backend.
"""

from __future__ import annotations

import os

import jax

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
        jax.distributed.initialize(address, num_processes=num, process_id=pid)
        return num
    if detected_cluster():
        jax.distributed.initialize()
        return jax.process_count()
    return 1
