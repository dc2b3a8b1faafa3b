"""Empirical NTK: per layer for an MLP on the digits, or into a kernel store for any model.

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

    python scripts/empirical_ntk.py --out results/empirical_ntk
    torchrun --nproc-per-node=2 scripts/empirical_ntk.py --store results/digits_ntk --samples 1797
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import ntk_torch as nt
from ntk_torch._apps._args import ArgumentParser, UsageError, add_common_options, apply_threads, load_factory


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/empirical_ntk"))
    parser.add_argument("--samples", type=int, default=200, help="digits used as inputs")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=2, help="hidden layers")
    store = parser.add_argument_group("kernel store (bigger than memory, resumable, shared by processes)")
    store.add_argument("--store", type=Path, default=None, metavar="DIR",
                       help="compute the kernel into this store directory instead")
    store.add_argument("--model", default=None, metavar="MODULE:FACTORY",
                       help="your factory() -> nn.Module, from an importable module or a .py file")
    store.add_argument("--inputs", type=Path, default=None, metavar="FILE.pt",
                       help="torch.save'd inputs: a tensor, an (x, y) pair or {'x1': ..., 'x2': ...}")
    store.add_argument("--mode", default="trace", choices=("trace", "diagonal", "full"))
    store.add_argument("--tile", type=int, default=1024, help="samples per tile side")
    store.add_argument("--resume", action="store_true", help="continue an existing store")
    add_common_options(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.width = min(args.samples, 30), min(args.width, 32)
    if args.samples < 2:
        parser.error(f"--samples must be at least 2, got {args.samples}")
    return args


def build_mlp(width: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    fan_in = 64
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(fan_in, 10))
    return nn.Sequential(*layers)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    apply_threads(args.threads)
    if args.store is not None:
        try:
            return compute_store(args)
        except UsageError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    torch.manual_seed(args.seed)
    x, y = nt.data.load_digits(args.samples, seed=args.seed, sort_by_label=True)
    labels = y.numpy()
    model = build_mlp(args.width, args.depth).to(args.device).eval()
    x = x.to(args.device)

    start = time.perf_counter()
    try:
        ntk = nt.empirical_ntk_fn(model, mode="trace", implementation=args.implementation, layerwise=True)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
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
    plot_kernels(args.out / "kernel.png", kernels, labels)
    plot_spectra(args.out / "spectrum.png", spectra)
    config = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "implementation_used": ntk.last_implementation, "seconds": round(seconds, 3),
              "torch": torch.__version__, "ntk_torch": nt.__version__}
    (args.out / "config.json").write_text(json.dumps(config, indent=2))

    print(f"eNTK of a {args.depth}-hidden-layer ReLU MLP (width {args.width}) on {args.samples} digits "
          f"in {seconds:.2f} s ({ntk.last_implementation})")
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
    device = torch.device(args.device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.manual_seed(args.seed)  # every rank and every resumption builds the same model
    if args.model:
        model = load_factory(args.model)()
        if not isinstance(model, nn.Module):
            raise UsageError(f"--model {args.model!r} must return an nn.Module, got {type(model).__name__}")
    else:
        model = build_mlp(args.width, args.depth)
    model = model.to(device).eval()
    x1, x2 = load_inputs(args.inputs) if args.inputs else (nt.data.load_digits(args.samples, seed=args.seed)[0], None)
    start = time.perf_counter()
    try:
        store = nt.compute_kernel(model, x1, x2, store=args.store, mode=args.mode, tile=args.tile,
                                  implementation=args.implementation, progress=True)
    except (ValueError, TypeError, nt.StoreError, MemoryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        done, total = store.progress
        print(f"kernel store {args.store}: shape {store.shape}, mode {store.mode!r}, {store.dtype}, "
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
        raise UsageError(f"--inputs {str(path)!r}: cannot load it with torch.load ({error})") from error
    if isinstance(data, dict):
        x1 = data.get("x1", data.get("x"))
        x2 = data.get("x2")
    elif isinstance(data, (tuple, list)) and data:
        x1, x2 = data[0], None
    else:
        x1, x2 = data, None
    if not isinstance(x1, torch.Tensor) or not (x2 is None or isinstance(x2, torch.Tensor)):
        raise UsageError(f"--inputs {str(path)!r} must hold a tensor, an (x, y) pair or a dict with "
                         f"tensors 'x1' (or 'x') and optionally 'x2', got {type(data).__name__}")
    return x1, x2


def write_rows(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_kernels(path: Path, kernels: dict[str, torch.Tensor], labels: np.ndarray) -> None:
    rows = ((name, i, j, int(labels[i]), int(labels[j]), float(k[i, j]))
            for name, k in kernels.items() for i in range(k.shape[0]) for j in range(k.shape[1]))
    write_rows(path, ["layer", "i", "j", "label_i", "label_j", "value"], rows)


def plot_kernels(path: Path, kernels: dict[str, torch.Tensor], labels: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(kernels), figsize=(3.2 * len(kernels), 3.4), squeeze=False)
    boundaries = np.flatnonzero(np.diff(labels)) + 0.5
    for ax, (name, k) in zip(axes[0], kernels.items()):
        # Normalised (cosine) kernel: the raw diagonal would swamp the class structure.
        d = k.diagonal().clamp_min(torch.finfo(k.dtype).tiny).sqrt()
        image = ax.imshow((k / d[:, None] / d[None, :]).numpy(), cmap="viridis")
        for b in boundaries:
            ax.axhline(b, color="white", lw=0.3)
            ax.axvline(b, color="white", lw=0.3)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle("empirical NTK (trace mode, normalised K_ij / sqrt(K_ii K_jj)), digits sorted by label")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_spectra(path: Path, spectra: dict[str, torch.Tensor]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, s in spectra.items():
        s = s[s > 0]
        ax.loglog(np.arange(1, len(s) + 1), s.numpy(), label=name, lw=2 if name == "total" else 1)
    ax.set_xlabel("rank")
    ax.set_ylabel("eigenvalue")
    ax.set_title("eNTK spectrum")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

