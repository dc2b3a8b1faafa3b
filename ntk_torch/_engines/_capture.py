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

What to capture is fixed beforehand by the plan (``_plan``): the batched capture checks
the planned *separable heads* (``_heads``) on the batch and keeps ``U`` and ``V`` for those
that hold instead of their layer's ``O`` cotangents, and turns the cotangents of the
streamed units into their per-sample gradients as they come (``_contractions.Streamed``).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from torch.func import vjp, vmap

from ntk_torch import _inputs
from ntk_torch._engines._contractions import Gradients, Streamed
from ntk_torch._engines._forward import batched_forward, fast_layout, site_hooks
from ntk_torch._engines._heads import leaves_reached, separable_heads
from ntk_torch._engines._structure import Structure, Unit
from ntk_torch._model_checks import difference, rounding_tolerance


@dataclass
class Captured:
    """What one block of samples keeps for the contraction.

    ``O`` outputs; input features ``{site: (N, *in)}``, cotangents ``{site: (N, O, *out)}``,
    fallback Jacobians ``{name: (N, O, *shape)}``, separable heads ``{site: (U, V)}`` with
    ``U (N, *out)`` (the head's cotangent at the layer's output) and ``V (N, O, C)``, and
    the streamed units' per-sample gradients ``{site: Gradients}``.
    """

    n_out: int
    feats: dict[int, torch.Tensor]
    cots: dict[int, torch.Tensor]
    fallback: dict[str, torch.Tensor] = field(default_factory=dict)
    heads: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    streams: dict[int, Gradients] = field(default_factory=dict)

    def rows(self, start: int, stop: int | None) -> Captured:
        """The same for samples ``start:stop`` (views, no copy)."""
        return Captured(
            self.n_out,
            {k: t[start:stop] for k, t in self.feats.items()},
            {k: t[start:stop] for k, t in self.cots.items()},
            {k: t[start:stop] for k, t in self.fallback.items()},
            {k: (u[start:stop], v[start:stop]) for k, (u, v) in self.heads.items()},
            {k: s.rows(start, stop) for k, s in self.streams.items()},
        )


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
            with site_hooks(modules, structure, lambda k, _: eps[k], feats):
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


def capture_batched(fm, params, x, structure: Structure, factor: Collection[int] = (),
                    stream: dict[int, Unit] | None = None) -> Captured | None:
    """Batched forward and ``O`` backward passes; None where that would not be per-sample.

    ``factor``: sites whose candidate head (``Structure.heads``) is used where it is
    separable on this batch; ``stream``: ``{site: unit}`` whose per-sample gradients are
    made from the cotangents as they come (those sites keep neither cotangents nor
    features). With one factored head at site ``s``, the sites that the
    outputs reach only through ``s``'s output ``y`` (checked on the autograd graph) get their
    cotangents by a backward from ``y`` with ``δ_i = V_i U`` (exact there), skipping the
    head's own backward (pooling, activations) for every output.
    """
    fixed = {n: fast_layout(t) for n, t in params.items()}
    run = batched_forward(fm, fixed, x, structure)
    if run is None or not _samples_independent(fm, fixed, x, run.out):
        return None
    out, n, n_out = run.out, _inputs.batch_size(x), run.out.shape[1]
    # The per-sample layouts: the layer's batch dimension of one after (N,) / (N, O).
    feats = {k: f.unsqueeze(1) for k, f in enumerate(run.feats)}
    modules = run.modules
    sites = structure.sites
    streams = {k: Streamed(unit, sites[k], modules[sites[k].module], feats.pop(k), n_out)
               for k, unit in (stream or {}).items()}
    heads = separable_heads(structure, run, [(s, r) for s, r in structure.heads if s in factor])
    readouts = sorted({r for r, _ in heads.values()})
    rest = [k for k in range(len(structure.sites)) if k not in heads]
    below: list[int] = []
    y = run.output(next(iter(heads))) if len(heads) == 1 else None
    if y is not None:
        ((s, (_, u_head)),) = heads.items()
        direct = leaves_reached(out.grad_fn, stop=y.grad_fn)
        below = [k for k in rest if id(run.eps[k]) not in direct]
        channel_shape = [1] * y.dim()
        site = structure.sites[s]
        channel_shape[0], channel_shape[site.rule.channel_axis(site)] = n, -1
    above = [k for k in rest if k not in below]
    targets = [run.eps[k] for k in above] + [run.input(r) for r in readouts]
    kept: dict = {}

    def take(key, i: int, g: torch.Tensor | None, like: torch.Tensor) -> None:
        g = torch.zeros_like(like) if g is None else g
        if key in streams:
            streams[key].add(i, g[:, None, None])
            return
        if key not in kept:
            kept[key] = _outputs_buffer(g, n_out)
        kept[key][:, i].copy_(g)

    with torch.enable_grad():
        for i in range(n_out):
            grads = torch.autograd.grad(out[:, i].sum(), targets, retain_graph=True,
                                        allow_unused=True)
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
    cots = {k: kept[k].unsqueeze(2) for k in rest if k in kept}
    return Captured(n_out, feats, cots, heads=factored,
                    streams={k: s.gradients() for k, s in streams.items()})


def _outputs_buffer(g: torch.Tensor, n_out: int) -> torch.Tensor:
    """``(N, O, *g.shape[1:])`` whose slices ``[:, i]`` have ``g``'s memory layout.

    A channels-last gradient is then copied without transposing.
    """
    channels_last = g.is_contiguous(memory_format=torch.channels_last)
    if g.dim() == 4 and not g.is_contiguous() and channels_last:
        n, c, h, w = g.shape
        return g.new_empty(n, n_out, h, w, c).permute(0, 1, 4, 2, 3)
    return g.new_empty(g.shape[0], n_out, *g.shape[1:])


def _samples_independent(fm, params, x, out) -> bool:
    """Whether the first sample's outputs are the same alone as in the batch (to rounding).

    ``empirical_ntk`` refuses models that mix samples or draw random numbers before any
    engine runs (``_model_checks``); where the engine is used without that check, such a
    model takes the per-sample capture, which computes each sample alone.
    """
    if _inputs.batch_size(x) == 1:
        return True
    with torch.no_grad():
        alone = fm(params, _inputs.take(x, 0, 1))
    batch = out.detach()
    return difference(alone[0], batch[0], rounding_tolerance(batch)) is None
