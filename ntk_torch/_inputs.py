"""A batch of model inputs as real models take them: one tensor, or several.

A batch ``x`` is

- a tensor ``(N, ...)``: the model is called as ``model(x)``;
- a tuple or list of inputs: ``model(*x)``, e.g. ``(features, mask)``;
- a dict, or any other Mapping such as a tokenizer's ``BatchEncoding``: ``model(**x)``, e.g.
  ``{"input_ids": (N, L) int64, "attention_mask": (N, L) int64}``,

nested to any depth. Every tensor in it (a *leaf*) has the batch dimension ``N`` first.
Integer leaves (token ids, masks) are inputs only; floating leaves must have the parameters'
dtype. Keyword arguments that are not batched (flags, a cache setting) are passed apart, as
``model_kwargs``.

:func:`normalize` turns Mappings into dicts and lists into tuples, so that a batch is a
pytree that ``torch.func.vmap`` maps over leaf by leaf (``in_dims=0``); everything else here
(rows, concatenation, checks, hashing) works leaf by leaf on that form.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch

from ntk_torch._checks import describe
from ntk_torch._fingerprint import tensor_digest

Batch = Union[torch.Tensor, Sequence[Any], Mapping[str, Any]]
"""A batch as passed in: a tensor, or sequences and Mappings of tensors."""

Inputs = Union[torch.Tensor, tuple, dict]
"""A normalised batch (:func:`normalize`): a tensor, or tuples and dicts of them."""

_EXPECTED = ("a torch.Tensor (N, ...), a tuple or list of tensors (positional inputs) or a "
             "dict of tensors (keyword inputs), nested to any depth")


# -- structure ------------------------------------------------------------------------


def normalize(name: str, x: Any, *, alternative: str = "") -> Inputs:
    """``x`` as a tensor, or tuples and dicts of tensors, all with one batch dimension ``N``.

    ``alternative`` names another kind of value the caller accepts, for messages.

    Raises:
        TypeError: a part of ``x`` is neither a tensor, a sequence nor a Mapping with
            string keys.
        ValueError: a leaf has no batch dimension, or leaves disagree on ``N`` (the message
            names both leaves).

    Example:
        >>> batch = normalize("x1", {"ids": torch.zeros(4, 7, dtype=torch.long),
        ...                          "mask": [torch.ones(4, 7)]})
        >>> batch_size(batch), [label for label, _ in labelled_leaves("x1", batch)]
        (4, ["x1['ids']", "x1['mask'][0]"])
    """
    x = _structure(name, x, name, root=x, alternative=alternative)
    first_label, first = None, None
    for label, leaf in labelled_leaves(name, x):
        if leaf.dim() == 0:
            what = "a 0-d tensor" if label == name else f"a 0-d tensor at {label}"
            raise ValueError(f"`{name}` must have a batch dimension, shape (N, ...), got {what}")
        if first is None:
            first_label, first = label, leaf
        elif leaf.shape[0] != first.shape[0]:
            raise ValueError(
                f"every tensor of `{name}` must have the batch dimension N first: {first_label} "
                f"has N = {first.shape[0]} (shape {tuple(first.shape)}) but {label} has shape "
                f"{tuple(leaf.shape)}")
    return x


def _structure(name: str, x: Any, label: str, root: Any, convert: bool = False,
               alternative: str = "") -> Inputs:
    """Mappings as dicts and sequences as tuples, down to the tensors.

    ``convert`` makes tensors of other leaves (numbers, arrays) where it can; ``root`` (the
    whole value) and ``alternative`` are for messages.
    """
    if isinstance(x, torch.Tensor):
        return x
    rest = (convert, alternative)
    if isinstance(x, Mapping) and x and all(isinstance(k, str) for k in x):
        return {k: _structure(name, v, f"{label}[{k!r}]", root, *rest) for k, v in x.items()}
    if isinstance(x, (tuple, list)) and _holds_containers(x):
        return tuple(_structure(name, v, f"{label}[{i}]", root, *rest) for i, v in enumerate(x))
    if convert:
        try:
            return torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError):
            pass
    if isinstance(x, Mapping) and x:
        where = f" ({label}'s keys must be strings, keyword arguments: got {list(x)[:4]})"
    elif isinstance(x, (Mapping, tuple, list)) and not x:
        where = f" ({label} is empty)"
    else:
        where = "" if label == name else f" ({label} is {describe(x)})"
    raise TypeError(f"`{name}` must be {_EXPECTED}{alternative}, got {describe(root)}{where}")


def _holds_containers(x: Sequence) -> bool:
    # A sequence of numbers is one value (a tensor, if converting), not positional inputs.
    return any(isinstance(v, (torch.Tensor, Mapping, tuple, list)) for v in x)


def labelled_leaves(name: str, x: Inputs) -> list[tuple[str, torch.Tensor]]:
    """``(label, tensor)`` of every leaf in order, labelled as in ``x1['input_ids']``."""
    if isinstance(x, torch.Tensor):
        return [(name, x)]
    if isinstance(x, dict):
        parts = [(f"{name}[{key!r}]", v) for key, v in x.items()]
    else:
        parts = [(f"{name}[{i}]", v) for i, v in enumerate(x)]
    return [pair for label, v in parts for pair in labelled_leaves(label, v)]


def leaves(x: Inputs) -> list[torch.Tensor]:
    """The tensors of ``x``, in order."""
    return [leaf for _, leaf in labelled_leaves("x", x)]


def map_leaves(fn: Callable[..., torch.Tensor], x: Inputs, *others: Inputs) -> Inputs:
    """``x`` with each leaf ``t`` replaced by ``fn(t, *matching leaves of others)``.

    ``others`` must have ``x``'s structure (dicts are matched by key).
    """
    if isinstance(x, torch.Tensor):
        return fn(x, *others)
    if isinstance(x, dict):
        return {k: map_leaves(fn, v, *(o[k] for o in others)) for k, v in x.items()}
    return tuple(map_leaves(fn, v, *(o[i] for o in others)) for i, v in enumerate(x))


def skeleton(x: Inputs) -> str:
    """The structure without the values: ``"{'input_ids': Tensor, 'attention_mask': Tensor}"``."""
    if isinstance(x, torch.Tensor):
        return "Tensor"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k!r}: {skeleton(v)}" for k, v in x.items()) + "}"
    return "(" + ", ".join(skeleton(v) for v in x) + ("," if len(x) == 1 else "") + ")"


def _same_structure(a: Inputs, b: Inputs) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    if isinstance(a, dict) != isinstance(b, dict) or len(a) != len(b):
        return False
    if isinstance(a, dict):
        return set(a) == set(b) and all(_same_structure(a[k], b[k]) for k in a)
    return all(_same_structure(u, v) for u, v in zip(a, b))


# -- rows -----------------------------------------------------------------------------


def batch_size(x: Inputs) -> int:
    """``N``, the first dimension that every leaf shares."""
    return leaves(x)[0].shape[0]


def take(x: Inputs, start: int, stop: int | None) -> Inputs:
    """Samples ``start:stop`` of every leaf (views, no copy)."""
    return map_leaves(lambda t: t[start:stop], x)


def concat(parts: Sequence[Inputs]) -> Inputs:
    """The samples of ``parts`` (one structure) one after the other."""
    return map_leaves(lambda *ts: torch.cat(ts), parts[0], *parts[1:])


def stack(name: str, items: Sequence[Any], first_index: int = 0) -> Inputs:
    """A batch from samples without their batch dimension (a Dataset's items).

    Leaves that are not tensors (numbers, arrays) are converted; items must share one
    structure and each leaf one shape. ``first_index`` numbers the items in messages.
    """
    samples = [_structure(name, item, f"{name}[{first_index + i}]", item, convert=True)
               for i, item in enumerate(items)]
    for i, sample in enumerate(samples[1:], start=first_index + 1):
        if not _same_structure(sample, samples[0]):
            raise ValueError(f"`{name}`'s items must share one structure: item {first_index} is "
                             f"{skeleton(samples[0])}, item {i} is {skeleton(sample)}")
    labelled = zip(*(labelled_leaves(name, s) for s in samples))
    for column in labelled:
        shapes = sorted({tuple(leaf.shape) for _, leaf in column})
        if len(shapes) > 1:
            what = "items" if column[0][0] == name else f"items' {column[0][0].removeprefix(name)}"
            raise ValueError(f"`{name}`'s {what} must share one shape, got {shapes} among "
                             f"samples {first_index}-{first_index + len(samples) - 1}")
    return map_leaves(lambda *ts: torch.stack(ts), samples[0], *samples[1:])


def with_batch_dim(x: Inputs) -> Inputs:
    """One sample (leaves without ``N``, as ``vmap`` passes them) as a batch of one."""
    return map_leaves(lambda t: t.unsqueeze(0), x)


def to_device(x: Inputs, device: torch.device) -> Inputs:
    """Every leaf on ``device``."""
    return map_leaves(lambda t: t.to(device), x)


def equal(a: Inputs, b: Inputs) -> bool:
    """Same structure, and every leaf the same shape, dtype and values (on ``b``'s device)."""
    return _same_structure(a, b) and all(
        u.shape == v.shape and u.dtype == v.dtype and torch.equal(u.to(v.device), v)
        for u, v in zip(leaves(a), leaves(map_leaves(lambda _, t: t, a, b))))


# -- calling the model ----------------------------------------------------------------


def check_model_kwargs(model_kwargs: Any) -> dict[str, Any]:
    """``model_kwargs`` as a dict of keyword arguments (``None``: none)."""
    if model_kwargs is None:
        return {}
    if not isinstance(model_kwargs, Mapping) or not all(isinstance(k, str) for k in model_kwargs):
        raise TypeError("`model_kwargs` must be a dict of keyword arguments (str keys) passed on "
                        f"every call of the model, got {describe(model_kwargs)}")
    return dict(model_kwargs)


def arguments(x: Inputs, model_kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` of the model's call on ``x``, with ``model_kwargs`` added.

    ``model(x)`` for a tensor, ``model(*x)`` for a tuple, ``model(**x)`` for a dict.
    """
    if isinstance(x, dict):
        clash = sorted(set(x) & set(model_kwargs))
        if clash:
            raise ValueError(f"`model_kwargs` and the inputs both give the keyword arguments "
                             f"{clash}; batched inputs belong in `x1`/`x2`, the rest in "
                             "`model_kwargs`")
        return (), {**x, **model_kwargs}
    if isinstance(x, tuple):
        return x, model_kwargs
    return (x,), model_kwargs


# -- checks ---------------------------------------------------------------------------


def check_pair(x1: Any, x2: Any | None) -> tuple[Inputs, Inputs | None]:
    """``x1`` and ``x2`` normalised; ``x2`` (unless None) laid out as ``x1``."""
    x1 = normalize("x1", x1)
    if x2 is None:
        return x1, None
    x2 = normalize("x2", x2)
    check_same_layout("x2", x2, "x1", x1)
    return x1, x2


def check_same_layout(name: str, x: Inputs, reference_name: str, reference: Inputs) -> None:
    """``x`` has ``reference``'s structure and, leaf by leaf, trailing shape, dtype, device."""
    if not _same_structure(x, reference):
        raise ValueError(f"`{name}` must have `{reference_name}`'s structure "
                         f"{skeleton(reference)}, got {skeleton(x)}")
    ours = labelled_leaves(name, map_leaves(lambda _, t: t, reference, x))
    theirs = labelled_leaves(reference_name, reference)
    for (label, t), (ref_label, ref) in zip(ours, theirs):
        if tuple(t.shape[1:]) != tuple(ref.shape[1:]):
            raise ValueError(f"`{label}` must share `{ref_label}`'s trailing shape "
                             f"{tuple(ref.shape[1:])}, got {tuple(t.shape[1:])}")
        if t.dtype != ref.dtype:
            raise ValueError(f"`{label}` must have `{ref_label}`'s dtype {ref.dtype}, "
                             f"got {t.dtype}")
        if t.device != ref.device:
            raise ValueError(f"`{label}` must be on `{ref_label}`'s device {ref.device}, "
                             f"got {t.device}")


def check_against_params(name: str, x: Inputs, params: dict[str, torch.Tensor]) -> None:
    """Leaves live on the parameters' device and, if floating, share their dtype.

    The selected parameters must themselves share one device and one dtype.
    """
    if not params:
        return
    devices = {t.device for t in params.values()}
    dtypes = {t.dtype for t in params.values()}
    if len(devices) > 1:
        raise ValueError("the selected parameters must live on one device, "
                         f"got {sorted(map(str, devices))}")
    if len(dtypes) > 1:
        raise ValueError("the selected parameters must share one dtype, "
                         f"got {sorted(map(str, dtypes))}")
    param_name, p = next(iter(params.items()))
    for label, t in labelled_leaves(name, x):
        if t.device != p.device:
            raise ValueError(
                f"`{label}` is on {t.device} but the model's parameter {param_name!r} is on "
                f"{p.device}; move the inputs with x.to({str(p.device)!r}) or the model with "
                "model.to(...)")
        if t.is_floating_point() and t.dtype != p.dtype:
            raise ValueError(
                f"`{label}` has dtype {t.dtype} but the model's parameter {param_name!r} has "
                f"dtype {p.dtype}; convert one of them (e.g. x.to({p.dtype}) or "
                f"model.to({p.dtype})); integer inputs (token ids, masks) may stay integer")


# -- identity -------------------------------------------------------------------------


def layout(x: Inputs) -> tuple:
    """Hashable structure and per-leaf trailing shape, dtype and device (not the values)."""
    return (skeleton(x),) + tuple((label, tuple(t.shape[1:]), t.dtype, t.device)
                                  for label, t in labelled_leaves("x", x))


def describe_layout(x: Inputs) -> dict:
    """``{"sample_shape", "dtype"}`` of a tensor's samples, or of each leaf's by label.

    JSON-ready, for the manifest of a kernel store.
    """
    if isinstance(x, torch.Tensor):
        return {"sample_shape": list(x.shape[1:]), "dtype": str(x.dtype)}
    labelled = labelled_leaves("x", x)
    return {"sample_shape": {label: list(t.shape[1:]) for label, t in labelled},
            "dtype": {label: str(t.dtype) for label, t in labelled}}


def digest(x: Inputs) -> str:
    """SHA-256 of the structure and every leaf's dtype, shape and bytes.

    A plain tensor hashes as :func:`ntk_torch._fingerprint.tensor_digest` does.
    """
    if isinstance(x, torch.Tensor):
        return tensor_digest(x)
    h = hashlib.sha256(skeleton(x).encode())
    for label, t in labelled_leaves("x", x):
        h.update(f"{label}={tensor_digest(t)}".encode())
    return h.hexdigest()
