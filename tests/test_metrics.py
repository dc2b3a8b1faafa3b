"""Metrics against hand-computed values, closed forms and an explicit numpy oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ntk_torch import metrics

DT = torch.float64


def _random_psd(n: int, rank: int, seed: int, o: int | None = None) -> torch.Tensor:
    """A PSD kernel in trace (o=None) or full layout, as J Jᵀ of a random Jacobian."""
    g = torch.Generator().manual_seed(seed)
    if o is None:
        j = torch.randn(n, rank, generator=g, dtype=DT)
        return j @ j.T
    j = torch.randn(n, o, rank, generator=g, dtype=DT)
    return torch.einsum("aip,bjp->abij", j, j)


def _centering(n: int) -> np.ndarray:
    return np.eye(n) - np.ones((n, n)) / n


# --- kernel_distance and relative_change ---------------------------------------------


def test_distance_zero_for_positive_multiple_and_one_for_orthogonal():
    k = _random_psd(6, 3, seed=0)
    assert abs(float(metrics.kernel_distance(k, 3 * k))) < 1e-15
    e1 = torch.zeros(3, 3, dtype=DT)
    e1[0, 0] = 1
    e2 = torch.zeros(3, 3, dtype=DT)
    e2[1, 1] = 1
    assert float(metrics.kernel_distance(e1, e2)) == 1.0


def test_distance_hand_computed():
    # <K1, K2> = 1, |K1| = 1, |K2| = 2  ->  1 - 1/2
    k1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=DT)
    k2 = torch.ones(2, 2, dtype=DT)
    assert float(metrics.kernel_distance(k1, k2)) == pytest.approx(0.5, abs=1e-15)


def test_distance_matches_numpy_cosine_on_full_kernels():
    k1, k2 = _random_psd(5, 4, seed=1, o=3), _random_psd(5, 4, seed=2, o=3)
    a, b = k1.numpy().ravel(), k2.numpy().ravel()
    expected = 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert float(metrics.kernel_distance(k1, k2)) == pytest.approx(expected, rel=1e-12)


def test_diagonal_layout_equals_full_with_zero_cross_outputs():
    k1, k2 = _random_psd(4, 3, seed=3, o=2), _random_psd(4, 3, seed=4, o=2)
    d1, d2 = k1.diagonal(dim1=2, dim2=3), k2.diagonal(dim1=2, dim2=3)
    f1, f2 = torch.diag_embed(d1), torch.diag_embed(d2)
    expected = float(metrics.kernel_distance(f1, f2))
    assert float(metrics.kernel_distance(d1, d2)) == pytest.approx(expected, rel=1e-13)
    assert torch.allclose(metrics.spectrum(d1), metrics.spectrum(f1), rtol=1e-12, atol=1e-12)
    y = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=DT)
    # Alignment differs on purpose: the diagonal target drops the cross-output terms too.
    yn = y.numpy()
    expected = _numpy_alignment(np.einsum("abi,ij->aibj", d1.numpy(), np.eye(2)).reshape(8, 8),
                                np.einsum("ai,bi,ij->aibj", yn, yn, np.eye(2)).reshape(8, 8),
                                _kron_centering(4, 2))
    assert float(metrics.kernel_alignment(d1, y)) == pytest.approx(expected, rel=1e-12)


def test_distance_keeps_its_digits_for_tiny_drift_in_float32():
    # d ≈ 1e-9 is far below float32's 1 − cos resolution (~1e-7); the float64 cosine is the
    # oracle. Per-entry rounding (6e-8 relative) against a ~4e-5 relative change bounds the
    # float32 error at a few 1e-3.
    k = _random_psd(30, 30, seed=13)
    e = torch.randn(30, 30, generator=torch.Generator().manual_seed(14), dtype=DT)
    k2 = k + 3e-5 * k.norm() / e.norm() * (e + e.T) / 2
    a, b = k.numpy().ravel(), k2.numpy().ravel()
    expected = 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert 1e-10 < expected < 1e-8
    got = float(metrics.kernel_distance(k.float(), k2.float()))
    assert got == pytest.approx(expected, rel=2e-2)
    assert float(metrics.kernel_distance(k.float(), k.float())) == 0.0


def test_one_output_full_kernel_equals_trace_kernel():
    k = _random_psd(5, 2, seed=5)
    full = k[:, :, None, None]
    assert float(metrics.kernel_distance(full, 2 * full + 1)) == pytest.approx(
        float(metrics.kernel_distance(k, 2 * k + 1)), rel=1e-13)
    assert torch.allclose(metrics.spectrum(full), metrics.spectrum(k), rtol=1e-13)
    expected = float(metrics.effective_rank(k))
    assert float(metrics.effective_rank(full)) == pytest.approx(expected, rel=1e-13)


def test_relative_change_hand_computed():
    ref = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=DT)  # norm 5
    cur = ref + torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=DT)  # change of norm sqrt(2)
    assert float(metrics.relative_change(cur, ref)) == pytest.approx(math.sqrt(2) / 5, rel=1e-15)
    assert float(metrics.relative_change(ref, ref)) == 0.0


def test_zero_kernel_gives_nan_not_error():
    z = torch.zeros(3, 3, dtype=DT)
    assert math.isnan(float(metrics.kernel_distance(z, torch.eye(3, dtype=DT))))
    assert math.isnan(float(metrics.relative_change(torch.eye(3, dtype=DT), z)))
    assert math.isnan(float(metrics.effective_rank(z)))


# --- kernel_alignment ----------------------------------------------------------------


def _kron_centering(n: int, o: int) -> np.ndarray:
    return np.kron(_centering(n), np.eye(o))  # centres over samples, per output


def _numpy_alignment(k: np.ndarray, y: np.ndarray, h: np.ndarray) -> float:
    kc, yc = h @ k @ h, h @ y @ h
    return float((kc * yc).sum() / (np.linalg.norm(kc) * np.linalg.norm(yc)))


def test_alignment_is_one_for_target_kernel():
    y = torch.tensor([0.3, -1.0, 2.0, 0.7, -0.2], dtype=DT)
    assert float(metrics.kernel_alignment(torch.outer(y, y), y)) == pytest.approx(1.0, abs=1e-14)
    labels = torch.tensor([0, 2, 1, 2, 0, 1])
    onehot = torch.nn.functional.one_hot(labels).to(DT)
    same_class = onehot @ onehot.T
    assert float(metrics.kernel_alignment(5 * same_class, labels)) == pytest.approx(1.0, abs=1e-14)
    assert float(metrics.kernel_alignment(same_class, onehot)) == pytest.approx(1.0, abs=1e-14)
    # Full layout: K = vec(y) vec(y)ᵀ.
    ys = torch.randn(4, 3, generator=torch.Generator().manual_seed(7), dtype=DT)
    full = torch.einsum("ai,bj->abij", ys, ys)
    assert float(metrics.kernel_alignment(full, ys)) == pytest.approx(1.0, abs=1e-14)


def test_alignment_closed_form_identity_kernel():
    # K = I (N=4), y = (1, 1, -1, -1): <HIH, yyᵀ> = yᵀy = 4, |H| = sqrt(3), |yyᵀ| = 4.
    y = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=DT)
    got = float(metrics.kernel_alignment(torch.eye(4, dtype=DT), y))
    assert got == pytest.approx(1 / math.sqrt(3), rel=1e-14)


@pytest.mark.parametrize("layout", ["trace", "full"])
def test_alignment_matches_explicit_centering_matrices(layout):
    n, o = 6, 3
    g = torch.Generator().manual_seed(11)
    y = torch.randn(n, o, generator=g, dtype=DT)
    if layout == "trace":
        k = _random_psd(n, 4, seed=8)
        expected = _numpy_alignment(k.numpy(), (y @ y.T).numpy(), _centering(n))
    else:
        k = _random_psd(n, 4, seed=8, o=o)
        m = k.permute(0, 2, 1, 3).reshape(n * o, n * o).numpy()
        v = y.numpy().reshape(-1)
        expected = _numpy_alignment(m, np.outer(v, v), _kron_centering(n, o))
    assert float(metrics.kernel_alignment(k, y)) == pytest.approx(expected, rel=1e-12)


def test_alignment_integer_labels_equal_their_one_hot():
    k = _random_psd(6, 3, seed=9, o=3)
    labels = torch.tensor([0, 1, 2, 1, 0, 0])
    onehot = torch.nn.functional.one_hot(labels, 3).to(DT)
    expected = float(metrics.kernel_alignment(k, onehot))
    assert float(metrics.kernel_alignment(k, labels)) == pytest.approx(expected, rel=1e-14)


def test_alignment_rejects_bad_targets():
    k = torch.eye(4, dtype=DT)
    with pytest.raises(ValueError, match="same for every sample"):
        metrics.kernel_alignment(k, torch.ones(4, dtype=DT))
    with pytest.raises(ValueError, match=r"N = 4"):
        metrics.kernel_alignment(k, torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match="O = 2"):
        metrics.kernel_alignment(torch.ones(4, 4, 2, 2, dtype=DT), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(TypeError, match="`y`"):
        metrics.kernel_alignment(k, [1, 2, 3, 4])


# --- linear_cka ----------------------------------------------------------------------


def test_cka_of_one_dimensional_features_is_squared_pearson():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(20, 1, generator=g, dtype=DT)
    b = 0.5 * a + torch.randn(20, 1, generator=g, dtype=DT)
    r = np.corrcoef(a.numpy().ravel(), b.numpy().ravel())[0, 1]
    assert float(metrics.linear_cka(a, b)) == pytest.approx(r**2, rel=1e-12)


def test_cka_hand_computed_value():
    # Centred X with XᵀX = 2I (|.| = 2√2), Z = first column (|ZᵀZ| = 2), |ZᵀX|² = 4.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=DT)
    assert float(metrics.linear_cka(x, x[:, :1])) == pytest.approx(1 / math.sqrt(2), rel=1e-14)


def test_cka_invariant_to_orthogonal_maps_scale_and_offset():
    g = torch.Generator().manual_seed(4)
    h = torch.randn(10, 5, generator=g, dtype=DT)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=DT))
    assert float(metrics.linear_cka(h, -3 * h @ q + 2)) == pytest.approx(1.0, abs=1e-13)


@pytest.mark.parametrize("d1,d2", [(3, 2), (40, 30)])  # feature form and Gram form
def test_cka_matches_centred_gram_alignment(d1, d2):
    g = torch.Generator().manual_seed(d1)
    h1 = torch.randn(8, d1, generator=g, dtype=DT)
    h2 = torch.tanh(h1[:, :1] * torch.randn(1, d2, generator=g, dtype=DT))
    h2 = h2 + 0.1 * torch.randn(8, d2, generator=g, dtype=DT)
    hm = _centering(8)
    expected = _numpy_alignment(h1.numpy() @ h1.numpy().T, h2.numpy() @ h2.numpy().T, hm)
    assert float(metrics.linear_cka(h1, h2)) == pytest.approx(expected, rel=1e-12)


def test_cka_flattens_feature_maps_and_checks_samples():
    h = torch.randn(6, 2, 3, dtype=DT)
    assert float(metrics.linear_cka(h, h.reshape(6, 6))) == pytest.approx(1.0, abs=1e-13)
    with pytest.raises(ValueError, match="same N samples"):
        metrics.linear_cka(torch.ones(3, 2), torch.ones(4, 2))
    assert math.isnan(float(metrics.linear_cka(torch.ones(5, 2), torch.randn(5, 2))))


# --- spectrum and effective_rank -------------------------------------------------------


def test_spectrum_hand_computed_and_against_numpy():
    two = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=DT)
    assert metrics.spectrum(two).tolist() == pytest.approx([3.0, 1.0])
    k = _random_psd(4, 3, seed=12, o=2)
    expected = np.sort(np.linalg.eigvalsh(k.permute(0, 2, 1, 3).reshape(8, 8).numpy()))[::-1]
    got = metrics.spectrum(k, 3).numpy()
    assert got == pytest.approx(expected[:3].copy(), rel=1e-10, abs=1e-12)


def test_spectrum_of_kronecker_kernel_is_products():
    # K[a, b, i, j] = A[a, b] B[i, j]: the (N·O) matrix is A ⊗ B, eigenvalues λ_A λ_B.
    a = torch.diag(torch.tensor([3.0, 1.0], dtype=DT))
    b = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=DT)  # eigenvalues 3, 1
    k = torch.einsum("ab,ij->abij", a, b)
    assert metrics.spectrum(k).tolist() == pytest.approx([9.0, 3.0, 3.0, 1.0], abs=1e-13)


def test_spectrum_rejects_bad_num_and_shapes():
    with pytest.raises(ValueError, match=r"`num` must be an int in \[1, 3\]"):
        metrics.spectrum(torch.eye(3), 4)
    with pytest.raises(ValueError, match="square kernel"):
        metrics.spectrum(torch.ones(3, 4))
    with pytest.raises(TypeError, match="floating-point"):
        metrics.spectrum(torch.eye(3, dtype=torch.int64))


def test_effective_rank_closed_forms():
    assert float(metrics.effective_rank(torch.eye(7, dtype=DT))) == pytest.approx(7.0, rel=1e-14)
    v = torch.randn(5, generator=torch.Generator().manual_seed(0), dtype=DT)
    assert float(metrics.effective_rank(torch.outer(v, v))) == pytest.approx(1.0, abs=1e-12)
    # eigenvalues (3, 1): p = (3/4, 1/4)
    p = np.array([0.75, 0.25])
    expected = math.exp(-(p * np.log(p)).sum())
    k = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=DT)
    assert float(metrics.effective_rank(10 * k)) == pytest.approx(expected, rel=1e-13)


def test_shape_mismatch_names_arguments():
    with pytest.raises(ValueError, match=r"`k2` must have `k1`'s shape \(3, 3\), got \(2, 2\)"):
        metrics.kernel_distance(torch.eye(3), torch.eye(2))
    with pytest.raises(TypeError, match="`k1` must be a torch.Tensor"):
        metrics.kernel_distance(np.eye(2), torch.eye(2))
