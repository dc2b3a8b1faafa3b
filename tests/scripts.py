"""Load a program of ``scripts/`` as a module, as the tests call its ``main(argv)``."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(command: str) -> ModuleType:
    """``scripts/<command>.py``, the shim of ``ntk-torch <command>``."""
    spec = importlib.util.spec_from_file_location(f"{command}_script", SCRIPTS / f"{command}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
