#!/usr/bin/env bash
# One task of a perijax SLURM job: point jax.distributed at the job's coordinator, then run the
# command given as arguments (perijax train ...). srun starts one copy per node:
#   srun bash launch/slurm_task.sh perijax train --config ... --workdir ...
# The coordinator is the first host of the allocation on a port derived from the job id;
# PERIJAX_COORDINATOR_HOST / PERIJAX_COORDINATOR_PORT override them (the batch script sets the
# host once for all tasks; tests point it at 127.0.0.1).
set -euo pipefail
if [[ -z "${SLURM_NTASKS:-}" || -z "${SLURM_PROCID:-}" ]]; then
  echo "slurm_task: SLURM_NTASKS and SLURM_PROCID are unset: start this with srun" >&2
  exit 2
fi
if [[ $# -eq 0 ]]; then
  echo "slurm_task: no command to run" >&2
  exit 2
fi
host="${PERIJAX_COORDINATOR_HOST:-}"
if [[ -z "$host" ]]; then
  hosts="$(scontrol show hostnames "${SLURM_JOB_NODELIST:?}")"
  host="${hosts%%$'\n'*}"
fi
# One port per job id, so two jobs whose first node is the same host do not collide.
port="${PERIJAX_COORDINATOR_PORT:-$((10000 + ${SLURM_JOB_ID:-0} % 20000))}"
export PERIJAX_COORDINATOR_ADDRESS="${host}:${port}"
export PERIJAX_NUM_PROCESSES="$SLURM_NTASKS"
export PERIJAX_PROCESS_ID="$SLURM_PROCID"
exec "$@"
