"""One process of the multi-process test (started by `perijax launch-local`): trains together
with its peers and records the data rows this process loaded.

    python tests/mp_worker.py WORKDIR RECORD_DIR OVERRIDES_JSON
"""

import json
import os
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    workdir, record_dir, overrides = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    from perijax import cli, distributed

    cfg = cli._build_config("configs/tiny.py", list(overrides.items()))
    distributed.initialize(cfg.distributed)
    import jax

    from perijax import data as data_lib
    from perijax import train as train_lib

    loaded = []
    make_batches = data_lib.train_batches

    def recording_batches(*args, **kwargs):
        for batch in make_batches(*args, **kwargs):
            loaded.append(np.array(batch))
            yield batch

    data_lib.train_batches = recording_batches  # the trainer looks it up through the module
    train_lib.train(cfg, workdir, log=print)
    record_dir.mkdir(parents=True, exist_ok=True)
    np.save(record_dir / f"rank{jax.process_index()}.npy", np.stack(loaded))
    print(f"process {jax.process_index()}/{jax.process_count()} devices {jax.local_device_count()}")
    sys.stdout.flush()
    os._exit(0)  # skip slow interpreter teardown of the distributed client


if __name__ == "__main__":
    main()
