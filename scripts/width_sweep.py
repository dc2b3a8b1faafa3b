"""Width sweep on digits: see ``ntk_torch/_apps/width_sweep.py`` or ``--help``.

    python scripts/width_sweep.py --out results/width_sweep
"""

import sys

from ntk_torch._apps.width_sweep import main

if __name__ == "__main__":
    sys.exit(main())
