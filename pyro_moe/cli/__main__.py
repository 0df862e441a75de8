"""``python -m pyro_moe.cli``: the ``pyro-moe`` command line, as ``python -m pyro_moe``."""

import sys

from pyro_moe.cli import main

sys.exit(main())
