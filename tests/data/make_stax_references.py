"""Reference kernels from neural-tangents' stax for tests/test_analytic_graph.py.

Run where neural_tangents imports (it is not a dependency):
    python tests/data/make_stax_references.py
It writes stax_references.json next to itself: the inputs and stax's NNGP and NTK of each
architecture, described in the same words as the PyTorch modules the test builds.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from neural_tangents import stax

jax.config.update("jax_enable_x64", True)
W, B = 1.5, 0.2


def conv(chan, shape, strides=None, padding="VALID"):
    return stax.Conv(chan, shape, strides=strides, padding=padding, W_std=W, b_std=B)


def dense(n):
    return stax.Dense(n, W_std=W, b_std=B)


ARCHITECTURES = {
    # stride-2 VALID conv, ReLU, 2x2 stride-1 average pooling, erf, global pooling, readout
    "strided_cnn": ((4, 7, 7, 2), stax.serial(
        conv(8, (3, 3), (2, 2)), stax.Relu(), stax.AvgPool((2, 2), (1, 1)),
        conv(8, (2, 2)), stax.Erf(), stax.GlobalAvgPool(), dense(1))),
    # two branches (3x3 and 1x1 convolutions, each with a ReLU) concatenated along channels,
    # a convolution, flattening, readout
    "concatenation": ((4, 5, 5, 2), stax.serial(
        stax.FanOut(2), stax.parallel(stax.serial(conv(8, (3, 3), padding="SAME"), stax.Relu()),
                                      stax.serial(conv(8, (1, 1)), stax.Relu())),
        stax.FanInConcat(axis=-1), conv(8, (3, 3)), stax.Flatten(), dense(1))),
    # a residual block, LayerNorm without affine parameters, a dense layer, erf, readout
    "residual_layer_norm": ((4, 5), stax.serial(
        dense(16), stax.FanOut(2),
        stax.parallel(stax.Identity(), stax.serial(stax.Relu(), dense(16), stax.Erf(),
                                                   dense(16))),
        stax.FanInSum(), stax.LayerNorm(), dense(16), stax.Erf(), dense(1))),
}


def main() -> None:
    rng = np.random.default_rng(0)
    out = {}
    for name, (shape, (_, _, kernel_fn)) in ARCHITECTURES.items():
        x = rng.standard_normal(shape)
        nngp, ntk = kernel_fn(x, None, get=("nngp", "ntk"))
        out[name] = {"x": x.tolist(), "nngp": np.asarray(nngp).tolist(),
                     "ntk": np.asarray(ntk).tolist()}
    path = Path(__file__).with_name("stax_references.json")
    path.write_text(json.dumps(out) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
