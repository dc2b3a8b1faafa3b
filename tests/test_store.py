"""The kernel store: equal to the in-memory kernel, resumable after SIGKILL and corruption,
shared by processes, refusing other kernels, and read back by streamed products."""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import ntk_torch as nt
from ntk_torch import _store_compute, _store_files, _workers
from tests.conftest import assert_close
from tests.oracle import naive_ntk
from tests.store_job import TILE, build

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "store_job.py"
MODES = ("full", "diagonal", "trace")


def _mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, 3)).double().eval()
    return model, torch.randn(11, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)


def _cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    # Streamed convolution gradients and a separable pooled head: per-block state of every kind.
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    model = model.double().eval()
    x1 = torch.randn(9, 2, 7, 7, dtype=torch.float64)
    return model, x1, torch.randn(5, 2, 7, 7, dtype=torch.float64)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("second", [False, True], ids=["x2=None", "x2"])
@pytest.mark.parametrize("implementation", ["jacobian", "ntk_vp", "structured"])
def test_store_equals_in_memory_kernel(tmp_path, mode, second, implementation):
    model, x1, x2 = _mlp()
    x2 = x2 if second else None
    store = nt.compute_kernel(model, x1, x2, store=tmp_path / "k", mode=mode, tile=4,
                              implementation=implementation, progress=False)
    assert store.complete and store.mode == mode and store.dtype == torch.float64
    # The same tiles in memory are the same computation: equal bit for bit.
    tiled = nt.empirical_ntk(model, x1, x2, mode=mode, implementation=implementation, batch_size=4)
    assert torch.equal(store.load(), tiled)
    assert_close(store.load(), naive_ntk(model, x1, x2, mode=mode))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("second", [False, True], ids=["x2=None", "x2"])
def test_structured_cnn_store_reuses_row_blocks_exactly(tmp_path, mode, second):
    model, x1, x2 = _cnn()
    x2 = x2 if second else None
    store = nt.compute_kernel(model, x1, x2, store=tmp_path / "k", mode=mode, tile=3,
                              implementation="structured", progress=False)
    assert_close(store.load(), naive_ntk(model, x1, x2, mode=mode))


def test_dataset_inputs_with_targets(tmp_path):
    model, x1, x2 = _mlp()
    data1 = torch.utils.data.TensorDataset(x1, torch.arange(len(x1)))
    data2 = torch.utils.data.TensorDataset(x2)
    store = nt.compute_kernel(model, data1, data2, store=tmp_path / "k", mode="full", tile=4,
                              progress=False)
    assert torch.equal(store.load(), nt.empirical_ntk(model, x1, x2, mode="full", batch_size=4))
    # Identified by a name instead of a hash: the name is what a resume must repeat.
    named = nt.compute_kernel(model, data1, store=tmp_path / "named", tile=4, inputs_id="train-v1",
                              progress=False)
    assert named.manifest["fingerprint"]["x1"]["id"] == "train-v1"
    with pytest.raises(nt.StoreError, match="id train-v1 -> train-v2"):
        nt.compute_kernel(model, data1, store=tmp_path / "named", tile=4, inputs_id="train-v2",
                          progress=False)


def _forget(store: nt.KernelStore, tiles) -> None:
    for tile in tiles:
        _store_files.record_path(store.path, tile).unlink()


def test_resume_computes_only_missing_tiles(tmp_path, monkeypatch):
    model, x1, _ = _mlp()
    path = tmp_path / "k"
    whole = nt.compute_kernel(model, x1, store=path, mode="full", tile=3, progress=False).load()
    store = nt.KernelStore(path)
    _forget(store, [(0, 1), (2, 3)])
    assert store.progress == (8, 10) and not store.complete
    with pytest.raises(nt.StoreError, match="not been computed"):
        store.load()
    computed = []
    original = _store_compute._Writer._write
    monkeypatch.setattr(_store_compute._Writer, "_write",
                        lambda self, tile, *a: (computed.append(tile), original(self, tile, *a))[1])
    resumed = nt.compute_kernel(model, x1, store=path, mode="full", tile=3, progress=False)
    assert sorted(computed) == [(0, 1), (2, 3)]
    assert torch.equal(resumed.load(), whole)


