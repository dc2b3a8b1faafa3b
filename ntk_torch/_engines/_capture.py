"""What the structured engine captures: layer inputs and output cotangents.

Two ways to get them, with the same result:

- **batched** (``capture_batched``): the model runs once on the whole batch with a zero
  leaf added to every structured layer's output (a forward hook); then ``O`` ordinary
  backward passes, one per output, give the cotangents of all samples at those leaves.
  Plain autograd on batch-sized tensors, no vectorising transform: the fastest way on CPU.
  It needs every sample's outputs to depend on that sample alone (checked: the first
  sample is also run on its own), batch-first layer calls, and no fallback parameter
  (their per-sample Jacobians need the per-sample transform below).
- **per sample** (``capture_per_sample``): ``vmap`` over samples of a ``vjp`` vectorised
  over the output basis; it also returns the fallback parameters' per-sample Jacobians, and
  ``compute`` prefers it where every layer takes the Gram route (no streaming or factoring
  to gain; dense nets run about 10% faster this way).

The batched capture also finds *separable heads* (see ``separable_heads``): a layer whose
output reaches a later vector ``h`` channel by channel — ReLU/BatchNorm, global average
pooling and flattening before a classifier — has cotangents that factor as
``δ_i[c, t] = V[i, c] U[c, t]`` with ``V`` the cotangent at ``h`` and ``U`` one
vector-Jacobian product of ``Σ h``. Such a layer's kernel block needs ``U`` and ``V``
only (``_structured_rules.factored_features``), not its ``O`` cotangents.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch.func import vjp, vmap

from ntk_torch._engines._structure import Structure
from ntk_torch._engines._structured_rules import cotangents, input_feature

# Through a separable head the cotangent equals V[c]·U[c, t] up to the rounding of a few
# products per element; mixing across channels or a path around h breaks it by O(1).
SEPARABLE_RTOL_ULPS = 64


@dataclass
class Captured:
    """``O`` outputs; input features ``{site: (N, *in)}``, cotangents ``{site: (N, O, *out)}``,
    fallback Jacobians ``{name: (N, O, *shape)}`` and separable heads ``{site: (U, V)}`` with
    ``U (N, *out)`` (the head's cotangent at the layer's output) and ``V (N, O, C)``."""

    n_out: int
    feats: dict[int, torch.Tensor]
    cots: dict[int, torch.Tensor]
    fallback: dict[str, torch.Tensor] = field(default_factory=dict)
    heads: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class _NotBatched(Exception):
    """A layer call without the model's batch as its first dimension."""


@contextmanager
def _site_hooks(modules, sites, perturb, feats, inputs=None, outputs=None):
    """At the k-th layer call keep its input feature and return ``output + perturb(k, output)``;
    ``inputs``/``outputs`` get that input and returned tensor with their version counters."""
    calls = iter(range(len(sites)))

    def hook(module, args, output):
        k = next(calls)
        site = sites[k]
        if modules[site.module] is not module:
            raise RuntimeError(
                f"the structured engine saw layer calls in a different order than when it probed "
                f"the model (expected {site.module!r}); the model's control flow depends on its "
                "inputs: use implementation='jacobian'"
            )
        with torch.no_grad():
            feats[k] = input_feature(site.kind, module, args[0].detach())
        result = output + perturb(k, output)
        if inputs is not None:
            # With the versions at this point: an in-place operation later (LeakyReLU(inplace=True)
            # on the layer's output) changes what the tensor holds and its autograd node.
            inputs[k], outputs[k] = (args[0], args[0]._version), (result, result._version)
        return result

    with ExitStack() as stack:
        for m in {id(modules[s.module]): modules[s.module] for s in sites}.values():
            stack.callback(m.register_forward_hook(hook).remove)
        yield


def fast_layout(t: torch.Tensor) -> torch.Tensor:
    """Same values; 2-d convolution weights in channels-last layout.

    oneDNN then runs the convolutions and, above all, the transposed convolutions of the
    backward pass in channels-last, several times faster on CPU for the cotangents.
    """
    if t.dim() == 4 and t.device.type == "cpu":
        return t.contiguous(memory_format=torch.channels_last)
    return t


