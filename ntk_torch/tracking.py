"""Watch the kernel, the features and the weights move while the user's loop trains.

:class:`KernelTracker` neither owns the training loop nor wraps the model: the loop calls
``tracker.update(step)`` and the tracker, every ``every`` steps, measures on a fixed probe
batch and appends long-format records (see :mod:`ntk_torch.records`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ntk_torch import _inputs, metrics
from ntk_torch import records as _records
from ntk_torch._checks import MODES, check_choice, check_int, check_module, describe
from ntk_torch._functional import OutputSelection, ParamSelection
from ntk_torch._layer_outputs import layer_outputs, measuring
from ntk_torch.empirical import Implementation, Mode, empirical_ntk_fn

_Tensors = dict[str, torch.Tensor]

TOTAL = "total"
"""The ``layer`` of whole-model records (a real module's name is never ``"total"``)."""

_STATE_VERSION = 1

__all__ = ["TOTAL", "KernelTracker"]


class KernelTracker:
    """Records kernel drift and per-layer feature and weight change on a probe batch.

    Add two lines to an existing loop; nothing else changes::

        tracker = KernelTracker(model, probe_x, probe_y, every=10)
        for step, (x, y) in enumerate(loader):
            tracker.update(step)          # step 0 records the reference
            ...                           # the user's forward, backward, optimizer step
        tracker.to_csv("drift.csv")

    The first :meth:`update` measures the reference (``K_0``, ``h_0``, ``θ_0``); later
    calls measure when ``step % every == 0`` (or ``force=True``). Each measurement
    computes, on the probe inputs ``(N, ...)``, the layerwise empirical NTK (one call;
    the total kernel is the sum of the per-layer ones), the outputs of each tracked layer,
    and the current parameters, and appends records ``{"step", "layer", "metric",
    "value"}``. Whole-model records have ``layer == "total"``; per-layer records carry the
    module's qualified name (``""`` for parameters registered on the root module).

    Metrics (``K_t`` the probe kernel at step ``t``, ``t_0`` the reference step, ``t'`` the
    previous record's step; formulas in :mod:`ntk_torch.metrics`):

    - ``"total"``: ``kernel_distance`` = ``d(K_t, K_0)``; ``kernel_relative_change`` =
      ``‖K_t − K_0‖/‖K_0‖``; ``kernel_velocity`` = ``d(K_t, K_{t'}) / (t − t')`` (Fort et
      al. 2020; absent at the reference); ``kernel_alignment`` with ``probe_y`` (if given);
      ``eigenvalue_1`` ... ``eigenvalue_{top_k}`` (largest first) and ``effective_rank``;
      ``weight_relative_change`` = ``‖θ_t − θ_0‖/‖θ_0‖`` over all selected parameters.
    - each tracked layer ``l`` that owns selected parameters: ``kernel_distance``,
      ``kernel_relative_change`` (and ``kernel_alignment``) of its layerwise NTK ``Θ_l``,
      and ``weight_relative_change`` of its own parameters;
    - each tracked layer: ``feature_relative_change`` = ``‖h_t − h_0‖_F/‖h_0‖_F`` and
      ``feature_cka`` = ``linear_cka(h_0, h_t)`` of its output features ``h`` ``(N, D)``
      (outputs flattened per sample; a module called several times per forward contributes
      all its outputs, concatenated).

    Training is not changed. Measurements run in eval mode, the mode the model would be
    evaluated in (Dropout off, BatchNorm on running statistics, so the per-sample kernel
    exists), under ``torch.no_grad``; afterwards every module's ``training`` flag is set
    back to what it was, the CPU and CUDA random-number states are restored, forward
    hooks are removed, and parameters, ``.grad`` and optimizer state are never touched.

    Args:
        model: the ``nn.Module`` being trained (read, never modified).
        probe_x: probe inputs ``(N, ...)``, ``N >= 2``, on the model's device, kept fixed: a
            tensor, or a tuple or dict of tensors as in :func:`ntk_torch.empirical_ntk`.
        probe_y: optional targets for alignment: real ``(N,)``/``(N, C)`` or integer class
            labels ``(N,)`` (see :func:`ntk_torch.metrics.kernel_alignment`).
        every: record when ``step % every == 0``.
        mode: kernel layout, ``"trace"`` ``(N, N)`` (default, cheapest), ``"diagonal"``
            ``(N, N, O)`` or ``"full"`` ``(N, N, O, O)``; metrics see the latter two as
            ``(N·O, N·O)`` matrices.
        implementation: passed to :func:`ntk_torch.empirical_ntk_fn`.
        layers: qualified module names whose features (and, if they own parameters,
            layerwise kernels and weights) to track; default: every module owning selected
            parameters, in ``named_parameters`` order.
        params: the parameters defining the NTK, as in :func:`ntk_torch.empirical_ntk`.
        top_k: how many leading eigenvalues of the total kernel to record (0 for none).
        batch_size: block size for the kernel computation (memory), as in
            :func:`ntk_torch.empirical_ntk`.
        output: as in :func:`ntk_torch.empirical_ntk`.
        model_kwargs: as in :func:`ntk_torch.empirical_ntk`; the tracked features are those
            of the model's call with them.

    Example:
        >>> import torch, ntk_torch as nt
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> nn = torch.nn
        >>> net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> tracker = nt.KernelTracker(net, x, y, every=5)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> for step in range(11):
        ...     _ = tracker.update(step)
        ...     opt.zero_grad(); ((net(x) - y) ** 2).mean().backward(); opt.step()
        >>> sorted({r["step"] for r in tracker.records})
        [0, 5, 10]
        >>> [r["value"] for r in tracker.records
        ...  if r["layer"] == "total" and r["metric"] == "kernel_distance"][0]
        0.0
    """

    def __init__(self, model: nn.Module, probe_x: _inputs.Batch,
                 probe_y: torch.Tensor | None = None, *, every: int = 1, mode: Mode = "trace",
                 implementation: Implementation = "auto", layers: Iterable[str] | None = None,
                 params: ParamSelection = None, top_k: int = 5,
                 batch_size: int | None = None, output: OutputSelection = None,
                 model_kwargs: dict[str, Any] | None = None) -> None:
        check_module("model", model)
        self.model = model
        self.probe_x = _check_probe_x(probe_x)
        self.probe_y = _check_probe_y(probe_y, _inputs.batch_size(self.probe_x))
        self.every = check_int("every", every, low=1)
        self.mode = check_choice("mode", mode, MODES)
        self.top_k = check_int("top_k", top_k, low=0)
        self._ntk = empirical_ntk_fn(model, mode=mode, implementation=implementation, params=params,
                                     batch_size=batch_size, layerwise=True, output=output,
                                     model_kwargs=model_kwargs)
        fm = self._ntk.functional
        self._param_names: tuple[str, ...] = fm.names
        self._owned: dict[str, tuple[str, ...]] = fm.groups(True)
        self.layers: tuple[str, ...] = _check_layers(model, layers, tuple(self._owned))
        self.records: list[_records.Record] = []
        self._reference: dict[str, Any] | None = None
        self._previous: dict[str, Any] | None = None

    # -- public API -------------------------------------------------------------------

    @property
    def last_step(self) -> int | None:
        """Step of the latest record, ``None`` before the first."""
        return None if self._previous is None else self._previous["step"]

    @property
    def reference_step(self) -> int | None:
        """Step at which ``K_0``, ``h_0``, ``θ_0`` were measured, ``None`` before."""
        return None if self._reference is None else self._reference["step"]

    @property
    def reference_kernel(self) -> torch.Tensor | None:
        """``K_0``, the total probe kernel of the reference measurement; ``None`` before it.

        In the tracker's ``mode``: ``(N, N)``, ``(N, N, O)`` or ``(N, N, O, O)``.
        """
        return None if self._reference is None else self._reference["kernels"][TOTAL]

    def update(self, step: int, *, force: bool = False) -> list[_records.Record]:
        """Measure if due: on the first call, when ``step % every == 0``, or if ``force``.

        Args:
            step: the training step (int); recorded steps must increase.
            force: measure even if ``step`` is not a multiple of ``every`` (e.g. the last
                step of a run).

        Returns:
            The records appended by this call (an empty list if it did not measure).
        """
        step = check_int("step", step)
        if self._reference is not None and not force and step % self.every != 0:
            return []
        if self._previous is not None and step <= self._previous["step"]:
            raise ValueError(
                f"`step` must increase between records: the last record is at step "
                f"{self._previous['step']}, got {step}"
            )
        kernels, features, weights = self._measure()
        reference = self._reference or {
            "step": step, "kernels": kernels, "features": features,
            "weights": {n: w.clone() for n, w in weights.items()}}
        new = self._records(step, kernels, features, weights, reference)
        # Commit only once every metric was computed, so a failure leaves the state as it was.
        self._reference = reference
        self._previous = {"step": step, "kernel": kernels[TOTAL]}
        self.records.extend(new)
        return new

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write :attr:`records` as CSV (see :func:`ntk_torch.records.to_csv`)."""
        return _records.to_csv(self.records, path)

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write :attr:`records` as JSON (see :func:`ntk_torch.records.to_json`)."""
        return _records.to_json(self.records, path)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: records, reference and previous measurements.

        Save it with ``torch.save`` next to the model and optimizer checkpoint. It holds
        the probe batch too, so that resuming with a different probe is caught.
        """
        return {
            "version": _STATE_VERSION,
            "config": {"mode": self.mode, "layers": list(self.layers), "top_k": self.top_k,
                       "params": list(self._param_names)},
            "probe_x": _inputs.map_leaves(lambda t: t.detach().clone(), self.probe_x),
            "probe_y": None if self.probe_y is None else self.probe_y.detach().clone(),
            "records": [dict(r) for r in self.records],
            "reference": _clone_tree(self._reference),
            "previous": _clone_tree(self._previous),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the tracker must be built with the same setup.

        Raises:
            ValueError: if the mode, tracked layers, parameters, ``top_k`` or probe batch
                differ from those the state was recorded with.
        """
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            got = (f"version {state.get('version')!r}" if isinstance(state, dict)
                   else describe(state))
            raise ValueError(f"`state` must be a KernelTracker.state_dict() of version "
                             f"{_STATE_VERSION}, got {got}")
        config = state["config"]
        mine = {"mode": self.mode, "layers": list(self.layers), "top_k": self.top_k,
                "params": list(self._param_names)}
        for key, value in mine.items():
            if config.get(key) != value:
                raise ValueError(
                    f"`state` was recorded with {key}={config.get(key)!r} but this tracker has "
                    f"{key}={value!r}; build the tracker as it was built before"
                )
        for name, saved, current in (("probe_x", state["probe_x"], self.probe_x),
                                     ("probe_y", state["probe_y"], self.probe_y)):
            same = (saved is None and current is None) or (
                saved is not None and current is not None and _inputs.equal(saved, current))
            if not same:
                raise ValueError(
                    f"`state` was recorded on a different `{name}` than this tracker's")
        device = _inputs.leaves(self.probe_x)[0].device
        self.records = [dict(r) for r in state["records"]]
        self._reference = _clone_tree(state["reference"], device)
        self._previous = _clone_tree(state["previous"], device)

    def __repr__(self) -> str:
        return (f"KernelTracker(N={_inputs.batch_size(self.probe_x)}, every={self.every}, "
                f"mode={self.mode!r}, "
                f"layers={list(self.layers)}, records={len(self.records)})")

    # -- measurement ------------------------------------------------------------------

    def _measure(self) -> tuple[_Tensors, _Tensors, _Tensors]:
        with measuring(self.model):
            features = layer_outputs(self.model, self.probe_x, self.layers,
                                     self._ntk.functional.model_kwargs)
            kernels = dict(self._ntk(self.probe_x))
            kernels[TOTAL] = sum(kernels.values())
            named = dict(self.model.named_parameters())
            weights = {n: named[n].detach() for n in self._param_names}
        return kernels, features, weights

    def _records(self, step: int, kernels: _Tensors, features: _Tensors, weights: _Tensors,
                 ref: dict[str, Any]) -> list[_records.Record]:
        out: list[_records.Record] = []

        def add(layer: str, metric: str, value: torch.Tensor | float) -> None:
            out.append({"step": step, "layer": layer, "metric": metric, "value": float(value)})

        def kernel_metrics(layer: str) -> None:
            k, k0 = kernels[layer], ref["kernels"][layer]
            add(layer, "kernel_distance", metrics.kernel_distance(k, k0))
            add(layer, "kernel_relative_change", metrics.relative_change(k, k0))
            if self.probe_y is not None:
                add(layer, "kernel_alignment", metrics.kernel_alignment(k, self.probe_y))

        def weight_change(names: Iterable[str]) -> torch.Tensor:
            return metrics.relative_change([weights[n] for n in names],
                                           [ref["weights"][n] for n in names])

        kernel_metrics(TOTAL)
        if self._previous is not None:
            elapsed = step - self._previous["step"]
            moved = metrics.kernel_distance(kernels[TOTAL], self._previous["kernel"])
            add(TOTAL, "kernel_velocity", moved / elapsed)
        top = metrics.spectrum(kernels[TOTAL])
        for i, value in enumerate(top[: self.top_k].tolist(), start=1):
            add(TOTAL, f"eigenvalue_{i}", value)
        add(TOTAL, "effective_rank", metrics.effective_rank(kernels[TOTAL]))
        add(TOTAL, "weight_relative_change", weight_change(self._param_names))
        for layer in self.layers:
            if layer in self._owned:
                kernel_metrics(layer)
                add(layer, "weight_relative_change", weight_change(self._owned[layer]))
            h, h0 = features[layer], ref["features"][layer]
            add(layer, "feature_relative_change", metrics.relative_change(h, h0))
            add(layer, "feature_cka", metrics.linear_cka(h0, h))
        return out


def _clone_tree(tree: Any, device: torch.device | None = None) -> Any:
    if isinstance(tree, torch.Tensor):
        tree = tree.detach().clone()
        return tree if device is None else tree.to(device)
    if isinstance(tree, dict):
        return {k: _clone_tree(v, device) for k, v in tree.items()}
    return tree


def _check_probe_x(x: Any) -> _inputs.Inputs:
    x = _inputs.normalize("probe_x", x)
    if _inputs.batch_size(x) < 2:
        shapes = "; ".join(f"{label} has shape {tuple(t.shape)}"
                           for label, t in _inputs.labelled_leaves("probe_x", x))
        raise ValueError(f"`probe_x` must hold N >= 2 samples, shape (N, ...): {shapes}")
    return _inputs.map_leaves(torch.Tensor.detach, x)


def _check_probe_y(y: Any, n: int) -> torch.Tensor | None:
    if y is None:
        return None
    if not isinstance(y, torch.Tensor):
        raise TypeError(
            f"`probe_y` must be a torch.Tensor (N,) or (N, C) or None, got {describe(y)}")
    if y.dim() not in (1, 2) or y.shape[0] != n:
        raise ValueError(f"`probe_y` must have shape (N,) or (N, C) with N = {n} as `probe_x`, "
                         f"got {tuple(y.shape)}")
    if bool((y == y[:1]).all()):
        raise ValueError("`probe_y` is the same for every probe sample, so the kernel-target "
                         "alignment is undefined; pick a probe with several targets or pass None")
    return y.detach()


def _check_layers(model: nn.Module, layers: Iterable[str] | None,
                  owners: tuple[str, ...]) -> tuple[str, ...]:
    if layers is None:
        chosen = owners
    else:
        if isinstance(layers, str):
            raise TypeError(f"`layers` must be an iterable of module names, got the string "
                            f"{layers!r}; use [{layers!r}]")
        chosen = tuple(layers)
        known = dict(model.named_modules())
        for name in chosen:
            if not isinstance(name, str) or name not in known:
                names = ", ".join(repr(n) for n in list(known)[:12])
                raise ValueError(
                    f"`layers` names unknown module {name!r}; the model's modules are: {names}")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"`layers` must not repeat names, got {list(chosen)}")
    if TOTAL in chosen:
        raise ValueError(f"a tracked module is named {TOTAL!r}, which the tracker reserves for "
                         "whole-model records; leave it out of `layers`")
    return chosen