def _run_job(store: Path, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(JOB), str(store), *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _reference(tmp_path: Path, mode: str = "full", second: bool = False) -> torch.Tensor:
    model, x1, x2 = build(second)
    path = tmp_path / "reference"
    store = nt.compute_kernel(model, x1, x2, store=path, mode=mode, tile=TILE,
                              implementation="jacobian", progress=False)
    kernel = store.load()
    assert_close(kernel, naive_ntk(model, x1, x2, mode=mode))
    shutil.rmtree(path)
    return kernel


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    reference = _reference(tmp_path)
    path = tmp_path / "k"
    kills = 0
    for wanted in (3, 20, 45):  # kill at three different points of the run
        job = _run_job(path, "--delay", "0.05")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and job.poll() is None:
            if (path / "manifest.json").exists() and nt.KernelStore(path).progress[0] >= wanted:
                break
            time.sleep(0.01)
        if job.poll() is None:
            job.send_signal(signal.SIGKILL)
            kills += 1
        job.communicate(timeout=60)
    assert kills == 3, "the job finished before it could be killed"
    done, total = nt.KernelStore(path).progress
    assert 0 < done < total
    model, x1, _ = build()
    resumed = nt.compute_kernel(model, x1, store=path, mode="full", tile=TILE,
                                implementation="jacobian", progress=False)
    assert resumed.complete
    assert torch.equal(resumed.load(), reference)


def test_corrupt_chunk_is_detected_and_recomputed(tmp_path):
    model, x1, _ = _mlp()
    path = tmp_path / "k"
    whole = nt.compute_kernel(model, x1, store=path, mode="trace", tile=4, progress=False).load()
    chunk = path / "kernel" / "c" / "0" / "1"
    data = bytearray(chunk.read_bytes())
    data[17] ^= 0xFF  # one flipped byte
    chunk.write_bytes(bytes(data))
    with pytest.raises(nt.StoreError, match=r"tile \(0, 1\).*checksum"):
        nt.KernelStore(path).load()
    with pytest.warns(RuntimeWarning, match=r"tile \(0, 1\).*computed again"):
        repaired = nt.compute_kernel(model, x1, store=path, mode="trace", tile=4, progress=False)
    assert torch.equal(repaired.load(), whole)
    # A chunk file that vanished reads as zeros in zarr: the record's checksum catches it.
    chunk.unlink()
    with pytest.raises(nt.StoreError, match="checksum"):
        nt.KernelStore(path).block(slice(0, 4), slice(4, 8))


def _perturbed(model: nn.Module) -> nn.Module:
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[2].bias[0] += 1e-9
    return other


@pytest.mark.parametrize("change,message", [
    ("parameters", "parameter or buffer values"),
    ("architecture", "architecture"),
    ("selection", "selected parameters"),
    ("inputs", r"`x1` \(values of samples 4-7\)"),
    ("x2", r"`x2` \(given now, None in the store\)"),
    ("mode", "mode 'trace' in the store, 'full' now"),
    ("dtype", "dtype 'float64' in the store, 'float32' now"),
    ("tile", "tile 4 in the store, 5 now"),
    ("implementation", "implementation 'jacobian' in the store, 'ntk_vp' now"),
    ("train", "train/eval mode"),
])
def test_another_kernel_is_refused_and_the_store_stays_resumable(tmp_path, change, message):
    model, x1, x2 = _mlp()
    path = tmp_path / "k"
    kwargs = dict(store=path, mode="trace", tile=4, implementation="jacobian", progress=False)
    whole = nt.compute_kernel(model, x1, **kwargs).load()
    _forget(nt.KernelStore(path), [(1, 2)])
    model2, x1b, x2b, kw = model, x1, None, dict(kwargs)
    if change == "parameters":
        model2 = _perturbed(model)
    elif change == "architecture":
        model2 = nn.Sequential(model[0], nn.ReLU(), model[2])
    elif change == "selection":
        kw["params"] = ["2.weight", "2.bias"]
    elif change == "inputs":
        x1b = x1.clone()
        x1b[5, 0] += 1e-12
    elif change == "x2":
        x2b = x2
    elif change == "mode":
        kw["mode"] = "full"
    elif change == "dtype":
        model2, x1b = _perturbed(model).float(), x1.float()
    elif change == "tile":
        kw["tile"] = 5
    elif change == "implementation":
        kw["implementation"] = "ntk_vp"
    elif change == "train":
        model2 = copy.deepcopy(model).train()
    with pytest.raises(nt.StoreError, match=message):
        nt.compute_kernel(model2, x1b, x2b, **kw)
    resumed = nt.compute_kernel(model, x1, **{**kwargs, "implementation": "auto"})
    assert torch.equal(resumed.load(), whole)


def test_unknown_version_foreign_directory_and_missing_store(tmp_path):
    model, x1, _ = _mlp()
    path = tmp_path / "k"
    nt.compute_kernel(model, x1, store=path, tile=4, progress=False)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(nt.StoreError, match="format version 99.*upgrade ntk_torch"):
        nt.KernelStore(path)
    with pytest.raises(nt.StoreError, match="format version 99"):
        nt.compute_kernel(model, x1, store=path, tile=4, progress=False)
    with pytest.raises(FileNotFoundError, match="no kernel store.*does not exist"):
        nt.KernelStore(tmp_path / "nowhere")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("...")
    with pytest.raises(nt.StoreError, match="not a kernel store.*thesis.tex"):
        nt.compute_kernel(model, x1, store=tmp_path / "notes", progress=False)
    with pytest.raises(FileNotFoundError, match="not a kernel store"):
        nt.KernelStore(tmp_path / "notes")
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="could not create the kernel store"):
        nt.compute_kernel(model, x1, store=tmp_path / "file" / "k", progress=False)


