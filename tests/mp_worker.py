"""One process of the multi-process tests (started by `perijax launch-local`): trains together
with its peers and records what this process did.

    python tests/mp_worker.py WORKDIR RECORD_DIR OVERRIDES_JSON [OPTIONS_JSON]

Records RECORD_DIR/rank{R}.npy (the data rows this process loaded) and RECORD_DIR/rank{R}.json:
the steps it saved, whether it was preempted, its last step, and a trace of the training loop
("step" when a step is dispatched, "agree" for the loop's agreement collective, and the name of
any jax.experimental.multihost_utils host collective). OPTIONS_JSON:
  {"frozen_clock_rank": R}: process R's checkpoint clock stands still (an extreme clock skew).
"""

import json
import os
import sys
import types
from pathlib import Path


def main() -> None:
    workdir, record_dir, overrides = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    options = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    from perijax import signals

    # As `perijax train` does, before anything starts threads (numpy's BLAS included): a thread
    # that does not block SIGTERM could take it and die of it.
    signals.install_signal_thread()
    import numpy as np

    from perijax import config as config_lib
    from perijax import distributed

    cfg = config_lib.load("configs/tiny.py", list(overrides.items()))
    distributed.initialize(cfg.distributed)
    import jax
    from jax.experimental import multihost_utils

    from perijax import checkpoint as checkpoint_lib
    from perijax import data as data_lib
    from perijax import sharding as sharding_lib
    from perijax import train as train_lib

    rank = jax.process_index()
    print(f"pid {os.getpid()} rank {rank}", flush=True)
    loaded, saves, trace = [], [], []
    make_iterator = data_lib.Datasets.train_iterator

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def __next__(self):
            batch = next(self.inner)
            loaded.append(np.array(batch))
            return batch

        def get_state(self):
            return self.inner.get_state()

        def set_state(self, state):
            self.inner.set_state(state)

    data_lib.Datasets.train_iterator = lambda self, **kw: Recording(make_iterator(self, **kw))

    def traced(module, name, label):
        inner = getattr(module, name)

        def wrapper(*args, **kwargs):
            trace.append(label)
            return inner(*args, **kwargs)

        setattr(module, name, wrapper)

    traced(sharding_lib, "global_batch", "step")
    traced(distributed, "start_agreement", "agree")
    for name in ("process_allgather", "broadcast_one_to_all", "sync_global_devices"):
        traced(multihost_utils, name, name)
    save = checkpoint_lib.Checkpointer.save

    def recording_save(self, step, *args, **kwargs):
        if step != self.last_saved_step:
            saves.append(step)
        return save(self, step, *args, **kwargs)

    checkpoint_lib.Checkpointer.save = recording_save
    if options.get("frozen_clock_rank") == rank:
        import time

        frozen = time.monotonic()
        checkpoint_lib.time = types.SimpleNamespace(monotonic=lambda: frozen)

    result = train_lib.train(cfg, workdir, log=print)
    record_dir.mkdir(parents=True, exist_ok=True)
    np.save(record_dir / f"rank{rank}.npy", np.stack(loaded))
    record = {
        "saves": saves,
        "preempted": result["preempted"],
        "step": int(result["state"].step),
        "trace": trace,
    }
    (record_dir / f"rank{rank}.json").write_text(json.dumps(record))
    print(f"process {rank}/{jax.process_count()} devices {jax.local_device_count()}")
    sys.stdout.flush()
    os._exit(0)  # skip slow interpreter teardown of the distributed client


if __name__ == "__main__":
    main()
