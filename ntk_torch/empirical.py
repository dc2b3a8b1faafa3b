"""Empirical NTK and NNGP of a PyTorch module.

Notation: ``N1, N2`` samples, ``O`` flattened outputs per sample, ``P`` selected
parameters. For outputs ``f(x) ∈ R^O`` and parameters ``θ``,

    Θ[a, b, i, j] = Σ_p ∂f_i(x1_a)/∂θ_p · ∂f_j(x2_b)/∂θ_p.

``mode="full"`` returns ``(N1, N2, O, O)``; ``"diagonal"`` the ``i == j`` entries,
``(N1, N2, O)``; ``"trace"`` their mean over ``i`` (trace divided by ``O``), ``(N1, N2)``.
The torch.func NTK tutorial's "trace" is the sum, ``O`` times larger.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from torch import nn

from ntk_torch import _engines, _inputs
from ntk_torch._checks import (
    MODES,
    check_batch_size,
    check_choice,
    check_memory_budget,
)
from ntk_torch._engines import Problem
from ntk_torch._functional import (
    FunctionalModel,
    OutputSelection,
    ParamSelection,
    check_output,
    forward,
    functionalize,
    vmap_errors_explained,
)
from ntk_torch._inputs import Batch
from ntk_torch._memory_advice import memory_message, result_bytes, result_message
from ntk_torch._model_checks import check_model_state, random_draws_error
from ntk_torch._profile_cache import profiled
from ntk_torch._tiling import default_memory_budget, tiled

Mode = Literal["full", "diagonal", "trace"]
Implementation = Literal["auto", "jacobian", "ntk_vp", "structured", "autograd"]


class EmpiricalNTK:
    """A reusable empirical-NTK function of a model; see :func:`empirical_ntk_fn`.

    Calling it reads the model's *current* parameter values, so it follows training.
    ``params=`` in the call overrides some selected parameters with given tensors (for
    instance a snapshot taken at initialisation) without touching the model.
    """

    def __init__(self, model: nn.Module, *, mode: Mode = "full",
                 implementation: Implementation = "auto", params: ParamSelection = None,
                 batch_size: int | None = None, memory_budget: float | None = None,
                 layerwise: bool = False, progress: bool = False,
                 output: OutputSelection = None,
                 model_kwargs: dict[str, Any] | None = None) -> None:
        self.mode = check_choice("mode", mode, MODES)
        self.implementation = check_choice("implementation", implementation,
                                           ("auto", *_engines.ENGINES))
        self.batch_size = check_batch_size(batch_size)
        self.memory_budget = check_memory_budget(memory_budget)
        self.progress = progress
        self.layerwise = layerwise
        self.functional: FunctionalModel = functionalize(model, params, output=output,
                                                         model_kwargs=model_kwargs)
        self.last_implementation: str | None = None
        self._warned_no_vmap = False

    def __call__(self, x1: Batch, x2: Batch | None = None, *,
                 params: dict[str, torch.Tensor] | None = None,
                 ) -> torch.Tensor | dict[str, torch.Tensor]:
        """The kernel of ``x1 (N1, ...)`` with ``x2 (N2, ...)`` (``None``: with ``x1``).

        Inputs as in :func:`empirical_ntk` (tensors, tuples or dicts of them). Returns
        :func:`empirical_ntk`'s tensor, or :func:`layerwise_ntk`'s dict with
        ``layerwise=True``; ``params`` overrides selected parameters for this call.
        """
        fm = self.functional
        x1, x2 = _inputs.check_pair(x1, x2)
        check_model_state(fm.module)
        values = fm.params()
        if params is not None:
            unknown = sorted(set(params) - set(values))
            if unknown:
                raise ValueError(f"`params` overrides unknown or unselected parameters {unknown}")
            values.update(params)
        _inputs.check_against_params("x1", x1, values)
        groups = fm.groups(self.layerwise)
        # Unselected parameters are the model's own tensors; without no_grad the kernel would
        # keep an autograd graph to them. torch.func transforms ignore the outer no_grad.
        with torch.no_grad():
            kernels = self._compute(values, x1, x2, groups)
        for group, k in kernels.items():
            if not torch.isfinite(k).all():
                bad = int((~torch.isfinite(k)).sum())
                where = f" for layer {group!r}" if self.layerwise else ""
                warnings.warn(f"the empirical NTK{where} has {bad} non-finite entries (NaN/inf): "
                              "check the model's outputs and parameters on these inputs",
                              RuntimeWarning, stacklevel=2)
        return kernels if self.layerwise else kernels[""]

    def _compute(self, values, x1, x2, groups) -> dict[str, torch.Tensor]:
        fm = self.functional
        n1 = _inputs.batch_size(x1)
        n2 = n1 if x2 is None else _inputs.batch_size(x2)
        any_param = next(iter(values.values()))
        if n1 == 0 or n2 == 0:  # one forward (of one sample, if any) tells O
            n_out = fm(values, _inputs.take(x1 if n1 or x2 is None else x2, 0, 1)).shape[1]
            return {g: _empty(n1, n2, n_out, self.mode, any_param) for g in groups}
        flops, activations, n_out, probe = profiled(fm, values, x1, x2)
        n_params = sum(values[n].numel() for n in fm.names)
        b1, b2 = min(self.batch_size or n1, n1), min(self.batch_size or n2, n2)
        problem = Problem(n1=b1, n2=b2, symmetric=x2 is None and b1 >= n1, mode=self.mode,
                          n_out=n_out, n_params=n_params, n_groups=len(groups),
                          forward_flops=flops, activations=activations,
                          itemsize=any_param.element_size(), probe=probe)
        budget = self.memory_budget or default_memory_budget(any_param.device)
        engine = self._resolve(problem, budget, n1, n2)
        self.last_implementation = engine
        bound = _engines.Bound(_engines.ENGINES[engine], fm, values, self.mode, groups, problem,
                               budget)
        try:
            with vmap_errors_explained(engine):
                return tiled(bound, x1, x2, self.batch_size, progress=self.progress)
        except RuntimeError as err:  # random draws on a path the model's check did not take
            error = random_draws_error(err, fm.module)
            if error is None:
                raise
            raise error from err

    def _resolve(self, problem: Problem, budget: float, n1: int, n2: int) -> str:
        """The engine for one block.

        What the whole result needs is counted too: blocks are written into an output of
        all ``N1 x N2`` pairs that lives throughout.
        """
        result = result_bytes(problem, n1, n2)
        if result > budget:
            raise MemoryError(result_message(self.implementation, problem, budget, n1, n2))
        tiled_out = result if (problem.n1, problem.n2) != (n1, n2) else 0.0
        if self.implementation == "auto":
            engine = _engines.choose(problem, budget - tiled_out)
            if engine is not None:
                self._warn_no_vmap(problem)
                return engine
        else:
            engine = self.implementation
            _engines.check_runs(engine, problem)
            if _engines.estimate(engine, problem).bytes + tiled_out <= budget:
                return engine
        raise MemoryError(memory_message(self.implementation, problem, budget, n1, n2))

    def _warn_no_vmap(self, problem: Problem) -> None:
        """Once per object: ``auto`` took ``autograd`` because vmap cannot run the model."""
        message = None if self._warned_no_vmap else _engines.fallback_warning(problem)
        if message is not None:
            self._warned_no_vmap = True
            warnings.warn(message, UserWarning, stacklevel=5)


def _empty(n1: int, n2: int, n_out: int, mode: str, like: torch.Tensor) -> torch.Tensor:
    shape = {"full": (n1, n2, n_out, n_out), "diagonal": (n1, n2, n_out), "trace": (n1, n2)}[mode]
    return like.new_zeros(shape)


def empirical_ntk_fn(model: nn.Module, *, mode: Mode = "full",
                     implementation: Implementation = "auto",
                     params: ParamSelection = None, batch_size: int | None = None,
                     memory_budget: float | None = None, layerwise: bool = False,
                     progress: bool = False, output: OutputSelection = None,
                     model_kwargs: dict[str, Any] | None = None) -> EmpiricalNTK:
    """A reusable ``(x1, x2=None) -> kernel`` function for ``model``.

    Parameter selection and validation happen once; each call reads the model's current
    parameter values. See :func:`empirical_ntk` for the arguments and shapes; with
    ``layerwise=True`` calls return :func:`layerwise_ntk`'s dict.

    Example:
        >>> import torch, ntk_torch as nt
        >>> ntk = nt.empirical_ntk_fn(torch.nn.Linear(3, 2), mode="trace")
        >>> ntk(torch.ones(4, 3)).shape
        torch.Size([4, 4])
    """
    return EmpiricalNTK(model, mode=mode, implementation=implementation, params=params,
                        batch_size=batch_size, memory_budget=memory_budget, layerwise=layerwise,
                        progress=progress, output=output, model_kwargs=model_kwargs)


def empirical_ntk(model: nn.Module, x1: Batch, x2: Batch | None = None, *,
                  mode: Mode = "full", implementation: Implementation = "auto",
                  params: ParamSelection = None, batch_size: int | None = None,
                  memory_budget: float | None = None, progress: bool = False,
                  output: OutputSelection = None,
                  model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
    """Empirical neural tangent kernel ``Θ(x1, x2) = J(x1) J(x2)ᵀ`` of ``model``.

    Args:
        model: maps ``(N, ...)`` to ``(N, *out)`` (or ``(N,)``); ``O = prod(out)``. Used in
            its current train/eval mode. Each sample's outputs must depend on that sample
            alone, without random draws: BatchNorm or Dropout in train mode, random
            operations in the forward, and statistics or attention across the batch (found
            by comparing a sample alone and in a batch of two) raise a ``ValueError`` naming
            the module.
        x1: inputs ``(N1, ...)``: a tensor (``model(x1)``), a tuple or list of tensors
            (``model(*x1)``, e.g. ``(features, mask)``) or a dict / tokenizer
            ``BatchEncoding`` (``model(**x1)``, e.g. ``input_ids`` and ``attention_mask``),
            every tensor with the batch dimension ``N1`` first. Integer tensors are fine
            (token ids); floating ones must have the parameters' dtype.
        x2: inputs ``(N2, ...)`` with ``x1``'s structure and, tensor by tensor, trailing
            shapes and dtypes; ``None`` means ``x1`` and returns an exactly symmetric
            kernel, computing each block once.
        mode: ``"full"`` -> ``(N1, N2, O, O)``; ``"diagonal"`` -> ``(N1, N2, O)``;
            ``"trace"`` -> ``(N1, N2)``, the mean over outputs of the diagonal.
        implementation: ``"jacobian"`` (per-sample Jacobians, fastest when ``N·O·P`` numbers
            fit), ``"ntk_vp"`` (vjp/jvp products, small memory, ``~N1·N2·O`` passes),
            ``"structured"`` (Gram matrices of layer inputs and cotangents), ``"autograd"``
            (``"jacobian"``'s Jacobians by plain autograd, one sample at a time, for models
            ``torch.func.vmap`` cannot run: fused RNNs, data-dependent control flow) or
            ``"auto"``: the shortest predicted time among those whose estimated peak memory
            fits (FLOPs from one profiled forward pass and each engine's cost formula, over
            measured throughputs; see ``ntk_torch/_engines/__init__.py``), ``"autograd"``
            with a warning where vmap cannot run the model.
        params: ``None`` (every parameter with ``requires_grad``), parameter names, or a
            predicate ``(name, param) -> bool``. Others are held fixed.
        batch_size: compute in blocks of at most this many samples of ``x1`` and ``x2``;
            the result is the same.
        memory_budget: bytes one block may use; default half of the available memory of
            the parameters' device. A block estimated above it raises ``MemoryError``
            saying what would fit.
        progress: show a progress bar over the blocks (with ``batch_size``).
        output: ``None`` when ``model`` returns the tensor ``(N, *out)``; otherwise a
            callable from what it returns (a Hugging Face ``ModelOutput``, a tuple, a dict)
            to that tensor, e.g. ``lambda o: o.logits[:, -1]``. The kernel is that of
            ``output(model(x))``.
        model_kwargs: keyword arguments passed on every call of ``model``, not batched
            (e.g. ``{"use_cache": False}``).

    Returns:
        ``(N1, N2, O, O)``, ``(N1, N2, O)`` or ``(N1, N2)`` by ``mode``, in the parameters'
        dtype and on their device.

    Example:
        For ``nn.Linear(D, 1)``, ``Θ(x, x') = x·x' + 1``:

        >>> import torch, ntk_torch as nt
        >>> x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
        >>> nt.empirical_ntk(torch.nn.Linear(2, 1), x, mode="trace")
        tensor([[ 6.,  2.],
                [ 2., 11.]])

        Keyword inputs, integer token ids among them (``Θ = Σ_v w_a(v) w_b(v)``, ``w(v)`` the
        mask's sum over positions holding token ``v``):

        >>> bag = torch.nn.EmbeddingBag(5, 1, mode="sum")
        >>> ids, mask = torch.tensor([[1, 2, 0], [1, 1, 3]]), torch.tensor([[1.0, 1, 0], [1, 1, 1]])
        >>> nt.empirical_ntk(bag, {"input": ids, "per_sample_weights": mask}, mode="trace")
        tensor([[2., 2.],
                [2., 5.]])
    """
    ntk = EmpiricalNTK(model, mode=mode, implementation=implementation, params=params,
                       batch_size=batch_size, memory_budget=memory_budget, progress=progress,
                       output=output, model_kwargs=model_kwargs)
    return ntk(x1, x2)


def layerwise_ntk(model: nn.Module, x1: Batch, x2: Batch | None = None, *,
                  mode: Mode = "full", implementation: Implementation = "auto",
                  params: ParamSelection = None, batch_size: int | None = None,
                  memory_budget: float | None = None, progress: bool = False,
                  output: OutputSelection = None,
                  model_kwargs: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Per-layer empirical NTKs, keyed by the qualified name of the owning module.

    ``Θ_l`` sums over the parameters registered directly on module ``l`` (``""`` for the
    root module); ``Σ_l Θ_l`` is :func:`empirical_ntk`. Arguments and shapes as there.

    Example:
        >>> import torch, ntk_torch as nt
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> kernels = nt.layerwise_ntk(net, torch.randn(5, 3), mode="trace")
        >>> sorted(kernels), kernels["0"].shape
        (['0', '2'], torch.Size([5, 5]))
    """
    return EmpiricalNTK(model, mode=mode, implementation=implementation, params=params,
                        batch_size=batch_size, memory_budget=memory_budget, layerwise=True,
                        progress=progress, output=output, model_kwargs=model_kwargs)(x1, x2)


def empirical_nngp(model: nn.Module, x1: Batch, x2: Batch | None = None, *,
                   mode: Mode = "trace", batch_size: int | None = None,
                   output: OutputSelection = None,
                   model_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
    """Inner products of the model's outputs, the empirical NNGP kernel.

    ``K[a, b, i, j] = f_i(x1_a) · f_j(x2_b)``; modes and shapes as in :func:`empirical_ntk`
    (``"trace"`` is the mean over outputs, ``(N1, N2)``), and so are the inputs (tensors,
    tuples or dicts of them), ``output`` and ``model_kwargs``. Averaged over random
    initialisations it estimates the analytic NNGP kernel.

    Example:
        >>> import torch, ntk_torch as nt
        >>> net = torch.nn.Linear(2, 3)
        >>> x = torch.randn(4, 2)
        >>> k = nt.empirical_nngp(net, x)
        >>> torch.allclose(k, net(x).detach() @ net(x).detach().T / 3)
        True
    """
    check_choice("mode", mode, MODES)
    check_batch_size(batch_size)
    x1, x2 = _inputs.check_pair(x1, x2)
    check_model_state(model)
    products = _OutputProducts(model, mode, check_output(output),
                               _inputs.check_model_kwargs(model_kwargs))
    return tiled(products, x1, x2, batch_size)[""]


class _OutputProducts:
    """The empirical NNGP as a ``_tiling.Blockwise`` kernel: outputs per block, then products."""

    def __init__(self, model: nn.Module, mode: str, output: OutputSelection,
                 model_kwargs: dict[str, Any]) -> None:
        self.model, self.mode, self.output, self.model_kwargs = model, mode, output, model_kwargs

    def prepare(self, x: _inputs.Inputs) -> torch.Tensor:
        with torch.no_grad():
            return forward(self.model, x, output=self.output, model_kwargs=self.model_kwargs)

    def contract(self, fa: torch.Tensor, fb: torch.Tensor | None) -> dict[str, torch.Tensor]:
        fb = fa if fb is None else fb
        if self.mode == "full":
            return {"": torch.einsum("ai,bj->abij", fa, fb)}
        if self.mode == "diagonal":
            return {"": fa[:, None, :] * fb[None, :, :]}
        return {"": fa @ fb.T / fa.shape[1]}

    def compute(self, xa: _inputs.Inputs,
                xb: _inputs.Inputs | None) -> dict[str, torch.Tensor]:
        return self.contract(self.prepare(xa), None if xb is None else self.prepare(xb))
