"""``ntk-torch kernel``: see ``python scripts/kernel.py --help``."""

import sys

from ntk_torch.cli.kernel import main

if __name__ == "__main__":
    sys.exit(main())
