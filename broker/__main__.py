"""``python -m broker [flags]``: the body of `dwal broker` (see broker/command.py)."""

import sys

from broker.command import main

sys.exit(main(sys.argv[1:]))