def test_unwritable_store_is_a_clear_error_and_resumes_later(tmp_path, monkeypatch):
    model, x1, _ = _mlp()
    path = tmp_path / "k"
    whole = nt.compute_kernel(model, x1, store=path, tile=4, progress=False).load()
    _forget(nt.KernelStore(path), [(0, 0), (1, 2)])
    real_write_bytes = Path.write_bytes

    def read_only(self, data):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "write_bytes", read_only)
    with pytest.raises(OSError, match="read-only.*4 of 6 finished tiles are kept"):
        nt.compute_kernel(model, x1, store=path, tile=4, progress=False)
    monkeypatch.setattr(Path, "write_bytes", real_write_bytes)
    if os.geteuid() != 0:  # a real read-only directory (root writes through permissions)
        os.chmod(path / "tiles", 0o555)
        try:
            with pytest.raises(OSError, match="permission denied"):
                nt.compute_kernel(model, x1, store=path, tile=4, progress=False)
        finally:
            os.chmod(path / "tiles", 0o755)
    # A complete store reads without writing anything.
    resumed = nt.compute_kernel(model, x1, store=path, tile=4, progress=False)
    assert torch.equal(resumed.load(), whole)


def test_disk_full_keeps_finished_tiles(tmp_path, monkeypatch):
    model, x1, x2 = _mlp()
    path = tmp_path / "k"
    original = _store_compute._Writer._write
    calls = []

    def fail_third(self, tile, *args):
        calls.append(tile)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, tile, *args)

    monkeypatch.setattr(_store_compute._Writer, "_write", fail_third)
    with pytest.raises(OSError, match="the disk is full. The 2 of 6 finished tiles are kept"):
        nt.compute_kernel(model, x1, x2, store=path, mode="full", tile=4, progress=False)
    monkeypatch.setattr(_store_compute._Writer, "_write", original)
    assert not list((path / "claims").iterdir()), "claims are released after an error"
    resumed = nt.compute_kernel(model, x1, x2, store=path, mode="full", tile=4, progress=False)
    assert torch.equal(resumed.load(), nt.empirical_ntk(model, x1, x2, mode="full", batch_size=4))


def test_stale_claims_are_taken_over_and_live_ones_respected(tmp_path):
    claims = _workers.Claims(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "0.0").write_text(json.dumps({"host": claims.host, "pid": dead.pid, "time": 0}))
    (tmp_path / "0.1").write_text(json.dumps({"host": claims.host, "pid": os.getppid(), "time": 0}))
    (tmp_path / "0.2").write_text(json.dumps({"host": "elsewhere", "pid": 1, "time": 0}))
    old = time.time() - 2 * _workers.STALE_AFTER_S
    (tmp_path / "0.3").write_text(json.dumps({"host": "elsewhere", "pid": 1, "time": 0}))
    os.utime(tmp_path / "0.3", (old, old))
    try:
        assert claims.take("0.0")  # its process is gone
        assert not claims.take("0.1")  # a live process on this host
        assert not claims.take("0.2")  # another host, fresh
        assert claims.take("0.3")  # another host, silent for too long
        assert claims.take("1.1")
        assert not claims.take("1.1")  # held by this very worker
    finally:
        claims.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.1", "0.2"]


