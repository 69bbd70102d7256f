"""`perijax launch-local`: N processes on this machine joined by jax.distributed over
127.0.0.1, for developing and testing multi-host code without a cluster.

    perijax launch-local -n 2 --devices-per-process 4 -- train --config configs/tiny.py
    perijax launch-local -n 2 -- python my_script.py     # any command, same environment

Each process gets PERIJAX_COORDINATOR_ADDRESS / PERIJAX_NUM_PROCESSES / PERIJAX_PROCESS_ID and
(on CPU) its number of fake devices. Output lines are prefixed with the process id. If one
process fails, the others are stopped and its exit status is returned.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading

from perijax.cli.common import fail


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"{prefix}{line}")
        out.flush()


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch-local",
        help="run N local processes joined by jax.distributed (multi-host development)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("-n", "--num-processes", type=int, default=2)
    p.add_argument(
        "--devices-per-process", type=int, default=1, help="fake CPU devices per process"
    )
    p.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    p.add_argument(
        "argv", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="SUBCOMMAND ARGS or python ..."
    )


def run(args: argparse.Namespace) -> int:
    command = list(args.argv)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        return fail("launch-local needs a command after --")
    if args.num_processes < 1 or args.devices_per_process < 1:
        return fail("-n and --devices-per-process must be >= 1")
    if command[0] in ("python", "python3"):
        argv = [sys.executable, *command[1:]]
    else:
        argv = [sys.executable, "-m", "perijax.cli", *command]
    port = args.port or free_port()
    procs = []
    for rank in range(args.num_processes):
        env = dict(os.environ)
        env.update(
            PERIJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            PERIJAX_NUM_PROCESSES=str(args.num_processes),
            PERIJAX_PROCESS_ID=str(rank),
            JAX_NUM_CPU_DEVICES=str(args.devices_per_process),
        )
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags)
        proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        threading.Thread(
            target=_pump, args=(proc.stdout, f"[{rank}] ", sys.stdout), daemon=True
        ).start()
        procs.append(proc)
    status = 0
    try:
        remaining = list(procs)
        while remaining:
            for proc in list(remaining):
                try:
                    code = proc.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    continue
                remaining.remove(proc)
                if code and not status:
                    status = code
                    for other in remaining:  # one failed: the collectives of the rest would hang
                        other.send_signal(signal.SIGTERM)
    except KeyboardInterrupt:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            proc.wait()
        return 130
    return status
