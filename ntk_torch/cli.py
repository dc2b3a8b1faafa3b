"""The ``ntk-torch`` console command: ``sweep``, ``drift`` and ``kernel`` subcommands.

Each subcommand runs the same program as the matching script in ``scripts/`` and takes
the same options (``ntk-torch <command> --help``).
"""

from __future__ import annotations

import sys

COMMANDS = {
    "sweep": ("width_sweep", "width sweep: eNTK vs its infinite-width limit, drift and accuracy after training"),
    "drift": ("kernel_drift", "kernel drift and per-layer feature change while training MLPs on digits"),
    "kernel": ("empirical_ntk", "per-layer eNTK of an MLP on digits (heat maps, spectrum, CSV), or any "
                                "model's eNTK into an on-disk kernel store (--store)"),
}

USAGE = """usage: ntk-torch <command> [options]

Empirical neural tangent kernels of PyTorch models, their infinite-width limits, and
their drift during training, on scikit-learn's bundled digits.

commands:
{commands}

examples:
  ntk-torch sweep --quick --out results/sweep_quick
  ntk-torch sweep --parameterizations ntk mup --widths 128 512 2048 --seeds 3
  ntk-torch sweep --model mypackage.models:build     # your build(width, seed) -> nn.Module
  ntk-torch drift --widths 64 256 --out results/drift
  ntk-torch kernel --samples 100 --implementation structured
  ntk-torch kernel --model mypackage.models:build --inputs data.pt --store results/k --mode full
  torchrun --nproc-per-node=2 -m ntk_torch.cli kernel --samples 1797 --store results/digits
  ntk-torch sweep --help
"""


def usage() -> str:
    width = max(map(len, COMMANDS))
    return USAGE.format(commands="\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()))


def main(argv: list[str] | None = None) -> int:
    """Run ``ntk-torch <command> [options]``; returns the exit status."""
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
        print(f"ntk-torch: error: unknown command {command!r}; choose from {', '.join(COMMANDS)} (see --help)",
              file=sys.stderr)
        return 2
    from importlib import import_module

    app = import_module(f"ntk_torch._apps.{COMMANDS[command][0]}")
    try:
        return app.main(rest, prog=f"ntk-torch {command}")
    except SystemExit as exit_:  # argparse exits after --help or a usage error
        return exit_.code if isinstance(exit_.code, int) else 1


if __name__ == "__main__":
    sys.exit(main())
