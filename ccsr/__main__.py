"""``python -m ccsr``: the command line (``ccsr.cli``), the same as the ``ccsr`` script."""

import sys

from ccsr.cli import main

sys.exit(main())
