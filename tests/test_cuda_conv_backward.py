"""The CUDA C++ conv backward: ``resconv::cuda_conv2d_dgrad`` / ``cuda_conv2d_wgrad``
(csrc/conv_backward.cpp, conv_dgrad_kernel.cu, conv_wgrad_kernel.cu, conv_backward_plan.h),
impl "cuda" of ``resconv.ops._conv_backward``, and the cuda backend's switch
``RESCONV_CUDA_CONV_BACKWARD`` (default "aten" until the GPU tests below have passed).

Without a GPU (CI):
  * the index plans the kernels run, taken from the compiled extension (the very C++ the
    kernels include): dgrad's stride phases checked exhaustively over small sizes, and a
    float64 dgrad assembled from those phases against torch autograd; wgrad's split-K plan;
  * Python models of the kernels' grids (every dx / dW / db element owned by exactly one CTA)
    and of their tensor-core fragment loads (ldmatrix / ldmatrix.trans addresses produce the
    mma.sync fragment layouts of the PTX ISA; shared-memory accesses are bank-conflict free);
  * fake (meta) implementations: shapes, strides, dtypes; opcheck on meta;
  * the C++ argument checks (the CPU registration checks every argument, then refuses);
  * the switch: default, parsing, and the route the cuda backend's backward takes (run on
    meta tensors through the fake implementations).
With a GPU (marked ``gpu`` and ``cuda_ext``, skipped cleanly elsewhere): gx / gw / gb against
float64 torch autograd on the conformance table's conv cases x dtypes x layouts, every kernel
forced, the fused prologue against float64 and against the same kernels on a materialised dy,
bitwise reproducibility for every split count, empty and misaligned inputs, and the cuda
backend's training backward with the switch on against torch.nn.

Tolerances: resconv.tolerances.GRAD (|out - ref| <= atol * max|ref| + rtol * |ref|); the
fused prologue against the float64 formula gets 2x (dy is rounded to the operand dtype once
before the product, as a materialised dy would be).
"""
from __future__ import annotations

import math
import os