def capture_per_sample(fm, params, x, structure: Structure) -> Captured:
    """One forward and one backward, both vectorised over samples (and outputs)."""
    modules = dict(fm.module.named_modules())
    sites = structure.sites
    fallback = {n: params[n] for n in structure.fallback}
    fixed = {n: fast_layout(t) for n, t in params.items() if n not in fallback}
    ref = next(iter(params.values()))

    def per_sample(xs):
        zeros = tuple(torch.zeros(s.out_shape, dtype=s.out_dtype, device=ref.device) for s in sites)

        def f(eps, fb):
            feats = [None] * len(sites)
            with _site_hooks(modules, sites, lambda k, _: eps[k], feats):
                out = fm.single({**fixed, **fb}, xs)
            return out, tuple(feats)

        out, vjp_fn, feats = vjp(f, zeros, fallback, has_aux=True)
        basis = torch.eye(out.numel(), dtype=out.dtype, device=out.device)
        d_eps, d_fb = vmap(vjp_fn)(basis)
        return feats, d_eps, d_fb

    # torch.func ignores an outer no_grad; it only stops unselected parameters that
    # require grad from recording a graph nobody will use.
    with torch.no_grad():
        feats, d_eps, d_fb = vmap(per_sample, randomness="error")(x)
    n_out = next(iter([*d_eps, *d_fb.values()])).shape[1]
    return Captured(n_out, dict(enumerate(feats)), dict(enumerate(d_eps)), d_fb)


@dataclass
class Plan:
    """What ``compute`` wants from a batched capture, decided once ``O`` is known.

    Attributes:
        factor: sites with a candidate head to factor where it is separable on the batch.
        consumers: ``{site: consume(i, g)}`` taking output ``i``'s cotangents ``g``
            ``(N, 1, 1, *out)`` as they come (streamed per-sample gradients); those sites
            are left out of :attr:`Captured.cots`.
    """

    factor: set[int] = field(default_factory=set)
    consumers: dict[int, Callable[[int, torch.Tensor], None]] = field(default_factory=dict)


def capture_batched(fm, params, x, structure: Structure,
                    plan: Callable[[int, dict], Plan] = lambda n_out, feats: Plan()) -> Captured | None:
    """Batched forward and ``O`` backward passes; None where that would not be per-sample.

    ``plan(O, features)`` says which candidate heads to factor and which sites' cotangents
    to stream into consumers. With one factored head at site ``s``, the sites that the
    outputs reach only through ``s``'s output ``y`` (checked on the autograd graph) get their
    cotangents by a backward from ``y`` with ``δ_i = V_i U`` (exact there), skipping the
    head's own backward (pooling, activations) for every output.
    """
    fixed = {n: fast_layout(t) for n, t in params.items()}
    run = _forward(fm, fixed, x, structure)
    if run is None or not _samples_independent(fm, fixed, x, run.out):
        return None
    out, n, n_out = run.out, x.shape[0], run.out.shape[1]
    # The per-sample layouts: the layer's batch dimension of one after (N,) / (N, O).
    feats = {k: f.unsqueeze(1) for k, f in enumerate(run.feats)}
    wants = plan(n_out, feats)
    heads = separable_heads(structure, run, [(s, r) for s, r in structure.heads if s in wants.factor])
    readouts = sorted({r for r, _ in heads.values()})
    rest = [k for k in range(len(structure.sites)) if k not in heads]
    below: list[int] = []
    y = run.output(next(iter(heads))) if len(heads) == 1 else None
    if y is not None:
        ((s, (_, u_head)),) = heads.items()
        direct = _leaves_reached(out.grad_fn, stop=y.grad_fn)
        below = [k for k in rest if id(run.eps[k]) not in direct]
        channel_shape = [1] * y.dim()
        channel_shape[0], channel_shape[_channel_axis(structure.sites[s])] = n, -1
    above = [k for k in rest if k not in below]
    targets = [run.eps[k] for k in above] + [run.input(r) for r in readouts]
    kept: dict = {}

    def take(key, i: int, g: torch.Tensor | None, like: torch.Tensor) -> None:
        g = torch.zeros_like(like) if g is None else g
        if key in wants.consumers:
            wants.consumers[key](i, g[:, None, None])
            return
        if key not in kept:
            kept[key] = _outputs_buffer(g, n_out)
        kept[key][:, i].copy_(g)

    with torch.enable_grad():
        for i in range(n_out):
            grads = torch.autograd.grad(out[:, i].sum(), targets, retain_graph=True, allow_unused=True)
            for key, g, t in zip([*above, *(("v", r) for r in readouts)], grads, targets):
                take(key, i, g, t)
            if below:
                # In y's memory layout: a channels-last cotangent keeps the convolutions'
                # backward in channels-last (several times faster on CPU).
                d_y = torch.mul(kept[("v", readouts[0])][:, i].reshape(channel_shape), u_head,
                                out=torch.empty_like(y))
                grads = torch.autograd.grad(y, [run.eps[k] for k in below], d_y, retain_graph=True,
                                            allow_unused=True)
                for k, g in zip(below, grads):
                    take(k, i, g, run.eps[k])
    factored = {s: (u, kept[("v", r)].reshape(n, n_out, -1)) for s, (r, u) in heads.items()}
    return Captured(n_out, feats, {k: kept[k].unsqueeze(2) for k in rest if k in kept}, heads=factored)


