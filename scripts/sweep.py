"""``ntk-torch sweep``: see ``python scripts/sweep.py --help``."""

import sys

from ntk_torch.cli.sweep import main

if __name__ == "__main__":
    sys.exit(main())
