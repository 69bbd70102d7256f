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
    train_lib.train(cfg, workdir, log=print)
    record_dir.mkdir(parents=True, exist_ok=True)
    np.save(record_dir / f"rank{jax.process_index()}.npy", np.stack(loaded))
    print(f"process {jax.process_index()}/{jax.process_count()} devices {jax.local_device_count()}")
    sys.stdout.flush()
    os._exit(0)  # skip slow interpreter teardown of the distributed client


if __name__ == "__main__":
    main()
