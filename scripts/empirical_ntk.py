"""Per-layer empirical NTK of an MLP on the scikit-learn digits data.

Logic in ``ntk_torch/_apps/empirical_ntk.py`` (also ``ntk-torch kernel``); see ``--help``.
"""

import sys

from ntk_torch._apps.empirical_ntk import main

if __name__ == "__main__":
    sys.exit(main())
