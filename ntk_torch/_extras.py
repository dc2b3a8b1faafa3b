"""Optional dependencies: imported where a feature needs them, named when missing.

The core (kernels, analytic limits, tracking, predictions) needs torch, numpy and tqdm
only; plots, programs, data sets and the on-disk kernel store come with extras.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` or raise an ImportError naming the extra that installs it.

    Example:
        >>> require("math", "plot", "plots").sqrt(4.0)
        2.0
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = module.split(".")[0]
        raise ImportError(
            f"{feature} needs the optional dependency {package!r}, which is not installed: "
            f"pip install 'ntk_torch[{extra}]'"
        ) from error
