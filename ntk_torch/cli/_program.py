"""What every program shares: its parser, its options, its one error style.

A program is ``main(argv) -> int`` built from ``parse(argv) -> Namespace`` and
``body(args) -> int`` by :func:`run_program`. Usage errors and recognised bad input
(:class:`UsageError`) end the program with one line on stderr,
``ntk-torch <command>: error: ...``, and exit status 2; a missing optional dependency
with the same one line, naming the extra that installs it, and exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import torch


class UsageError(ValueError):
    """A bad command-line argument or input: reported in one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse named ``ntk-torch <command>`` whose errors raise :class:`UsageError`."""

    def __init__(self, command: str, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(prog=f"ntk-torch {command}", **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see --help)")


def run_program(command: str, parse: Callable[[list[str]], argparse.Namespace],
                body: Callable[[argparse.Namespace], int], argv: list[str] | None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run ``body``; one-line errors, status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            args = parse(argv)
        except SystemExit as exit_:  # argparse's --help and --version
            return exit_.code if isinstance(exit_.code, int) else 0
        args.argv = argv
        with torch_threads(getattr(args, "threads", None)):
            return body(args)
    except UsageError as error:
        print(f"ntk-torch {command}: error: {error}", file=sys.stderr)
        return 2
    except ImportError as error:
        if "pip install 'ntk_torch[" not in str(error):  # not a missing extra: a bug
            raise
        print(f"ntk-torch {command}: error: {error}", file=sys.stderr)
        return 1


@contextmanager
def bad_input(context: str = "", errors: tuple[type[Exception], ...] = (ValueError, TypeError)
              ) -> Iterator[None]:
    """Re-raise the library's own input errors as :class:`UsageError` (``context``: prefix)."""
    try:
        yield
    except UsageError:
        raise
    except errors as error:
        raise UsageError(f"{context}{error}") from error


def add_common_options(parser: argparse.ArgumentParser, *, implementation: bool = True,
                       seed_help: str = "random seed", threads: int | None = None) -> None:
    """``--implementation``, ``--seed``, ``--device``, ``--threads`` and ``--quick``."""
    if implementation:
        parser.add_argument("--implementation", default="auto",
                            help="eNTK engine: auto, jacobian, ntk_vp or structured")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--device", default="auto",
                        help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=threads,
                        help="torch CPU threads (default: %s)" % (threads or "torch's"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: finishes in seconds")


def resolve_device(spec: str) -> torch.device:
    """``--device``: ``auto`` is cuda when available, else cpu; cuda must be available."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as error:
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    return device


def fill_preset(args: argparse.Namespace, preset: dict) -> None:
    """Sizes of a preset run (``--quick``, the default, ...) for the options not given."""
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def check_at_least(args: argparse.Namespace, minimum: int, *names: str) -> None:
    """Each ``--name`` must be an int ``>= minimum``."""
    for name in names:
        value = getattr(args, name)
        if value < minimum:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}")


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch CPU threads (None: unchanged), then restore the count."""
    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def config_of(args: argparse.Namespace, **extra) -> dict:
    """``config.json``'s content: the arguments (paths as text), then ``extra``."""
    config = {k: str(v) if isinstance(v, (Path, torch.device)) else v
              for k, v in vars(args).items()}
    return {**config, **extra}


def load_factory(spec: str) -> Callable:
    """``package.module:factory`` or ``path/to/file.py:factory`` -> the callable."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--model must look like package.module:factory or file.py:factory, "
                         f"got {spec!r}")
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
        raise UsageError(f"--model {spec!r}: cannot import {module_name!r} "
                         f"({type(error).__name__}: {error})") from error
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"--model {spec!r}: {module_name!r} has no callable {attr!r}")
    return factory
