"""``python -m pyro_moe``: the ``pyro-moe`` command line (:mod:`pyro_moe.cli`)."""

import sys

from pyro_moe.cli import main

sys.exit(main())
