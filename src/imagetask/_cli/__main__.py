"""``python -m imagetask._cli``: the same as the ``imagetask`` command."""

import sys

from . import main

sys.exit(main(sys.argv[1:]))
