"""``python -m mplslb``: the same as the ``mplslb`` command."""

from mplslb.cli import main

main()