# Before the extension allocates anything: kernel outputs start as NaN, so an element a
# kernel fails to write fails its comparison.
os.environ.setdefault("RESCONV_POISON", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from resconv import _conv_args as A  # noqa: E402
from resconv import tolerances as T  # noqa: E402
from resconv.ops import cuda as cuda_ops  # noqa: E402
from resconv.ops import cuda_extension  # noqa: E402
from resconv.ops import _shared  # noqa: E402
from resconv.ops._shared import DyPrologue  # noqa: E402

from conformance_table import CONV_CASES  # noqa: E402
from conftest import conv2d_backward  # noqa: E402

ENV = cuda_extension.CONV_BACKWARD_ENV


# ------------------------------------------------------------------------------------------
# fixtures and helpers
# ------------------------------------------------------------------------------------------
@pytest.fixture
def gpu(ext):
    """A CUDA device the cuda backend can run on (skips otherwise)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = cuda_ops.CudaBackend().unavailable_reason(torch.device("cuda"), torch.float16)
    if reason is not None:
        pytest.skip(f"the cuda backend cannot run on this GPU: {reason}")
    return torch.device("cuda")


def assert_close(name, out, ref, key, scale=1.0):
    tol = T.GRAD[key]
    assert out is not None, f"{name}: missing"
    assert tuple(out.shape) == tuple(ref.shape), f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(o).all(), f"{name}: non-finite values (unwritten elements are NaN-poisoned)"
    err = (o - r).abs()
    bound = scale * (tol.atol * r.abs().max() + tol.rtol * r.abs())
    assert bool((err <= bound).all()), (f"{name} ({key}): max error {err.max().item():.3e}, "
                                        f"{(err / bound.clamp_min(1e-300)).max().item():.2f}x the bound")


def conv_case(name):
    """(N, C, H, W, K, Cg, R, S, stride, padding (t, b, l, r), dilation, groups) of a conformance
    conv case; padding modes other than zeros are the functional layer's (a plain conv here)."""
    c = CONV_CASES[name]
    groups = c.get("groups", 1)
    ks = c["kernel_size"]
    R, S = (ks, ks) if isinstance(ks, int) else ks
    N = 1 if c["N"] is None else c["N"]
    x0 = torch.empty(N, c["C"], c["H"], c["W"])
    w0 = torch.empty(c["K"], c["C"] // groups, R, S)
    g = A.conv_geometry(x0, w0, c.get("stride", 1), c.get("padding", 0), c.get("dilation", 1), groups)
    return g


def reference_grads(dy, x, w, g):
    """float64 (dx, dW, db) of conv2d(x, w) + b given dy, by torch autograd on F.conv2d."""
    t, b, l, r = g.padding
    x64 = x.detach().double().cpu().requires_grad_()
    w64 = w.detach().double().cpu().requires_grad_()
    out = F.conv2d(F.pad(x64, (l, r, t, b)), w64, None, g.stride, 0, g.dilation, g.groups)
    out.backward(dy.detach().double().cpu())
    return x64.grad, w64.grad, dy.detach().double().cpu().sum((0, 2, 3))


# ------------------------------------------------------------------------------------------
# CPU: dgrad's stride phases (the C++ of conv_backward_plan.h, through resconv._C)
# ------------------------------------------------------------------------------------------
def test_dgrad_phases_cover_every_position_and_tap(ext):
    """For every small axis (size, pad, stride, dilation, taps): the phases partition the input
    positions; each position's taps are exactly those r with r*dil = pos + pad (mod stride);
    and tap j of phase position i reads output row i + base - j*out_step."""
    checked = 0
    for stride in range(1, 6):
        for dil in range(1, 5):
            for taps in range(1, 6):
                for pad in range(0, 5):
                    for size in range(0, 10):
                        phases = ext.dgrad_phases(size, pad, stride, dil, taps)
                        assert len(phases) == stride
                        seen = []
                        for a, (first, count, tap0, ntaps, base, tap_step, out_step) in enumerate(phases):
                            assert 0 <= first < stride and count >= 0
                            expect_taps = [r for r in range(taps) if (a - r * dil) % stride == 0]
                            got_taps = [tap0 + j * tap_step for j in range(ntaps)]
                            assert got_taps == expect_taps, (size, pad, stride, dil, taps, a)
                            for i in range(count):
                                h = first + i * stride
                                assert h < size and (h + pad) % stride == a
                                seen.append(h)
                                for j, r in enumerate(got_taps):
                                    assert (h + pad - r * dil) % stride == 0
                                    assert i + base - j * out_step == (h + pad - r * dil) // stride
                            assert first + count * stride >= size  # no position left after the phase
                        assert sorted(seen) == list(range(size)), (size, pad, stride, dil)
                        checked += 1
    assert checked == 5 * 4 * 5 * 5 * 10


def dgrad_from_phases(ext, dy, w, g):
    """float64 dgrad assembled the way the kernels tile it: per (phase_h, phase_w), rows
    (n, i, j) of the phase, reduction over the phase's taps and k with the output row / column
    i + base - j*out_step (masked outside [0, P) x [0, Q)). Also returns how often each dx
    element was written (must be exactly once)."""
    N, K, P, Q = dy.shape
    _, Cg, R, S = w.shape
    G = g.groups
    Kg = K // G
    dy, w = dy.double(), w.double()
    dx = torch.full((N, g.C, g.H, g.W), float("nan"), dtype=torch.float64)
    writes = torch.zeros(N, g.C, g.H, g.W, dtype=torch.int64)
    ph_h = ext.dgrad_phases(g.H, g.padding[0], g.stride[0], g.dilation[0], R)
    ph_w = ext.dgrad_phases(g.W, g.padding[2], g.stride[1], g.dilation[1], S)
    for fh, ch, r0, nr, bh, rstep, dp in ph_h:
        for fw, cw, s0, ns, bw, sstep, dq in ph_w:
            if ch == 0 or cw == 0:
                continue
            acc = torch.zeros(N, G, Cg, ch, cw, dtype=torch.float64)
            i, j = torch.arange(ch), torch.arange(cw)
            for jr in range(nr):
                for js in range(ns):
                    p = i + bh - jr * dp
                    q = j + bw - js * dq
                    mask = ((p >= 0) & (p < P))[:, None] & ((q >= 0) & (q < Q))[None, :]
                    sel = dy[:, :, p.clamp(0, P - 1)][:, :, :, q.clamp(0, Q - 1)] * mask
                    wt = w[:, :, r0 + jr * rstep, s0 + js * sstep].reshape(G, Kg, Cg)
                    acc += torch.einsum("ngkhw,gkc->ngchw", sel.reshape(N, G, Kg, ch, cw), wt)
            dx[:, :, fh::g.stride[0], fw::g.stride[1]] = acc.reshape(N, g.C, ch, cw)
            writes[:, :, fh::g.stride[0], fw::g.stride[1]] += 1
    return dx, writes


EXTRA_GEOMS = [  # (N, C, H, W, K, R, S, stride, padding (t, b, l, r), dilation, groups)
    (2, 4, 7, 6, 6, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1), 1),  # 1x1 stride 2: phases without taps
    (2, 4, 9, 9, 4, 3, 3, (2, 2), (2, 2, 2, 2), (2, 2), 1),  # gcd(dil, stride) = 2: odd phases empty
    (1, 4, 10, 11, 4, 3, 2, (3, 2), (2, 0, 1, 3), (2, 3), 1),
    (1, 2, 13, 12, 4, 5, 4, (3, 4), (4, 1, 0, 6), (3, 2), 2),  # padding > stride
    (2, 6, 5, 5, 6, 3, 3, (4, 4), (1, 1, 1, 1), (1, 1), 3),  # stride > kernel: rows without taps
    (1, 2, 12, 12, 2, 2, 2, (5, 3), (0, 0, 0, 0), (6, 4), 1),
]


def _geometry_from(t):
    N, C, H, W, K, R, S, stride, padding, dilation, groups = t
    return A.conv_geometry(torch.empty(N, C, H, W), torch.empty(K, C // groups, R, S), stride, list(padding),
                           dilation, groups)


@pytest.mark.parametrize("case", [n for n in CONV_CASES if n != "empty_batch"] +
                         [f"extra{i}" for i in range(len(EXTRA_GEOMS))])
def test_dgrad_phase_model_matches_autograd(ext, case):
    g = _geometry_from(EXTRA_GEOMS[int(case[5:])]) if case.startswith("extra") else conv_case(case)
    torch.manual_seed(0)
    dy = torch.randn(g.out_shape, dtype=torch.float64)
    w = torch.randn(g.K, g.C // g.groups, g.R, g.S, dtype=torch.float64)
    x = torch.randn(g.N, g.C, g.H, g.W, dtype=torch.float64)
    dx, writes = dgrad_from_phases(ext, dy, w, g)
    assert bool((writes == 1).all()), "every dx element is written by exactly one phase"
    rx, _, _ = reference_grads(dy, x, w, g)
    torch.testing.assert_close(dx, rx, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------
# CPU: wgrad's split-K plan
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("npq", [1, 31, 32, 33, 511, 512, 513, 4096, 100_003, 2**31 - 300])
@pytest.mark.parametrize("tiles", [1, 7, 144, 10_000])
@pytest.mark.parametrize("requested", [0, 1, 2, 3, 7, 300])
def test_wgrad_split_plan(ext, npq, tiles, requested):
    target = 264  # 2 x 132 SMs
    chunk, split = ext.wgrad_split(npq, tiles, target, requested)
    assert chunk % ext.WGRAD_ROWS == 0 and chunk > 0
    assert 1 <= split <= ext.WGRAD_MAX_SPLIT
    assert (split - 1) * chunk < npq <= split * chunk, "splits are non-empty and cover N*P*Q"
    if requested:
        r = min(requested, ext.WGRAD_MAX_SPLIT)
        assert split <= r
        # Chunks are rounded up to whole steps: all r splits stay non-empty when
        # (r - 1) * (npq / r + WGRAD_ROWS) < npq.
        if npq > ext.WGRAD_ROWS * r * (r - 1):
            assert split == r
    else:
        assert split <= max(1, math.ceil(target / tiles))
        assert split == 1 or chunk >= ext.WGRAD_MIN_CHUNK
        if npq >= 64 * ext.WGRAD_MIN_CHUNK * target:  # long enough: about `target` CTAs
            assert split * tiles >= target or split == ext.WGRAD_MAX_SPLIT


# ------------------------------------------------------------------------------------------
# CPU: models of the kernels' grids (which CTA writes which element)
# ------------------------------------------------------------------------------------------
def _ceil(a, b):
    return -(-a // b)


def dgrad_grid_owners(ext, g, BM, BN):
    """Write counts of dx [N, C, H, W] over the dgrad grid, decoded as the kernels do:
    blockIdx.x -> (m_tile, n_tile) with column tiles fastest, y -> group, z -> stride phase;
    a phase's row m -> (n, i, j) -> input pixel (first_h + i*stride_h, first_w + j*stride_w)."""
    Cg = g.C // g.groups
    ph_h = ext.dgrad_phases(g.H, g.padding[0], g.stride[0], g.dilation[0], g.R)
    ph_w = ext.dgrad_phases(g.W, g.padding[2], g.stride[1], g.dilation[1], g.S)
    M_max = g.N * _ceil(g.H, g.stride[0]) * _ceil(g.W, g.stride[1])
    n_tiles = _ceil(Cg, BN)
    writes = torch.zeros(g.N, g.C, g.H, g.W, dtype=torch.int64)
    for bx in range(_ceil(M_max, BM) * n_tiles):
        m0, n0 = (bx // n_tiles) * BM, (bx % n_tiles) * BN
        for grp in range(g.groups):
            for phase in range(g.stride[0] * g.stride[1]):
                fh, ch = ph_h[phase // g.stride[1]][:2]
                fw, cw = ph_w[phase % g.stride[1]][:2]
                M = g.N * ch * cw
                if m0 >= M:
                    continue
                m = torch.arange(m0, min(m0 + BM, M))
                n, rem = m // (ch * cw), m % (ch * cw)
                h, w = fh + (rem // cw) * g.stride[0], fw + (rem % cw) * g.stride[1]
                c = grp * Cg + torch.arange(n0, min(n0 + BN, Cg))
                writes[n[:, None], c[None, :], h[:, None], w[:, None]] += 1
    return writes


@pytest.mark.parametrize("tile", [(128, 128), (128, 64), (64, 64)])
@pytest.mark.parametrize("case", ["3x3", "stride_2x1_pad_1x2", "groups_4", "multi_tile", "extra3", "extra4"])
def test_dgrad_grid_writes_every_element_once(ext, case, tile):
    g = _geometry_from(EXTRA_GEOMS[int(case[5:])]) if case.startswith("extra") else conv_case(case)
    assert bool((dgrad_grid_owners(ext, g, *tile) == 1).all())


def wgrad_grid_owners(g, BM, BN, npq_split, flat):
    """Per split: write counts of dW [K, Cg, R, S] and db [K] over the wgrad grid, decoded as
    the kernels do (tensor cores: one (r, s) tap per column tile, columns c; SIMT (`flat`):
    columns (r, s, c) flattened), and the rows of N*P*Q each split reduces."""
    Kg, Cg, RS = g.K // g.groups, g.C // g.groups, g.R * g.S
    NPQ = g.N * g.P * g.Q
    chunk, split = npq_split
    rows = torch.zeros(NPQ, dtype=torch.int64)
    out = []
    for z in range(split):
        start, end = z * chunk, min(NPQ, (z + 1) * chunk)
        assert start < end, "no empty split"
        rows[start:end] += 1
        gw = torch.zeros(g.K, Cg, g.R, g.S, dtype=torch.int64)
        gb = torch.zeros(g.K, dtype=torch.int64)
        n_cb = _ceil(Cg, BN)
        n_tiles = _ceil(RS * Cg, BN) if flat else RS * n_cb
        for bx in range(_ceil(Kg, BM) * n_tiles):
            m_tile, n_tile = bx // n_tiles, bx % n_tiles
            for grp in range(g.groups):
                k = grp * Kg + torch.arange(m_tile * BM, min(m_tile * BM + BM, Kg))
                if flat:
                    col = torch.arange(n_tile * BN, min(n_tile * BN + BN, RS * Cg))
                    rs, c = col // Cg, col % Cg
                else:
                    rs = torch.full((1,), n_tile // n_cb)
                    c0 = (n_tile % n_cb) * BN
                    c = torch.arange(c0, min(c0 + BN, Cg))
                    rs = rs.expand_as(c)
                gw[k[:, None], c[None, :], (rs // g.S)[None, :], (rs % g.S)[None, :]] += 1
                if n_tile == 0:
                    gb[k] += 1
        out.append((gw, gb))
    return rows, out


@pytest.mark.parametrize("tile,flat", [((128, 128), False), ((128, 64), False), ((64, 64), False), ((64, 64), True)])
@pytest.mark.parametrize("case", ["3x3", "stem_7x7_rgb", "groups_4", "depthwise_x2", "multi_tile", "odd_channels"])
def test_wgrad_grid_writes_every_element_once_per_split(ext, case, tile, flat):
    g = conv_case(case)
    NPQ = g.N * g.P * g.Q
    for requested in (1, 3):
        rows, per_split = wgrad_grid_owners(g, *tile, ext.wgrad_split(NPQ, 1, 1, requested), flat)
        assert bool((rows == 1).all()), "every output pixel reduced by exactly one split"
        for gw, gb in per_split:
            assert bool((gw == 1).all()) and bool((gb == 1).all())


# ------------------------------------------------------------------------------------------
# CPU: models of the tensor-core fragment loads
# ------------------------------------------------------------------------------------------
# The PTX ISA's rules, written independently of the kernels:
#  * ldmatrix.x4: lane l supplies the address of row l % 8 of matrix l // 8 (8 rows of 16
#    bytes); register i of lane l receives from matrix i the two b16 elements (row l // 4,
#    columns 2*(l % 4), +1), or with .trans (rows 2*(l % 4), +1, column l // 4).
#  * mma.m16n8k16 (f16/bf16), g = lane // 4, t = lane % 4: A register i holds (row g + 8*(i % 2),
#    columns 2t + 8*(i // 2) + {0, 1}); B register i holds (rows 2t + 8*i + {0, 1}, column g).
#  * mma.m16n8k8 (tf32): A register i holds (row g + 8*(i % 2), column t + 4*(i // 2));
#    B register i holds (row t + 4*i, column g).
def ldmatrix_x4(mem, lane_addr, trans):
    """regs[lane][i] = (element, element) from `mem` (byte address -> label of the b16 there)."""
    addrs = [lane_addr(lane) for lane in range(32)]
    regs = [[None] * 4 for _ in range(32)]
    for i in range(4):
        mat = [[mem[addrs[8 * i + r] + 2 * col] for col in range(8)] for r in range(8)]
        for lane in range(32):
            q, t = lane // 4, lane % 4
            regs[lane][i] = (mat[2 * t][q], mat[2 * t + 1][q]) if trans else (mat[q][2 * t], mat[q][2 * t + 1])
    return regs, addrs


def assert_conflict_free(addrs):
    """Each 8-address phase of an ldmatrix (one matrix, 16 bytes a row) covers all 32 banks."""
    for i in range(4):
        banks = sorted((a // 4 + w) % 32 for a in addrs[8 * i:8 * i + 8] for w in range(4))
        assert banks == list(range(32)), f"bank conflict in matrix {i}"


def a_expected(lane, i, m_base, k_base):
    g, t = lane // 4, lane % 4
    m = m_base + g + 8 * (i % 2)
    k = k_base + 2 * t + 8 * (i // 2)
    return ((m, k), (m, k + 1))


def b_expected(lane, i, n_base, k_base):
    g, t = lane // 4, lane % 4
    k = k_base + 2 * t + 8 * i
    return ((k, n_base + g), (k + 1, n_base + g))


# dgrad (and fprop): tiles stored row-major with 64 bytes of reduction per row, rows padded to
# kRowStride = 80 bytes (conv_dgrad_kernel.cu); A rows = output pixels m, B rows = channels n.
ROW_STRIDE = 80


@pytest.mark.parametrize("tile", [(128, 128, 2, 4), (128, 64, 4, 2), (64, 64, 2, 4)])
def test_dgrad_fragment_loads_16bit(tile):
    BM, BN, WARPS_M, WARPS_N = tile
    WM, WN = BM // WARPS_M, BN // WARPS_N
    memA = {m * ROW_STRIDE + 2 * k: (m, k) for m in range(BM) for k in range(32)}
    memB = {n * ROW_STRIDE + 2 * k: (k, n) for n in range(BN) for k in range(32)}
    for warp in range(8):
        warp_m, warp_n = warp // WARPS_N, warp % WARPS_N
        for ks in range(2):
            for mt in range(WM // 16):
                regs, addrs = ldmatrix_x4(memA, lambda lane: (warp_m * WM + mt * 16 + (lane & 15)) * ROW_STRIDE
                                          + ks * 32 + (lane >> 4) * 16, trans=False)
                assert_conflict_free(addrs)
                for lane in range(32):
                    for i in range(4):
                        assert regs[lane][i] == a_expected(lane, i, warp_m * WM + mt * 16, ks * 16)
            for np_ in range(WN // 16):
                regs, addrs = ldmatrix_x4(memB, lambda lane: (warp_n * WN + np_ * 16 + (lane & 7) + ((lane >> 4) << 3))
                                          * ROW_STRIDE + ks * 32 + ((lane >> 3) & 1) * 16, trans=False)
                assert_conflict_free(addrs)
                n0 = warp_n * WN + np_ * 16
                for lane in range(32):  # bf[2np] = r4[0:2], bf[2np+1] = r4[2:4]
                    assert regs[lane][0] == b_expected(lane, 0, n0, ks * 16)
                    assert regs[lane][1] == b_expected(lane, 1, n0, ks * 16)
                    assert regs[lane][2] == b_expected(lane, 0, n0 + 8, ks * 16)
                    assert regs[lane][3] == b_expected(lane, 1, n0 + 8, ks * 16)


def test_dgrad_fragment_loads_tf32():
    """fp32 tiles through ldmatrix: each b16 pair a lane receives is one whole fp32 element,
    at the m16n8k8 TF32 fragment position."""
    BM = 64
    memA = {}
    for m in range(BM):
        for k in range(16):
            memA[m * ROW_STRIDE + 4 * k] = (m, k, "lo")
            memA[m * ROW_STRIDE + 4 * k + 2] = (m, k, "hi")
    for ks in range(2):
        regs, _ = ldmatrix_x4(memA, lambda lane: (lane & 15) * ROW_STRIDE + ks * 32 + (lane >> 4) * 16, trans=False)
        for lane in range(32):
            g, t = lane // 4, lane % 4
            for i in range(4):
                m, k = g + 8 * (i % 2), ks * 8 + t + 4 * (i // 2)
                assert regs[lane][i] == ((m, k, "lo"), (m, k, "hi"))


def wgrad_row_bytes(cols, elem):
    """Row stride of the wgrad tiles (conv_wgrad_kernel.cu, WgradSmem): (cols + 8) elements."""
    return (cols + 8) * elem


@pytest.mark.parametrize("tile", [(128, 128, 2, 4), (128, 64, 4, 2), (64, 64, 2, 4)])
def test_wgrad_fragment_loads_16bit_transposed(tile):
    """wgrad stores both operands reduction-major ([npq][m], [npq][n], channels contiguous);
    ldmatrix.trans with the kernel's lane addresses yields the row-major A and "col" B
    fragments, conflict-free."""
    BM, BN, WARPS_M, WARPS_N = tile
    WM, WN = BM // WARPS_M, BN // WARPS_N
    lda, ldb = wgrad_row_bytes(BM, 2), wgrad_row_bytes(BN, 2)
    memA = {kk * lda + 2 * m: (m, kk) for kk in range(32) for m in range(BM)}
    memB = {kk * ldb + 2 * n: (kk, n) for kk in range(32) for n in range(BN)}
    for warp in range(8):
        warp_m, warp_n = warp // WARPS_N, warp % WARPS_N
        for ks in range(2):
            for mt in range(WM // 16):
                regs, addrs = ldmatrix_x4(memA, lambda lane: (ks * 16 + (lane & 7) + ((lane >> 4) << 3)) * lda
                                          + (warp_m * WM + mt * 16 + ((lane >> 3) & 1) * 8) * 2, trans=True)
                assert_conflict_free(addrs)
                for lane in range(32):
                    for i in range(4):
                        assert regs[lane][i] == a_expected(lane, i, warp_m * WM + mt * 16, ks * 16)
            for np_ in range(WN // 16):
                regs, addrs = ldmatrix_x4(memB, lambda lane: (ks * 16 + (lane & 7) + (((lane >> 3) & 1) << 3)) * ldb
                                          + (warp_n * WN + np_ * 16 + ((lane >> 4) << 3)) * 2, trans=True)
                assert_conflict_free(addrs)
                n0 = warp_n * WN + np_ * 16
                for lane in range(32):
                    assert regs[lane][0] == b_expected(lane, 0, n0, ks * 16)
                    assert regs[lane][1] == b_expected(lane, 1, n0, ks * 16)
                    assert regs[lane][2] == b_expected(lane, 0, n0 + 8, ks * 16)
                    assert regs[lane][3] == b_expected(lane, 1, n0 + 8, ks * 16)


@pytest.mark.parametrize("cols", [64, 128])
def test_wgrad_tf32_scalar_fragment_loads(cols):
    """TF32 wgrad reads fragments element by element from [npq][cols] fp32 tiles: A (m, k) at
    [k][m]; the 32 lanes of one load hit 32 distinct banks."""
    ld = wgrad_row_bytes(cols, 4) // 4
    for ks in range(4):
        for e in range(4):  # af[mt][e] = as[(kr + 4*(e // 2)) * ALD + m + 8*(e % 2)]
            words = []
            for lane in range(32):
                g, t = lane // 4, lane % 4
                kr, m = ks * 8 + t + 4 * (e // 2), g + 8 * (e % 2)
                assert (m, kr) == (g + 8 * (e % 2), ks * 8 + t + 4 * (e // 2))  # m16n8k8 A register e
                words.append(kr * ld + m)
            assert len({w % 32 for w in words}) == 32


# ------------------------------------------------------------------------------------------
# CPU: registration, fake (meta) implementations
# ------------------------------------------------------------------------------------------
def meta(*shape, dtype=torch.float16, fmt=torch.contiguous_format):
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt)


def test_ops_registered(ext):
    for name in ("cuda_conv2d_dgrad", "cuda_conv2d_wgrad"):
        assert name in cuda_ops.CONV_BACKWARD_OPS
        schema = getattr(torch.ops.resconv, name).default._schema
        assert schema.name == f"resconv::{name}"
        assert not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
    split = [a for a in torch.ops.resconv.cuda_conv2d_wgrad.default._schema.arguments if a.name == "split_k"][0]
    assert split.default_value == 0


FAKE_GEOMS = ["3x3", "stem_7x7_rgb", "same_even_4x4", "dilation_2x3", "groups_4", "depthwise_x2", "empty_batch"]


@pytest.mark.parametrize("case", FAKE_GEOMS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fake_shapes_strides_dtypes(ext, case, channels_last, dtype):
    g = conv_case(case)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    geo = (list(g.stride), list(g.padding), list(g.dilation), g.groups)
    grad = meta(*g.out_shape, dtype=dtype, fmt=fmt)
    w = meta(g.K, g.C // g.groups, g.R, g.S, dtype=dtype)
    x = meta(g.N, g.C, g.H, g.W, dtype=dtype, fmt=fmt)
    k = torch.empty(g.K, device="meta")
    for pro in [(None,) * 6, (grad, grad, k, k, k, k)]:
        dx = torch.ops.resconv.cuda_conv2d_dgrad(grad, w, *pro, [g.N, g.C, g.H, g.W], *geo, channels_last, False)
        assert dx.shape == (g.N, g.C, g.H, g.W) and dx.dtype == dtype and dx.device.type == "meta"
        assert dx.is_contiguous(memory_format=fmt)
        assert dx.stride() == torch.empty(dx.shape, memory_format=fmt).stride()
        for need_bias in (False, True):
            gw, gb = torch.ops.resconv.cuda_conv2d_wgrad(grad, x, *pro, [g.K, g.C // g.groups, g.R, g.S], *geo,
                                                         need_bias, channels_last, False)
            assert gw.shape == (g.K, g.C // g.groups, g.R, g.S) and gw.dtype == dtype
            assert gw.stride() == torch.empty(gw.shape, memory_format=fmt).stride()
            assert gb.shape == ((g.K,) if need_bias else (0,)) and gb.dtype == dtype


def _opcheck_args(prologue, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    grad = meta(2, 16, 6, 5, fmt=fmt)
    w = meta(16, 8, 3, 3)
    x = meta(2, 8, 6, 5, fmt=fmt)
    k = torch.empty(16, device="meta")
    pro = (grad, grad, k, k, k, k) if prologue else (None,) * 6
    geo = ([1, 1], [1, 1, 1, 1], [1, 1], 1)
    return ((grad, w, *pro, [2, 8, 6, 5], *geo, channels_last, False),
            (grad, x, *pro, [16, 8, 3, 3], *geo, True, channels_last, False, 0))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("prologue", [False, True])
def test_opcheck_meta(ext, prologue, channels_last):
    dgrad_args, wgrad_args = _opcheck_args(prologue, channels_last)
    torch.library.opcheck(torch.ops.resconv.cuda_conv2d_dgrad.default, dgrad_args)
    torch.library.opcheck(torch.ops.resconv.cuda_conv2d_wgrad.default, wgrad_args)


# ------------------------------------------------------------------------------------------
# CPU: argument validation in the C++ launchers (the CPU registration checks, then refuses)
# ------------------------------------------------------------------------------------------
def _dgrad(**over):
    a = dict(grad=torch.randn(2, 16, 6, 6), w=torch.randn(16, 8, 3, 3), relu_out=None, y=None, a=None, b=None, c=None,
             mean=None, input_size=[2, 8, 6, 6], stride=[1, 1], padding=[1, 1, 1, 1], dilation=[1, 1], groups=1)
    a.update(over)
    return (a["grad"], a["w"], a["relu_out"], a["y"], a["a"], a["b"], a["c"], a["mean"], a["input_size"],
            a["stride"], a["padding"], a["dilation"], a["groups"], False, False)


def _wgrad(**over):
    a = dict(grad=torch.randn(2, 16, 6, 6), x=torch.randn(2, 8, 6, 6), relu_out=None, y=None, a=None, b=None, c=None,
             mean=None, weight_size=[16, 8, 3, 3], stride=[1, 1], padding=[1, 1, 1, 1], dilation=[1, 1], groups=1,
             split_k=0)
    a.update(over)
    return (a["grad"], a["x"], a["relu_out"], a["y"], a["a"], a["b"], a["c"], a["mean"], a["weight_size"],
            a["stride"], a["padding"], a["dilation"], a["groups"], True, False, False, a["split_k"])


K16 = torch.ones(16)
VALIDATION = [
    ("dgrad_grad_shape", "cuda_conv2d_dgrad", lambda: _dgrad(grad=torch.randn(2, 16, 5, 6)), ValueError,
     r"grad: expected the conv output's shape \[2, 16, 6, 6\], got \[2, 16, 5, 6\]"),
    ("dgrad_grad_int", "cuda_conv2d_dgrad", lambda: _dgrad(grad=torch.ones(2, 16, 6, 6, dtype=torch.int32)),
     TypeError, "grad: expected dtype float16, bfloat16 or float32, got Int"),
    ("dgrad_weight_dtype", "cuda_conv2d_dgrad", lambda: _dgrad(w=torch.randn(16, 8, 3, 3).half()), TypeError,
     r"weight: expected dtype Float \(the dtype of grad\), got Half"),
    ("dgrad_weight_rank", "cuda_conv2d_dgrad", lambda: _dgrad(w=torch.randn(16, 8, 3)), ValueError,
     r"weight: expected a 4-D tensor \[K, C/groups, R, S\]"),
    ("dgrad_input_size_len", "cuda_conv2d_dgrad", lambda: _dgrad(input_size=[2, 8, 6]), ValueError,
     r"input_size: expected four non-negative sizes \[N, C, H, W\]"),
    ("dgrad_channels", "cuda_conv2d_dgrad", lambda: _dgrad(input_size=[2, 4, 6, 6]), ValueError,
     r"weight: expected shape\[1\] == C / groups = 4"),
    ("dgrad_groups", "cuda_conv2d_dgrad", lambda: _dgrad(groups=0), ValueError, r"groups: expected an int in"),
    ("dgrad_stride", "cuda_conv2d_dgrad", lambda: _dgrad(stride=[0, 1]), ValueError, "stride: expected two positive"),
    ("dgrad_padding", "cuda_conv2d_dgrad", lambda: _dgrad(padding=[1, 1]), ValueError,
     r"padding: expected four non-negative ints \(top, bottom, left, right\)"),
    ("dgrad_kernel_too_big", "cuda_conv2d_dgrad", lambda: _dgrad(w=torch.randn(16, 8, 9, 9)), ValueError,
     r"input_size: padded input size \(8 x 8\) is smaller than the dilated kernel \(9 x 9\)"),
    ("dgrad_phases", "cuda_conv2d_dgrad",
     lambda: _dgrad(grad=torch.randn(2, 16, 1, 1), stride=[300, 300]), ValueError, "at most 65535 stride phases"),
    ("dgrad_mask_without_a", "cuda_conv2d_dgrad", lambda: _dgrad(relu_out=torch.randn(2, 16, 6, 6)), ValueError,
     "a: required when relu_out or y is given"),
    ("dgrad_y_without_b", "cuda_conv2d_dgrad", lambda: _dgrad(y=torch.randn(2, 16, 6, 6), a=K16), ValueError,
     "b, c, mean: required when y is given"),
    ("dgrad_relu_out_shape", "cuda_conv2d_dgrad", lambda: _dgrad(relu_out=torch.randn(2, 16, 6, 5), a=K16),
     ValueError, r"relu_out: expected the shape of grad"),
    ("dgrad_y_dtype", "cuda_conv2d_dgrad",
     lambda: _dgrad(y=torch.randn(2, 16, 6, 6).half(), a=K16, b=K16, c=K16, mean=K16), TypeError,
     r"y: expected dtype Float \(the dtype of grad\), got Half"),
    ("dgrad_a_shape", "cuda_conv2d_dgrad", lambda: _dgrad(a=torch.ones(8)), ValueError, r"a: expected shape \[16\]"),
    ("dgrad_mean_dtype", "cuda_conv2d_dgrad",
     lambda: _dgrad(y=torch.randn(2, 16, 6, 6), a=K16, b=K16, c=K16, mean=torch.ones(16, dtype=torch.int64)),
     TypeError, "mean: expected a floating dtype"),
    ("dgrad_on_cpu", "cuda_conv2d_dgrad", lambda: _dgrad(), RuntimeError,
     "grad: expected a CUDA tensor, got a tensor on cpu"),
    ("dgrad_prologue_on_cpu", "cuda_conv2d_dgrad",
     lambda: _dgrad(relu_out=torch.randn(2, 16, 6, 6), y=torch.randn(2, 16, 6, 6), a=K16, b=K16, c=K16, mean=K16),
     RuntimeError, "grad: expected a CUDA tensor"),
    ("wgrad_split_k", "cuda_conv2d_wgrad", lambda: _wgrad(split_k=-1), ValueError,
     r"split_k: expected 0 \(automatic\) or a positive number of splits"),
    ("wgrad_input_dtype", "cuda_conv2d_wgrad", lambda: _wgrad(x=torch.randn(2, 8, 6, 6).half()), TypeError,
     r"input: expected dtype Float \(the dtype of grad\), got Half"),
    ("wgrad_weight_size", "cuda_conv2d_wgrad", lambda: _wgrad(weight_size=[16, 4, 3, 3]), ValueError,
     r"weight_size: expected shape\[1\] == C / groups = 8"),
    ("wgrad_weight_size_len", "cuda_conv2d_wgrad", lambda: _wgrad(weight_size=[16, 8, 3]), ValueError,
     r"weight_size: expected four non-negative sizes \[K, C/groups, R, S\]"),
    ("wgrad_k_mismatch", "cuda_conv2d_wgrad", lambda: _wgrad(weight_size=[24, 8, 3, 3]), ValueError,
     r"grad: expected the conv output's shape \[2, 24, 6, 6\]"),
    ("wgrad_groups_k", "cuda_conv2d_wgrad", lambda: _wgrad(weight_size=[18, 2, 3, 3], groups=4), ValueError,
     r"weight_size: expected K = shape\[0\] >= 1 divisible by groups = 4, got 18"),
    ("wgrad_dilation", "cuda_conv2d_wgrad", lambda: _wgrad(dilation=[1, 0]), ValueError,
     "dilation: expected two positive"),
    ("wgrad_c_vector", "cuda_conv2d_wgrad",
     lambda: _wgrad(y=torch.randn(2, 16, 6, 6), a=K16, b=K16, c=torch.ones(16, 1), mean=K16), ValueError,
     r"c: expected shape \[16\]"),
    ("wgrad_on_cpu", "cuda_conv2d_wgrad", lambda: _wgrad(), RuntimeError, "grad: expected a CUDA tensor"),
]


@pytest.mark.parametrize("case", VALIDATION, ids=lambda c: c[0])
def test_cpp_argument_validation(ext, case):
    _, name, make_args, exc, message = case
    with pytest.raises(exc, match=message) as info:
        getattr(torch.ops.resconv, name)(*make_args())
    assert f"resconv::{name}" in str(info.value)


def test_conv2d_backward_cuda_impl_refuses_cpu_tensors(ext):
    x, w = torch.randn(2, 8, 6, 6), torch.randn(16, 8, 3, 3)
    dy = torch.randn(2, 16, 6, 6)
    with pytest.raises(RuntimeError, match="cuda_conv2d_dgrad: grad: expected a CUDA tensor"):
        conv2d_backward(dy, x, w, (1, 1), (1, 1, 1, 1), (1, 1), 1, True, True, True, impl="cuda")
    with pytest.raises(RuntimeError, match="cuda_conv2d_wgrad: grad: expected a CUDA tensor"):
        conv2d_backward(dy, x, w, (1, 1), (1, 1, 1, 1), (1, 1), 1, False, True, True, impl="cuda")


# ------------------------------------------------------------------------------------------
# CPU: the switch RESCONV_CUDA_CONV_BACKWARD
# ------------------------------------------------------------------------------------------
def test_switch_default_is_aten(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert cuda_extension.CONV_BACKWARD_DEFAULT == "aten"
    assert cuda_extension.conv_backward_impl() == "aten"
    assert not cuda_ops.CudaKernels().fused_conv_backward
    monkeypatch.setenv(ENV, "")
    assert cuda_extension.conv_backward_impl() == "aten"


@pytest.mark.parametrize("value,expected", [("cuda", "cuda"), (" CUDA ", "cuda"), ("aten", "aten"), ("ATen", "aten")])
def test_switch_values(monkeypatch, value, expected):
    monkeypatch.setenv(ENV, value)
    assert cuda_extension.conv_backward_impl() == expected
    assert cuda_ops.CudaKernels().fused_conv_backward == (expected == "cuda")


@pytest.mark.parametrize("value", ["cudnn", "triton", "1"])
def test_switch_rejects_unknown_values(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ValueError, match=f"{ENV}: expected one of \\('aten', 'cuda'\\), got '{value}'"):
        cuda_extension.conv_backward_impl()


def test_switch_is_read_once_and_settable(monkeypatch):
    monkeypatch.setenv(ENV, "cuda")
    k = cuda_ops.CudaKernels()
    assert k.fused_conv_backward
    monkeypatch.setenv(ENV, "aten")  # read once: the kernels keep their choice
    assert k.fused_conv_backward
    k.fused_conv_backward = False
    assert not k.fused_conv_backward


@pytest.fixture
def spy_conv_backward(monkeypatch):
    """Records (impl, prologue, need flags) of every conv backward of the cuda backend: "cuda"
    (its own dgrad/wgrad, the prologue fused) or "aten" (ATen's, on a materialised dy)."""
    calls = []
    k = cuda_ops.KERNELS
    own, aten = k.own_conv_backward, _shared.aten_conv2d_backward

    def spy_own(dy, x, weight, geom, nx, nw, nb, allow_tf32, prologue):
        calls.append(dict(impl="cuda", prologue=prologue, dy=dy, needs=(nx, nw, nb), allow_tf32=allow_tf32))
        return own(dy, x, weight, geom, nx, nw, nb, allow_tf32, prologue)

    def spy_aten(dy, x, weight, stride, padding, dilation, groups, nx, nw, nb, *, prologue=None):
        calls.append(dict(impl="aten", prologue=prologue, dy=dy, needs=(nx, nw, nb), allow_tf32=None))
        return aten(dy, x, weight, stride, padding, dilation, groups, nx, nw, nb, prologue=prologue)

    monkeypatch.setattr(k, "own_conv_backward", spy_own)
    monkeypatch.setattr(_shared, "aten_conv2d_backward", spy_aten)
    return calls


def _use_impl(monkeypatch, impl):
    monkeypatch.setattr(cuda_ops.KERNELS, "fused_conv_backward", impl == "cuda")


def _meta_leaf(*shape, dtype=torch.float16, fmt=torch.contiguous_format):
    return meta(*shape, dtype=dtype, fmt=fmt).requires_grad_()


@pytest.mark.parametrize("impl", ["aten", "cuda"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_switch_routes_training_backward(ext, monkeypatch, spy_conv_backward, impl, residual, relu):
    """cuda_conv2d_bn_train's backward on meta tensors: "cuda" hands the unmaterialised
    gradient and the dReLU/dBN prologue to the CUDA dgrad/wgrad; "aten" a materialised dy."""
    _use_impl(monkeypatch, impl)
    x = _meta_leaf(2, 8, 6, 5, fmt=torch.channels_last)
    w = _meta_leaf(16, 8, 3, 3)
    bias, gamma, beta = _meta_leaf(16), _meta_leaf(16, dtype=torch.float32), _meta_leaf(16, dtype=torch.float32)
    res = _meta_leaf(2, 16, 6, 5, fmt=torch.channels_last) if residual else None
    out = torch.ops.resconv.cuda_conv2d_bn_train(x, w, bias, gamma, beta, res, [1, 1], [1, 1, 1, 1], [1, 1], 1,
                                                 1e-5, relu, True, True)[0]
    out.backward(torch.empty_like(out))
    (call,) = spy_conv_backward
    assert call["impl"] == impl and call["needs"] == (True, True, True)
    if impl == "cuda":
        pro = call["prologue"]
        assert pro is not None and pro.y is not None and pro.b is not None and pro.mean is not None
        # The ReLU mask is applied in the prologue unless g is written anyway (residual).
        assert (pro.relu_out is not None) == (relu and not residual)
        assert call["allow_tf32"] is True
    else:
        assert call["prologue"] is None
    for t, shape in ((x, x.shape), (w, w.shape), (bias, (16,)), (gamma, (16,)), (beta, (16,))):
        assert t.grad is not None and t.grad.shape == shape
    assert x.grad.dtype == torch.float16 and x.grad.is_contiguous(memory_format=torch.channels_last)
    if residual:
        assert res.grad is not None and res.grad.shape == res.shape


@pytest.mark.parametrize("impl", ["aten", "cuda"])
@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_switch_routes_eval_backward(ext, monkeypatch, spy_conv_backward, impl, scale, relu):
    _use_impl(monkeypatch, impl)
    x = _meta_leaf(2, 8, 6, 5)
    w = _meta_leaf(16, 8, 3, 3)
    sc = _meta_leaf(16, dtype=torch.float32) if scale else None
    sh = _meta_leaf(16, dtype=torch.float32)
    res = _meta_leaf(2, 16, 6, 5)
    out = torch.ops.resconv.cuda_conv2d_fprop(x, w, sc, sh, res, [1, 1], [1, 1, 1, 1], [1, 1], 1, relu, False, False)
    out.backward(torch.empty_like(out))
    (call,) = spy_conv_backward
    assert call["impl"] == impl
    if impl == "cuda":
        pro = call["prologue"]
        assert (pro is not None) == scale  # with a residual, g is written and is the source
        assert pro is None or (pro.relu_out is None and pro.y is None)
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and res.grad.shape == res.shape
    assert sh.grad.shape == (16,) and (not scale or sc.grad.shape == (16,))


def test_switch_is_read_at_backward_time(ext, monkeypatch, spy_conv_backward):
    _use_impl(monkeypatch, "aten")
    x, w = _meta_leaf(2, 8, 6, 5), _meta_leaf(16, 8, 3, 3)
    out = torch.ops.resconv.cuda_conv2d_fprop(x, w, None, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, True, False,
                                              False)
    _use_impl(monkeypatch, "cuda")
    out.backward(torch.empty_like(out))
    assert [c["impl"] for c in spy_conv_backward] == ["cuda"]


def test_switch_error_surfaces_in_backward(ext, monkeypatch):
    monkeypatch.setenv(ENV, "bogus")
    monkeypatch.setattr(cuda_ops.KERNELS, "_fused", None)  # not resolved yet
    x, w = _meta_leaf(2, 8, 6, 5), _meta_leaf(16, 8, 3, 3)
    out = torch.ops.resconv.cuda_conv2d_fprop(x, w, None, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, True, False,
                                              False)
    with pytest.raises(ValueError, match=ENV):
        out.backward(torch.empty_like(out))


# ------------------------------------------------------------------------------------------
# GPU: the kernels against float64 references
# ------------------------------------------------------------------------------------------
PRECISIONS = [  # (key, dtype, allow_tf32)
    ("float32", torch.float32, False),
    ("tf32", torch.float32, True),
    ("float16", torch.float16, False),
    ("bfloat16", torch.bfloat16, False),
]
GPU_CASES = [n for n in CONV_CASES if CONV_CASES[n].get("padding_mode", "zeros") == "zeros"]
FORCED = ["simt", "tc64x64", "tc128x64", "tc128x128"]


def _rand(shape, dtype, fmt, dev, offset=0.0):
    if fmt == "strided":
        wide = torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.float64) + offset
        return wide.to(dtype).to(dev)[..., ::2]
    t = (torch.randn(shape, dtype=torch.float64) + offset).to(dtype).to(dev)
    return t.contiguous(memory_format=torch.channels_last) if fmt == "nhwc" else t


def _problem(g, dtype, fmt, dev):
    x = _rand((g.N, g.C, g.H, g.W), dtype, fmt, dev)
    w = _rand((g.K, g.C // g.groups, g.R, g.S), dtype, "nchw", dev)
    dy = _rand(g.out_shape, dtype, "nchw" if fmt == "strided" else fmt, dev)
    return x, w, dy


def _run(dy, x, w, g, tf32, prologue=None, need=(True, True, True)):
    return conv2d_backward(dy, x, w, g.stride, g.padding, g.dilation, g.groups, *need, impl="cuda",
                              allow_tf32=tf32, prologue=prologue)


@pytest.fixture
def ieee_fp32(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("fmt", ["nchw", "nhwc", "strided"])
@pytest.mark.parametrize("prec", PRECISIONS, ids=[p[0] for p in PRECISIONS])
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_dgrad_wgrad_match_float64(gpu, case, prec, fmt):
    key, dtype, tf32 = prec
    g = conv_case(case)
    x, w, dy = _problem(g, dtype, fmt, gpu)
    gx, gw, gb = _run(dy, x, w, g, tf32)
    rx, rw, rb = reference_grads(dy, x, w, g)
    assert_close(f"{case} dgrad", gx, rx, key)
    assert_close(f"{case} wgrad", gw, rw, key)
    assert_close(f"{case} bias grad", gb, rb, key)
    assert gx.dtype == gw.dtype == gb.dtype == dtype
    assert gx.is_contiguous(memory_format=A.memory_format_of(x))


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("prec", PRECISIONS, ids=[p[0] for p in PRECISIONS])
@pytest.mark.parametrize("kernel", FORCED)
@pytest.mark.parametrize("case", ["3x3", "stem_7x7_rgb", "multi_tile", "stride_2x1_pad_1x2", "groups_4",
                                  "same_dilated", "odd_channels"])
def test_gpu_every_kernel(gpu, monkeypatch, case, kernel, prec, fmt):
    """Each kernel and tile forced where the call allows it (tensor cores: not IEEE fp32, not
    channel counts off the vector width), with and without the prologue."""
    monkeypatch.setenv("RESCONV_CUDA_CONV_KERNEL", kernel)
    key, dtype, tf32 = prec
    g = conv_case(case)
    x, w, dy = _problem(g, dtype, fmt, gpu)
    rx, rw, rb = reference_grads(dy, x, w, g)
    for r, got in zip((rx, rw, rb), _run(dy, x, w, g, tf32)):
        assert_close(f"{case} {kernel}", got, r, key)
    pro = make_prologue(g.K, dy, relu=True, bn=True)
    rx, rw, rb = reference_grads(fused_dy_float64(dy, pro), x, w, g)
    for r, got in zip((rx, rw, rb), _run(dy, x, w, g, tf32, pro)):
        assert_close(f"{case} {kernel} fused", got, r, key, scale=2.0)


def make_prologue(K, g, relu, bn):
    """Random coefficients; relu_out (about half the positions masked) and y in g's layout."""
    dev = g.device
    vec = lambda lo, hi: torch.empty(K, dtype=torch.float32).uniform_(lo, hi).to(dev)  # noqa: E731
    fmt = "nhwc" if A.is_channels_last(g) else "nchw"
    relu_out = torch.relu(_rand(g.shape, g.dtype, fmt, dev)) if relu else None
    if not bn:
        return DyPrologue(vec(0.5, 1.5), relu_out)
    y = _rand(g.shape, g.dtype, fmt, dev, offset=3.0)
    mean = y.double().mean((0, 2, 3)).float() + 0.1
    return DyPrologue(vec(0.5, 1.5), relu_out, y, vec(-0.5, 0.5), vec(-0.5, 0.5), mean)


def fused_dy_float64(g, p):
    col = lambda v: v.double().cpu().view(1, -1, 1, 1)  # noqa: E731
    g = g.double().cpu()
    if p.relu_out is not None:
        g = torch.where(p.relu_out.cpu() > 0, g, 0.0)
    dy = g * col(p.a)
    if p.y is not None:
        dy = dy + col(p.b) * (p.y.double().cpu() - col(p.mean)) + col(p.c)
    return dy


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("variant", ["relu+bn", "bn", "relu", "scale"])
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("prec", PRECISIONS, ids=[p[0] for p in PRECISIONS])
@pytest.mark.parametrize("case", ["3x3", "1x1_stride2", "stem_7x7_rgb", "same_even_4x4", "dilation_2x3",
                                  "depthwise", "multi_tile"])
def test_gpu_fused_prologue(gpu, case, prec, fmt, variant):
    """Fused == float64 autograd on the float64 formula, and == the same kernels on the
    materialised dy (they differ only in fp32 operation order before one rounding).
    Padding taps must contribute 0, not c[k]."""
    key, dtype, tf32 = prec
    g = conv_case(case)
    x, w, grad = _problem(g, dtype, fmt, gpu)
    pro = make_prologue(g.K, grad, relu="relu" in variant, bn="bn" in variant)
    fused = _run(grad, x, w, g, tf32, pro)
    unfused = _run(pro.materialize(grad, dtype), x, w, g, tf32)
    refs = reference_grads(fused_dy_float64(grad, pro), x, w, g)
    for what, f, u, r in zip(("dgrad", "wgrad", "bias grad"), fused, unfused, refs):
        assert_close(f"{case} {what} fused vs unfused", f, u.double(), key)
        assert_close(f"{case} {what} fused vs float64", f, r, key, scale=2.0)


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("kernel", ["auto", "simt"])
@pytest.mark.parametrize("prec", PRECISIONS, ids=[p[0] for p in PRECISIONS])
def test_gpu_split_k_bitwise_reproducible(gpu, monkeypatch, prec, kernel):
    """Every split count (one, several, the automatic choice) matches the reference and gives
    the same bits on every run: fixed-order second pass, no atomics."""
    monkeypatch.setenv("RESCONV_CUDA_CONV_KERNEL", kernel)
    key, dtype, tf32 = prec
    g = _geometry_from((8, 32, 20, 20, 48, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1))  # N*P*Q = 3200
    x, w, grad = _problem(g, dtype, "nhwc", gpu)
    pro = make_prologue(g.K, grad, relu=True, bn=True)
    _, rw, rb = reference_grads(fused_dy_float64(grad, pro), x, w, g)
    o = cuda_ops.ops()
    for split in (0, 1, 2, 5, 100):
        runs = [o.cuda_conv2d_wgrad(grad, x, pro.relu_out, pro.y, pro.a, pro.b, pro.c, pro.mean, list(w.shape),
                                    list(g.stride), list(g.padding), list(g.dilation), g.groups, True, False, tf32,
                                    split) for _ in range(3)]
        assert_close(f"wgrad split {split}", runs[0][0], rw, key, scale=2.0)
        assert_close(f"bias grad split {split}", runs[0][1], rb, key, scale=2.0)
        for gw_, gb_ in runs[1:]:
            assert torch.equal(gw_, runs[0][0]) and torch.equal(gb_, runs[0][1]), f"split {split} not reproducible"


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("prec", PRECISIONS, ids=[p[0] for p in PRECISIONS])
def test_gpu_dgrad_bitwise_reproducible(gpu, prec):
    key, dtype, tf32 = prec
    g = conv_case("multi_tile")
    x, w, grad = _problem(g, dtype, "nhwc", gpu)
    pro = make_prologue(g.K, grad, relu=True, bn=True)
    first = _run(grad, x, w, g, tf32, pro)
    for _ in range(2):
        again = _run(grad, x, w, g, tf32, pro)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.cuda_ext
def test_gpu_empty_batch(gpu):
    g = conv_case("3x3")
    x, w, grad = _problem(g, torch.float16, "nhwc", gpu)
    x, grad = x[:0], grad[:0]
    gx, gw, gb = _run(grad, x, w, g, False)
    assert gx.shape == x.shape and gx.numel() == 0
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros(g.K, dtype=gb.dtype, device=gpu))


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_misaligned_operands(gpu, dtype):
    """Views one element into their storage (not 16-byte aligned): the launcher copies them for
    the tensor-core path; results unchanged."""
    g = conv_case("multi_tile")
    x, w, grad = _problem(g, dtype, "nhwc", gpu)

    def shifted(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        v = buf[1:].view(t.permute(0, 2, 3, 1).shape).permute(0, 3, 1, 2) if A.is_channels_last(t) else \
            buf[1:].view(t.shape)
        v.copy_(t)
        return v

    ref = _run(grad, x, w, g, True)
    got = _run(shifted(grad), shifted(x), w, g, True)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("prec", [PRECISIONS[0], PRECISIONS[2]], ids=["float32", "float16"])
def test_gpu_training_backward_with_switch(gpu, monkeypatch, ieee_fp32, prec, relu, residual):
    """The cuda backend's training op with RESCONV_CUDA_CONV_BACKWARD=cuda: every gradient
    against the "aten" route (same forward, so the same ReLU mask) and, in IEEE fp32, against
    the float64 reference (torch.nn semantics)."""
    from resconv import reference

    key, dtype, _ = prec
    g = conv_case("multi_tile")
    grads = {}
    x0, w0, _ = _problem(g, dtype, "nhwc", gpu)
    bias0 = torch.randn(g.K, device=gpu).to(dtype)
    gamma0, beta0 = torch.rand(g.K, device=gpu) + 0.5, torch.randn(g.K, device=gpu)
    res0 = _rand(g.out_shape, dtype, "nhwc", gpu) if residual else None
    gout = _rand(g.out_shape, dtype, "nhwc", gpu)
    for impl in ("aten", "cuda"):
        monkeypatch.setenv(ENV, impl)
        leaves = [t.detach().clone().requires_grad_() if t is not None else None
                  for t in (x0, w0, bias0, gamma0, beta0, res0)]
        out = torch.ops.resconv.cuda_conv2d_bn_train(*leaves, list(g.stride), list(g.padding), list(g.dilation),
                                                     g.groups, 1e-5, relu, False, True)[0]
        out.backward(gout)
        grads[impl] = [None if t is None else t.grad for t in leaves]
    l64 = [None if t is None else t.detach().double().cpu().requires_grad_() for t in (x0, w0, bias0, gamma0, beta0,
                                                                                        res0)]
    ref = reference.conv_bn2d_train(l64[0], l64[1], l64[2], l64[3], l64[4], None, None, 0.1, 1e-5, l64[5],
                                    g.stride, g.padding, g.dilation, g.groups, relu)
    ref.backward(gout.double().cpu())
    names = ("x", "w", "bias", "gamma", "beta", "residual")
    for i, name in enumerate(names):
        if l64[i] is None:
            continue
        if dtype == torch.float32:
            assert_close(f"train grad {name} (cuda)", grads["cuda"][i], l64[i].grad, key, scale=2.0)
        assert_close(f"train grad {name} cuda vs aten", grads["cuda"][i], grads["aten"][i].double(), key, scale=2.0)


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.parametrize("prologue", [False, True])
def test_gpu_opcheck(gpu, prologue):
    def to_gpu(a):
        if not isinstance(a, torch.Tensor):
            return a
        t = torch.randn(a.shape, dtype=a.dtype).to(gpu)
        return t.contiguous(memory_format=torch.channels_last) if a.dim() == 4 and a.stride(1) == 1 else t

    for args, op in zip(_opcheck_args(prologue, True), ("cuda_conv2d_dgrad", "cuda_conv2d_wgrad")):
        torch.library.opcheck(getattr(torch.ops.resconv, op).default, tuple(to_gpu(a) for a in args))


@pytest.mark.gpu
@pytest.mark.cuda_ext
@pytest.mark.slow
def test_gpu_offsets_beyond_2_31_elements(gpu):
    """dy, x and dx of more than 2^31 elements (64-bit offsets): the last images' dx against
    autograd on those images alone, dW against ATen's (cuDNN's) wgrad."""
    N, C, H, W, K = 8200, 64, 64, 64, 64  # 2.15e9 elements per tensor, fp16: 4.3 GB each
    g = _geometry_from((N, C, H, W, K, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1))
    x = torch.randn(N, C, H, W, device=gpu, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(K, C, 3, 3, device=gpu) / 24).half()
    grad = torch.randn(g.out_shape, device=gpu, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    assert grad.numel() > 2**31
    gx, gw, _ = _run(grad, x, w, g, False, need=(True, True, False))
    tail = slice(N - 2, N)
    g2 = _geometry_from((2, C, H, W, K, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1))
    rx, _, _ = reference_grads(grad[tail], x[tail], w, g2)
    assert_close("dgrad of the last images", gx[tail], rx, "float16")
    _, aw, _ = conv2d_backward(grad, x, w, g.stride, g.padding, g.dilation, 1, False, True, False, impl="aten")
    assert_close("wgrad vs ATen", gw, aw.double(), "float16", scale=2.0)