def _channel_axis(site) -> int:
    """Axis of the output channels in a layer's output: 1 for convolutions, last for Linear."""
    return 1 if site.kind == "conv" else len(site.out_shape) - 1


def _leaves_reached(root, stop) -> set[int]:
    """``id``s of the leaf tensors whose gradients ``root``'s backward reaches without
    passing through the node ``stop``."""
    seen: set[int] = set()
    leaves: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or node is stop or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.add(id(variable))
        stack.extend(f for f, _ in node.next_functions)
    return leaves


def probe_heads(fm, params, sample, structure: Structure, pairs) -> tuple[tuple[int, int], ...]:
    """The candidate ``(site, readout site)`` pairs whose head is separable on ``sample``."""
    run = _forward(fm, {n: fast_layout(t) for n, t in params.items()}, sample, structure)
    if run is None:
        return ()
    heads = separable_heads(structure, run, pairs)
    return tuple((s, r) for s, (r, _) in heads.items())


@dataclass
class _Run:
    """A batched forward with zero leaves ``eps`` added to the sites' outputs."""

    out: torch.Tensor
    eps: list[torch.Tensor]
    feats: list[torch.Tensor]
    inputs: list[tuple[torch.Tensor, int]]
    outputs: list[tuple[torch.Tensor, int]]
    modules: dict

    def input(self, k: int) -> torch.Tensor | None:
        """Site ``k``'s input, None if an in-place operation changed it after the call."""
        t, version = self.inputs[k]
        return t if t._version == version else None

    def output(self, k: int) -> torch.Tensor | None:
        """Site ``k``'s output, None if an in-place operation changed it after the call."""
        t, version = self.outputs[k]
        return t if t._version == version else None


def _forward(fm, params, x, structure: Structure) -> _Run | None:
    sites = structure.sites
    if structure.fallback or any(s.out_shape[:1] != (1,) or s.in_shape[:1] != (1,) for s in sites):
        return None
    modules = dict(fm.module.named_modules())
    n = x.shape[0]
    eps: list = [None] * len(sites)
    feats: list = [None] * len(sites)
    inputs: list = [None] * len(sites)
    outputs: list = [None] * len(sites)

    def leaf(k: int, output: torch.Tensor) -> torch.Tensor:
        if output.shape != (n, *sites[k].out_shape[1:]):
            raise _NotBatched
        eps[k] = torch.zeros_like(output).requires_grad_()
        return eps[k]

    try:
        with torch.enable_grad(), _site_hooks(modules, sites, leaf, feats, inputs, outputs):
            out = fm(params, x)
    except _NotBatched:
        return None
    return _Run(out, eps, feats, inputs, outputs, modules)


