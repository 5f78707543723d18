"""``python -m trio_peers``: the ``trio-peers`` command line."""

import sys

from ._cli import main

sys.exit(main())
