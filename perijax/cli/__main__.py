"""`python -m perijax.cli ...` is the `perijax` command (the launchers and tests start it so)."""

import sys

from perijax.cli import main

sys.exit(main())
