"""``python -m ccsr``: the command line (``ccsr.cli``), the same as the ``ccsr`` script.

``python -m`` puts the current folder first on ``sys.path``; it is taken off before anything else is
imported, so a file in the folder ccsr is run from (a run directory, say) cannot stand in for a library
(docs/trust.md). The ``ccsr`` script never had it.
"""

import os
import sys

sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]

from ccsr.cli import main  # noqa: E402

sys.exit(main())
