"""One rule per layer kind, registered by module type (see ``_base``).

Every public module of this package defines one rule and registers it; they are all
imported here, so adding a layer type is adding one module.
"""

from __future__ import annotations

import importlib
import pkgutil

from ntk_torch._engines._layers._base import LayerRule, Site, layer_calls, register, rule_for

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["LayerRule", "Site", "layer_calls", "register", "rule_for"]
