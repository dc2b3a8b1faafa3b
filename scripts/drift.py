"""``ntk-torch drift``: see ``python scripts/drift.py --help``."""

import sys

from ntk_torch.cli.drift import main

if __name__ == "__main__":
    sys.exit(main())
