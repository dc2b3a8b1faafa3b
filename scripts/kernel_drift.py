"""Kernel drift and per-layer feature change of MLPs trained on digits, across widths.

Logic in ``ntk_torch/_apps/kernel_drift.py`` (also ``ntk-torch drift``); see ``--help``.
"""

import sys

from ntk_torch._apps.kernel_drift import main

if __name__ == "__main__":
    sys.exit(main())
