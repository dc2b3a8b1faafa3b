"""The two recipes of the torch.func "Neural Tangent Kernels" tutorial, as written there.

Their "trace" is the *sum* over outputs, ``O`` times ntk_torch's mean-over-outputs trace.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap


def _fnet_single(net: nn.Module):
    def fnet_single(params, x):
        return functional_call(net, params, (x.unsqueeze(0),)).squeeze(0)
    return fnet_single


def tutorial_jacrev(net: nn.Module, x1: torch.Tensor, x2: torch.Tensor,
                    compute: str) -> torch.Tensor:
    """``empirical_ntk_jacobian_contraction`` of the torch.func tutorial."""
    params = {k: v.detach() for k, v in net.named_parameters()}
    fnet_single = _fnet_single(net)
    jac1 = vmap(jacrev(fnet_single), (None, 0))(params, x1)
    jac1 = [j.flatten(2) for j in jac1.values()]
    jac2 = vmap(jacrev(fnet_single), (None, 0))(params, x2)
    jac2 = [j.flatten(2) for j in jac2.values()]
    einsum_expr = {"full": "Naf,Mbf->NMab", "trace": "Naf,Maf->NM",
                   "diagonal": "Naf,Maf->NMa"}[compute]
    result = torch.stack([torch.einsum(einsum_expr, j1, j2) for j1, j2 in zip(jac1, jac2)])
    return result.sum(0)


def tutorial_ntk_vp(net: nn.Module, x1: torch.Tensor, x2: torch.Tensor,
                    compute: str) -> torch.Tensor:
    """``empirical_ntk_ntk_vps`` of the torch.func tutorial."""
    params = {k: v.detach() for k, v in net.named_parameters()}
    func = _fnet_single(net)

    def get_ntk(x1, x2):
        def func_x1(params):
            return func(params, x1)

        def func_x2(params):
            return func(params, x2)

        output, vjp_fn = vjp(func_x1, params)

        def get_ntk_slice(vec):
            vjps = vjp_fn(vec)  # vec @ J(x2).T in the tutorial's words
            _, jvps = jvp(func_x2, (params,), vjps)
            return jvps

        basis = torch.eye(output.numel(), dtype=output.dtype, device=output.device)
        basis = basis.view(output.numel(), -1)
        return vmap(get_ntk_slice)(basis)

    result = vmap(vmap(get_ntk, (None, 0)), (0, None))(x1, x2)
    if compute == "full":
        return result
    if compute == "trace":
        return torch.einsum("NMKK->NM", result)
    return torch.einsum("NMKK->NMK", result)
