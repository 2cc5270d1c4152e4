"""`python -m mmgcs`: the same as the `mmgcs` command (mmgcs/cli.py)."""

import sys

from mmgcs.cli import main

if __name__ == "__main__":
    sys.exit(main())
