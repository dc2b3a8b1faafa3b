"""``python -m ntk_torch.cli <command>``: ``ntk-torch``, also as torchrun's ``-m`` runs it."""

import sys

from ntk_torch.cli import main

if __name__ == "__main__":
    sys.exit(main())
