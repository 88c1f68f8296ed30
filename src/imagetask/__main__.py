"""``python -m imagetask``: the same as the ``imagetask`` command."""

import sys

from ._cli import main

sys.exit(main(sys.argv[1:]))
