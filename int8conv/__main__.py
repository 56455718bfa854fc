"""``python -m int8conv``: the ``int8conv`` command, for a Python whose scripts folder is not on PATH."""

import sys

from int8conv.cli import main

sys.exit(main())