def test_a_claim_is_never_seen_half_written(tmp_path):
    # A worker killed while claiming leaves at most its file written aside, never an empty
    # claim that would look held for STALE_AFTER_S: the tile stays free.
    (tmp_path / ".0.0.999999.tmp").write_bytes(b"")
    claims = _workers.Claims(tmp_path)
    try:
        assert claims.take("0.0")
        assert json.loads((tmp_path / "0.0").read_bytes())["pid"] == os.getpid()
    finally:
        claims.close()


def test_block_products_and_memory_budget(tmp_path):
    model, x1, x2 = _mlp()
    g = torch.Generator().manual_seed(3)
    for mode in MODES:
        for second in (None, x2):
            dense = nt.empirical_ntk(model, x1, second, mode=mode, batch_size=4)
            store = nt.compute_kernel(model, x1, second, store=tmp_path / f"{mode}{second is None}",
                                      mode=mode, tile=4, progress=False)
            assert torch.equal(store.block(slice(2, 9), range(1, 6)), dense[2:9, 1:6])
            n2 = dense.shape[1]
            if mode == "trace":
                v = torch.randn(n2, 2, generator=g, dtype=torch.float64)
                expected = dense @ v
                assert_close(store.matvec(v[:, 0]), expected[:, 0], rtol=1e-13)
            else:
                o = dense.shape[2]
                v = torch.randn(n2, o, 2, generator=g, dtype=torch.float64)
                k = dense if mode == "full" else torch.diag_embed(dense)
                expected = torch.einsum("abij,bjc->aic", k, v)
                assert_close(store.matvec(v[..., 0]), expected[..., 0], rtol=1e-13)
            assert_close(store.matmul(v), expected, rtol=1e-13)
            diag = store.diagonal() if second is None else None
            if diag is not None:
                idx = torch.arange(len(x1))
                assert torch.equal(diag, dense[idx, idx])
    small = nt.KernelStore(tmp_path / "fullTrue", memory_budget=1000)
    with pytest.raises(MemoryError, match=r"takes 8\.5 KiB.*budget is 1000 bytes.*store.block"):
        small.load()
    with pytest.raises(ValueError, match=r"`V` must have shape \(11, 3, C\)"):
        small.matmul(torch.ones(11, 2))
    with pytest.raises(ValueError, match="`rows` must lie within the 11 samples"):
        small.block(range(5, 20), slice(0, 2))


