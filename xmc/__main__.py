"""``python -m xmc`` = ``mhe-xmc``."""

from xmc.cli import main

main()
