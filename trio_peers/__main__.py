"""``python -m trio_peers``: the ``trio-peers`` command line (:mod:`trio_peers._cli`)."""

import sys

from ._cli._main import main

sys.exit(main())
