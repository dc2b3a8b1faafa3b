"""Argument parsing shared by the programs: one-line errors, exit status 2."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn


class UsageError(ValueError):
    """A bad command-line argument: reported in one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``prog: error: ...``) instead of usage + error."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def add_common_options(parser: argparse.ArgumentParser, *, seed_help: str = "random seed") -> None:
    """The options every program shares: engine, seed, device, threads, --quick."""
    parser.add_argument("--implementation", default="auto",
                        help="eNTK engine: auto, jacobian, ntk_vp or structured")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: finishes in seconds (tests)")


def apply_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def load_factory(spec: str) -> Callable:
    """``package.module:factory`` or ``path/to/file.py:factory`` -> the callable."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--model must look like package.module:factory or file.py:factory, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UsageError(f"--model {spec!r}: no file {str(path)!r}")
            loader = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except UsageError:
        raise
    except Exception as error:  # noqa: BLE001 - any import failure becomes a one-line message
        raise UsageError(f"--model {spec!r}: cannot import {module_name!r} ({type(error).__name__}: {error})") from error
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"--model {spec!r}: {module_name!r} has no callable {attr!r}")
    return factory
