"""The ``ntk-torch`` command and its programs, one module per subcommand.

Each program ``ntk_torch.cli.<command>`` has ``main(argv) -> int``; ``ntk-torch <command>``,
``python -m ntk_torch.cli <command>`` (also under ``torchrun``) and
``python scripts/<command>.py`` all run that ``main`` with the same options
(``ntk-torch <command> --help``). The programs need the ``apps`` extra
(``pip install 'ntk_torch[apps]'``).
"""

from __future__ import annotations

import sys
from importlib import import_module

__all__ = ["COMMANDS", "main"]

COMMANDS = {
    "sweep": "width sweep: eNTK vs its infinite-width limit, drift and accuracy after training",
    "drift": "kernel drift and per-layer feature change while training MLPs on digits",
    "kernel": "per-layer eNTK of an MLP on digits, or any model's into a kernel store (--store)",
    "intuition": "the NTK on 1-D examples: toy models, eigenmodes, trained nets vs the NTK-GP",
}

USAGE = """usage: ntk-torch <command> [options]

Empirical neural tangent kernels of PyTorch models, their infinite-width limits, and
their drift during training, on scikit-learn's bundled digits.

commands:
{commands}

examples:
  ntk-torch sweep                       # the main job, in minutes; --full: the documented run
  ntk-torch sweep --parameterizations ntk mup --widths 128 512 2048 --seeds 3
  ntk-torch sweep --model mypackage.models:build     # your build(width, seed) -> nn.Module
  ntk-torch drift --widths 64 256 --out results/drift
  ntk-torch kernel --samples 100 --implementation structured
  ntk-torch kernel --model mypackage.models:build --inputs data.pt --store results/k --mode full
  torchrun --nproc-per-node=2 -m ntk_torch.cli kernel --samples 1797 --store results/digits
  ntk-torch intuition --out results/intuition
  ntk-torch sweep --help
"""


def usage() -> str:
    """The ``ntk-torch --help`` text: the commands and examples."""
    width = max(map(len, COMMANDS))
    commands = "\n".join(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items())
    return USAGE.format(commands=commands)


def main(argv: list[str] | None = None) -> int:
    """Run ``ntk-torch <command> [options]``; returns the exit status.

    Example:
        >>> main(["--version"])  # doctest: +ELLIPSIS
        ntk-torch ...
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in ("-V", "--version"):
        from ntk_torch import __version__

        print(f"ntk-torch {__version__}")
        return 0
    if command not in COMMANDS:
        print(f"ntk-torch: error: unknown command {command!r}; choose from "
              f"{', '.join(COMMANDS)} (see --help)", file=sys.stderr)
        return 2
    return import_module(f"ntk_torch.cli.{command}").main(rest)
