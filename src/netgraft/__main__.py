"""``python -m netgraft``: the same command line as the ``netgraft`` script."""

from .cli import main

main()