def _outputs_buffer(g: torch.Tensor, n_out: int) -> torch.Tensor:
    """``(N, O, *g.shape[1:])`` whose slices ``[:, i]`` have ``g``'s memory layout (a
    channels-last gradient is copied without transposing)."""
    if g.dim() == 4 and not g.is_contiguous() and g.is_contiguous(memory_format=torch.channels_last):
        n, c, h, w = g.shape
        return g.new_empty(n, n_out, h, w, c).permute(0, 1, 4, 2, 3)
    return g.new_empty(g.shape[0], n_out, *g.shape[1:])


def _samples_independent(fm, params, x, out) -> bool:
    """Whether the first sample's outputs are the same alone as in the batch (to rounding):
    false for models that mix samples (batch statistics in custom code) or draw random
    numbers, which the per-sample capture handles or refuses."""
    if x.shape[0] == 1:
        return True
    with torch.no_grad():
        alone = fm(params, x[:1])
        first = out[:1].detach()
    tol = 256 * torch.finfo(first.dtype).eps * max(first.abs().max().item(), 1e-30)
    return bool(((alone - first).abs() <= tol).all())


# ---------------------------------------------------------------------------------------
# Separable heads.


def separable_heads(structure: Structure, run: _Run, pairs) -> dict[int, tuple[int, torch.Tensor]]:
    """``{site s: (readout site r, U (N, *out))}`` for the ``(s, r)`` in ``pairs`` whose cotangents
    factor through the readout's input ``h`` (N, C) in ``run``.

    ``U`` is the vector-Jacobian product of ``Σ h`` at the site's output ``y``. The claim
    ``δ_i[c, t] = V_i[c] U[c, t]`` for every output ``i`` (``V_i`` the cotangent at ``h``)
    is checked for one random combination ``ρ`` of outputs per sample: the cotangent of
    ``Σ ρ·f`` at ``y`` must equal ``V_ρ[c] U[c, t]`` up to rounding. By linearity in ``ρ``
    that holds for every output, for all but a measure-zero set of ``ρ``, exactly when
    ``h_c`` depends on ``y`` through channel ``c`` alone (ReLU, BatchNorm, pooling over
    positions) and ``f`` depends on ``y`` only through ``h``; channel mixing (a convolution,
    LayerNorm, GroupNorm) or a path around ``h`` breaks it by far more than rounding.
    """
    found: dict[int, tuple[int, torch.Tensor]] = {}
    out = run.out
    gen = torch.Generator(device=out.device).manual_seed(0)
    rho = torch.randn(out.shape, generator=gen, dtype=out.dtype, device=out.device)
    for s, r in pairs:
        h, e = run.input(r), run.eps[s]
        if h is None or e is None or not h.requires_grad:
            continue
        site = structure.sites[s]
        with torch.enable_grad():
            u, _ = torch.autograd.grad(h, (e, h), torch.ones_like(h), retain_graph=True, allow_unused=True)
            d_rho, v_rho = torch.autograd.grad(out, (e, h), rho, retain_graph=True, allow_unused=True)
        if u is None or d_rho is None or v_rho is None:
            continue
        module = run.modules[site.module]
        u_raw = u
        u = cotangents(site, module, u[:, None, None])[:, 0]  # (N, T, G, k_out)
        d_rho = cotangents(site, module, d_rho[:, None, None])[:, 0]
        n, t = u.shape[:2]
        u_c, d_c, v_c = u.reshape(n, t, -1), d_rho.reshape(n, t, -1), v_rho.reshape(n, 1, -1)
        if u_c.shape[-1] != v_c.shape[-1]:
            continue
        err = (d_c - v_c * u_c).abs().amax(1)
        tol = SEPARABLE_RTOL_ULPS * torch.finfo(u.dtype).eps * v_c[:, 0].abs() * u_c.abs().amax(1)
        if bool((err <= tol).all()):
            found[s] = (r, u_raw)
    return found