def _torchrun(store: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    return subprocess.run([str(torchrun), "--standalone", f"--nproc-per-node={nproc}", str(JOB),
                           str(store), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=240)


@pytest.mark.slow
def test_torchrun_ranks_equal_one_process_and_resume_with_another_count(tmp_path):
    reference = _reference(tmp_path, mode="full", second=True)
    path = tmp_path / "k"
    run = _torchrun(path, "--x2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("done (60, 60)") == 2  # both ranks return the complete store
    store = nt.KernelStore(path)
    assert torch.equal(store.load(), reference)
    # Two ranks, then one process finishes what they left.
    _forget(store, [t for t in store.tiles() if (t[0] + t[1]) % 3 == 0])
    model, x1, x2 = build(True)
    resumed = nt.compute_kernel(model, x1, x2, store=path, mode="full", tile=TILE,
                                implementation="jacobian", progress=False)
    assert torch.equal(resumed.load(), reference)


@pytest.mark.slow
def test_independent_workers_share_one_store(tmp_path):
    reference = _reference(tmp_path)
    path = tmp_path / "k"
    jobs = [_run_job(path, "--delay", "0.02") for _ in range(2)]
    for job in jobs:
        out, err = job.communicate(timeout=240)
        assert job.returncode == 0, err[-3000:]
    assert torch.equal(nt.KernelStore(path).load(), reference)


def _symmetric_store(tmp_path: Path, mode: str) -> tuple[nt.KernelStore, torch.Tensor]:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 4)).double().eval()
    x = torch.randn(40, 3, dtype=torch.float64)
    store = nt.compute_kernel(model, x, store=tmp_path / mode, mode=mode, tile=16, progress=False)
    return store, store.load()


@pytest.mark.parametrize("mode", ["trace", "full"])
def test_solve_eigenmodes_and_predictions_on_a_store_match_dense(tmp_path, mode):
    store, dense = _symmetric_store(tmp_path, mode)
    g = torch.Generator().manual_seed(5)
    y = torch.randn(40, *((4,) if mode == "full" else (3,)), generator=g, dtype=torch.float64)
    ridge, tol = 1e-2, 1e-12
    # ‖x - x*‖/‖x*‖ ≤ κ(K + ridge·I)·tol for a relative residual tol: bound the error by that.
    flat = dense if mode == "trace" else dense.permute(0, 2, 1, 3).reshape(160, 160)
    kappa = float(torch.linalg.eigvalsh(flat)[-1] + ridge) / ridge
    iterations = []
    x = nt.solve(store, y, ridge=ridge, tol=tol, callback=lambda i, r: iterations.append(i))
    assert_close(x, nt.solve(dense, y, ridge=ridge), rtol=kappa * tol)
    assert 0 < len(iterations) < 100
    values, vectors = nt.eigenmodes(store, k=6)
    exact = nt.eigenmodes(dense)
    assert torch.equal(nt.eigenmodes(dense, k=6).values, exact.values[:6])
    assert_close(values, exact.values[:6], rtol=1e-7)  # the default tol is 1e-8 of λ_max
    exact_vectors = exact.vectors.reshape(-1, exact.values.numel())[:, :6]
    overlap = (vectors.reshape(-1, 6) * exact_vectors).sum(0)
    assert torch.allclose(overlap, torch.ones(6, dtype=torch.float64), atol=1e-6)
    # Kernel regression and the GP posterior, with the cross-kernel given either way.
    test_train = dense[:7]
    pred = nt.kernel_regression(store, test_train, y, ridge=ridge, tol=tol)
    assert_close(pred, nt.kernel_regression(dense, test_train, y, ridge=ridge), rtol=kappa * tol)
    post = nt.gp_posterior(store, test_train, dense[:7, :7], y, noise=ridge, tol=tol)
    reference = nt.gp_posterior(dense, test_train, dense[:7, :7], y, noise=ridge)
    assert_close(post.mean, reference.mean, rtol=kappa * tol)
    assert_close(post.covariance, reference.covariance, rtol=kappa * tol * 1e3)


def test_solve_on_a_diagonal_store_solves_each_output_apart(tmp_path):
    store, dense = _symmetric_store(tmp_path, "diagonal")
    y = torch.randn(40, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    x = nt.solve(store, y, ridge=1e-2, tol=1e-12)
    for i in range(4):
        assert_close(x[:, i], nt.solve(dense[:, :, i], y[:, i], ridge=1e-2), rtol=1e-7)


def test_streamed_linear_algebra_refuses_what_it_cannot_do(tmp_path):
    store, _ = _symmetric_store(tmp_path, "diagonal")
    with pytest.raises(ValueError, match="diagonal-mode store; eigenmodes need"):
        nt.eigenmodes(store, k=3)
    trace, _ = _symmetric_store(tmp_path, "trace")
    with pytest.raises(ValueError, match=r"`k` \(the number of leading eigenpairs\) is required"):
        nt.eigenmodes(trace)
    model, x1, x2 = _mlp()
    cross = nt.compute_kernel(model, x1, x2, store=tmp_path / "cross", progress=False)
    with pytest.raises(ValueError, match="one set of inputs with itself"):
        nt.solve(cross, torch.ones(11), ridge=1.0)
    with pytest.raises(ValueError, match=r"`y` must have shape \(N,\) or \(N, C\) with N = 40"):
        nt.solve(trace, torch.ones(39), ridge=1.0)
    with pytest.raises(ValueError, match="`ridge` must be a finite number >= 0"):
        nt.solve(trace, torch.ones(40), ridge=-1.0)


@pytest.mark.slow
def test_benchmark_script_runs_every_part(tmp_path):
    # Seconds-long sizes: the script's plumbing, not a timing test.
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_store.py"), "--quick",
                          "--out", str(out), "--threads", "1"],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((out / "store.json").read_text())["results"]
    assert set(results) == {"overhead", "solve", "resume", "scaling", "large"}
    assert results["resume"]["bit_identical"] and results["scaling"]["bit_identical"]
    assert results["solve"]["relative_difference"] < 1e-4
    table = (out / "store.md").read_text()
    assert table.startswith("Command: `python benchmarks/bench_store.py --quick")
    assert table.count("\n|") == 2 + 5
