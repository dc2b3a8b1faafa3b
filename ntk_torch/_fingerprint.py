"""What defines a kernel, in a form that can be stored and compared.

Hashes of the model, its parameter values and the inputs, and the settings.

A stored kernel is resumed only by a call whose fingerprint equals the stored one; the
comparison names every part that differs, in words a user can act on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn

# Sample outputs are compared to this many ulps of their dtype: enough for another thread
# count or rank to round differently, far too little for a changed forward pass.
OUTPUT_ULPS = 4096


def tensor_digest(*tensors: torch.Tensor) -> str:
    """SHA-256 of the tensors' dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for t in tensors:
        _update(h, t)
    return h.hexdigest()


def _update(h, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        # Bytes of any dtype (bfloat16 has no numpy type): view the storage as bytes.
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def model_digests(model: nn.Module) -> dict[str, str]:
    """Digests of the model's ``architecture`` and ``parameters``.

    ``architecture``: every module's name, class, settings and train/eval mode;
    ``parameters``: every parameter's and buffer's name and value (tied ones once).
    """
    arch = hashlib.sha256()
    for name, module in model.named_modules():
        kind = f"{type(module).__module__}.{type(module).__qualname__}"
        arch.update(f"{name}|{kind}|{module.extra_repr()}|{module.training}\n".encode())
    values = hashlib.sha256()
    for group in (model.named_parameters(), model.named_buffers()):
        for name, t in group:
            values.update(name.encode())
            _update(values, t)
    return {"architecture": arch.hexdigest(), "parameters": values.hexdigest()}


def inputs_digest(n: int, layout: dict, block_digest: Callable[[int, int], str], size: int,
                  inputs_id: str | None) -> dict:
    """Size and ``layout`` (sample shape and dtype), plus ``inputs_id`` or one hash per block.

    Blocks of ``size`` samples are hashed by ``block_digest(start, stop)``, so that a
    difference can be placed.
    """
    digest: dict = {"n": n, **layout}
    if inputs_id is not None:
        digest["id"] = inputs_id
    else:
        digest["blocks"] = [block_digest(s, min(s + size, n)) for s in range(0, n, size)]
    return digest


def outputs_close(stored: list[float], current: torch.Tensor) -> bool:
    """Whether a sample's outputs match the stored ones to rounding (``OUTPUT_ULPS``)."""
    values = current.detach().double().cpu().reshape(-1)
    if values.numel() != len(stored):
        return False
    reference = torch.tensor(stored, dtype=torch.float64)
    eps = torch.finfo(current.dtype).eps if current.is_floating_point() else 0.0
    tol = OUTPUT_ULPS * eps * max(float(reference.abs().max()) if len(stored) else 0.0, 1e-30)
    return bool(((values - reference).abs() <= tol).all())


def differences(stored: dict, current: dict, size: int) -> list[str]:
    """Human-readable parts of two fingerprints (see ``KernelSpec.fingerprint``) that differ."""
    out = []
    for key, label in (("architecture", "the model's architecture or train/eval mode"),
                       ("parameters", "the model's parameter or buffer values"),
                       ("selection", "the selected parameters")):
        if stored.get(key) != current.get(key):
            out.append(label)
    if (not out and "outputs" in stored
            and not outputs_close(stored["outputs"], torch.tensor(current["outputs"]))):
        out.append("the model's outputs on the first input (its forward computation changed)")
    for name in ("x1", "x2"):
        a, b = stored.get(name), current.get(name)
        if a == b:
            continue
        if a is None or b is None:
            out.append(f"`{name}` ({'given' if b is not None else 'None'} now, "
                       f"{'given' if a is not None else 'None'} in the store)")
            continue
        parts = [f"{k} {a.get(k)} -> {b.get(k)}" for k in ("n", "sample_shape", "dtype", "id")
                 if a.get(k) != b.get(k)]
        blocks_a, blocks_b = a.get("blocks"), b.get("blocks")
        if not parts and blocks_a is not None and blocks_b is not None:
            first = next(i for i, (u, v) in enumerate(zip(blocks_a, blocks_b)) if u != v)
            parts.append(f"values of samples {first * size}-{min((first + 1) * size, a['n']) - 1}")
        elif not parts:
            parts.append("identified by a hash in one call and by `inputs_id` in the other")
        out.append(f"`{name}` ({'; '.join(parts)})")
    return out
