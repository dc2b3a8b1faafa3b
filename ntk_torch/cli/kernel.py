"""``ntk-torch kernel``: the eNTK per layer of an MLP on digits, or any model's into a store.

Without ``--store``: the per-layer eNTK of an MLP on scikit-learn's digits. Writes, under
``--out``: ``kernel.csv`` (long format: layer, i, j, label_i, label_j, value),
``spectrum.csv`` (layer, rank, eigenvalue), ``layers.csv`` (each layer's share of the
kernel's trace), ``kernel.png`` (heat maps, samples sorted by digit), ``spectrum.png``
(eigenvalues, log scale) and ``config.json``.

With ``--store DIR``: ``ntk_torch.compute_kernel`` of ``--model`` (a factory returning an
``nn.Module``, put in eval mode; default the digits MLP) on ``--inputs`` (a ``torch.save``d
tensor, ``(x, y)`` pair or dict with ``x1`` and optionally ``x2``; default the digits) into
the kernel store ``DIR``, tile by tile with a progress bar and ETA. Under ``torchrun`` the
ranks share the tiles (each on ``cuda:LOCAL_RANK`` with ``--device cuda``). An existing
store is continued only with ``--resume``.

    ntk-torch kernel --out results/kernel
    torchrun --nproc-per-node=2 -m ntk_torch.cli kernel --store results/digits_ntk --samples 1797
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import ntk_torch as nt
from ntk_torch.cli._program import (
    ArgumentParser,
    UsageError,
    add_common_options,
    bad_input,
    check_at_least,
    config_of,
    fill_preset,
    load_factory,
    resolve_device,
    run_program,
)
from ntk_torch.plotting import plot_kernel_matrices, plot_spectra

COMMAND = "kernel"
DEFAULT = {"samples": 200, "width": 512}
QUICK = {"samples": 30, "width": 32}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options, with the sizes of ``--quick`` or the default run filled in."""
    parser = ArgumentParser(COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/kernel"))
    parser.add_argument("--samples", type=int, help=f"digits used as inputs ({DEFAULT['samples']})")
    parser.add_argument("--width", type=int, help=f"hidden width ({DEFAULT['width']})")
    parser.add_argument("--depth", type=int, default=2, help="hidden layers")
    store = parser.add_argument_group("kernel store (bigger than memory, resumable, shared by "
                                      "processes)")
    store.add_argument("--store", type=Path, default=None, metavar="DIR",
                       help="compute the kernel into this store directory instead")
    store.add_argument("--model", default=None, metavar="MODULE:FACTORY",
                       help="your factory() -> nn.Module, from an importable module or a .py file")
    store.add_argument("--inputs", type=Path, default=None, metavar="FILE.pt",
                       help="torch.save'd inputs: a tensor, an (x, y) pair or "
                            "{'x1': ..., 'x2': ...}")
    store.add_argument("--mode", default="trace", choices=("trace", "diagonal", "full"))
    store.add_argument("--tile", type=int, default=1024, help="samples per tile side")
    store.add_argument("--resume", action="store_true", help="continue an existing store")
    add_common_options(parser)
    args = parser.parse_args(argv)
    fill_preset(args, QUICK if args.quick else DEFAULT)
    check_at_least(args, 2, "samples")
    check_at_least(args, 1, "width", "depth", "tile")
    args.device = resolve_device(args.device)
    return args


def build_mlp(width: int, depth: int) -> nn.Sequential:
    """A ReLU MLP on the digits (64 -> 10) with PyTorch's default initialisation."""
    layers: list[nn.Module] = []
    fan_in = 64
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(fan_in, 10))
    return nn.Sequential(*layers)


