"""``ntk-torch intuition``: see ``python scripts/intuition.py --help``."""

import sys

from ntk_torch.cli.intuition import main

if __name__ == "__main__":
    sys.exit(main())
