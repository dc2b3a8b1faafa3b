"""Independent oracle: the naive per-sample Jacobian by ``torch.autograd.grad``.

One backward pass per (sample, output), no torch.func, no vmap: slow and obviously right.
"""

from __future__ import annotations

import torch
from torch import nn


def naive_jacobian(model: nn.Module, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """``(N, O, P)``: derivatives of each flattened output w.r.t. the named parameters."""
    params = dict(model.named_parameters())
    selected = [params[n] for n in names]
    rows = []
    for a in range(x.shape[0]):
        out = model(x[a : a + 1]).reshape(-1)
        per_output = []
        for i in range(out.shape[0]):
            grads = torch.autograd.grad(out[i], selected, retain_graph=True, allow_unused=True)
            per_output.append(torch.cat([
                (g if g is not None else torch.zeros_like(p)).reshape(-1)
                for g, p in zip(grads, selected)
            ]))
        rows.append(torch.stack(per_output))
    return torch.stack(rows)


def naive_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None, mode: str,
              names: list[str] | None = None) -> torch.Tensor:
    """Oracle kernel in the given mode, by explicit Jacobians."""
    if names is None:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
    j1 = naive_jacobian(model, x1, names)
    j2 = j1 if x2 is None else naive_jacobian(model, x2, names)
    full = torch.einsum("aip,bjp->abij", j1, j2)
    if mode == "full":
        return full
    diagonal = full.diagonal(dim1=2, dim2=3)
    return diagonal if mode == "diagonal" else diagonal.mean(-1)


def owner_names(model: nn.Module) -> dict[str, list[str]]:
    """Trainable parameter names grouped by the qualified name of their module."""
    groups: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(name.rpartition(".")[0], []).append(name)
    return groups