def run(args: argparse.Namespace) -> int:
    """The per-layer kernel of the digits MLP, or (``--store``) any model's into a store."""
    if args.store is not None:
        return compute_store(args)
    torch.manual_seed(args.seed)
    x, y = nt.data.load_digits(args.samples, seed=args.seed, sort_by_label=True)
    labels = y.numpy()
    model = build_mlp(args.width, args.depth).to(args.device).eval()
    x = x.to(args.device)

    start = time.perf_counter()
    with bad_input():
        ntk = nt.empirical_ntk_fn(model, mode="trace", implementation=args.implementation,
                                  layerwise=True)
    per_layer = {f"layer {name}": k.cpu().double() for name, k in ntk(x).items()}
    seconds = time.perf_counter() - start
    kernels = {"total": sum(per_layer.values()), **per_layer}
    spectra = {name: torch.linalg.eigvalsh(k).flip(0).clamp_min(0) for name, k in kernels.items()}

    args.out.mkdir(parents=True, exist_ok=True)
    write_kernels(args.out / "kernel.csv", kernels, labels)
    write_rows(args.out / "spectrum.csv", ["layer", "rank", "eigenvalue"],
               [(name, r, float(v)) for name, s in spectra.items() for r, v in enumerate(s)])
    total_trace = float(kernels["total"].trace())
    shares = [(name, float(k.trace()) / total_trace) for name, k in per_layer.items()]
    write_rows(args.out / "layers.csv", ["layer", "trace_share"], shares)
    plot_kernel_matrices(kernels, args.out / "kernel.png", labels=labels,
                         title="empirical NTK (trace mode), digits sorted by label")
    plot_spectra(spectra, args.out / "spectrum.png", title="eNTK spectrum")
    config = config_of(args, implementation_used=ntk.last_implementation,
                       seconds=round(seconds, 3), torch=torch.__version__,
                       ntk_torch=nt.__version__)
    (args.out / "config.json").write_text(json.dumps(config, indent=2))

    print(f"eNTK of a {args.depth}-hidden-layer ReLU MLP (width {args.width}) on {args.samples} "
          f"digits in {seconds:.2f} s ({ntk.last_implementation})")
    print(f"{'layer':<12}{'trace share':>12}")
    for name, share in shares:
        print(f"{name:<12}{share:>12.3f}")
    print(f"results in {args.out}/")
    return 0


def compute_store(args: argparse.Namespace) -> int:
    """``--store``: the kernel into a store, resumable and shared by torchrun ranks."""
    if (args.store / "manifest.json").exists() and not args.resume:
        raise UsageError(f"--store {str(args.store)!r} already holds a kernel store: pass --resume "
                         "to continue it, or choose a new directory")
    device = args.device
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.manual_seed(args.seed)  # every rank and every resumption builds the same model
    if args.model:
        model = load_factory(args.model)()
        if not isinstance(model, nn.Module):
            raise UsageError(f"--model {args.model!r} must return an nn.Module, "
                             f"got {type(model).__name__}")
    else:
        model = build_mlp(args.width, args.depth)
    model = model.to(device).eval()
    if args.inputs:
        x1, x2 = load_inputs(args.inputs)
    else:
        x1, x2 = nt.data.load_digits(args.samples, seed=args.seed)[0], None
    start = time.perf_counter()
    with bad_input(errors=(ValueError, TypeError, nt.StoreError, MemoryError)):
        store = nt.compute_kernel(model, x1, x2, store=args.store, mode=args.mode, tile=args.tile,
                                  implementation=args.implementation, progress=True)
    if int(os.environ.get("RANK", "0")) == 0:
        done, total = store.progress
        print(f"kernel store {args.store}: shape {store.shape}, mode {store.mode!r}, "
              f"{store.dtype}, "
              f"{done}/{total} tiles, engine {store.manifest['settings']['implementation']!r}, "
              f"{time.perf_counter() - start:.1f} s")
    return 0


def load_inputs(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x1, x2`` from a file holding a tensor, an ``(x, y)`` pair or ``{'x1', 'x2'}``/``{'x'}``."""
    if not path.is_file():
        raise UsageError(f"--inputs {str(path)!r}: no such file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file becomes a one-line message
        raise UsageError(f"--inputs {str(path)!r}: cannot load it with torch.load "
                         f"({error})") from error
    if isinstance(data, dict):
        x1 = data.get("x1", data.get("x"))
        x2 = data.get("x2")
    elif isinstance(data, (tuple, list)) and data:
        x1, x2 = data[0], None
    else:
        x1, x2 = data, None
    if not isinstance(x1, torch.Tensor) or not (x2 is None or isinstance(x2, torch.Tensor)):
        raise UsageError(f"--inputs {str(path)!r} must hold a tensor, an (x, y) pair or a "
                         f"dict with tensors 'x1' (or 'x') and optionally 'x2', "
                         f"got {type(data).__name__}")
    return x1, x2


def write_rows(path: Path, header: list[str], rows) -> None:
    """A CSV file: ``header``, then ``rows``."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_kernels(path: Path, kernels: dict[str, torch.Tensor], labels: np.ndarray) -> None:
    """``kernel.csv``: one row per (layer, i, j) with both samples' labels."""
    rows = ((name, i, j, int(labels[i]), int(labels[j]), float(k[i, j]))
            for name, k in kernels.items() for i in range(k.shape[0]) for j in range(k.shape[1]))
    write_rows(path, ["layer", "i", "j", "label_i", "label_j", "value"], rows)


def main(argv: list[str] | None = None) -> int:
    """Run ``ntk-torch kernel`` with ``argv`` (default: the command line); the exit status."""
    return run_program(COMMAND, parse_args, run, argv)
