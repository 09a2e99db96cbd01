"""The division-free walks of the hand-written tensor-core kernels' main loops (csrc/conv_walk.h,
the very C++ the kernels include, through resconv._C), against the division-based decode they
replace: fprop's reduction (r, s, c) with its input offset, dgrad's (tap, tap, channel block)
of a stride phase, wgrad's output pixels (n, p, q). Every walk starts with one decode and then
only adds and compares; these tests run it over many sizes and steps, past the end."""
from __future__ import annotations

import itertools

import pytest



def test_tap_walk_matches_the_decode(ext):
    """As the fprop kernel runs it: a slice is 4 vectors of VEC channels (VEC 8 for 16-bit types,
    4 for fp32), thread column vcol starts at vcol * VEC, and C/groups is a multiple of VEC."""
    checked = 0
    for VEC, Cg, S, dil_h, dil_w in itertools.product([4, 8], [8, 16, 24, 40, 64, 72, 200], [1, 2, 3, 5, 7], [1, 2],
                                                      [1, 3]):
        if Cg % VEC:
            continue
        step, W, C, R = 4 * VEC, 13, 2 * Cg, 4  # two groups: the pixel stride is C, not Cg
        count = (R * S * Cg) // step + 3  # past the end
        for vcol in range(4):
            walk = ext.tap_walk(vcol * VEC, count, Cg, S, dil_h, dil_w, W, C, step)
            for i, (c, s, r, dh, dw, off) in enumerate(walk):
                rs, c_ref = divmod(vcol * VEC + i * step, Cg)
                r_ref, s_ref = divmod(rs, S)
                assert (c, s, r) == (c_ref, s_ref, r_ref), (VEC, Cg, S, vcol, i)
                assert (dh, dw) == (r_ref * dil_h, s_ref * dil_w)
                assert off == (r_ref * dil_h * W + s_ref * dil_w) * C
                checked += 1
    assert checked > 10_000


def test_phase_walk_matches_the_decode(ext):
    for n_kb, taps_w, taps_h in itertools.product([1, 2, 3, 5], [1, 2, 3], [1, 2, 4]):
        tap0_h, tap0_w, step_h, step_w, out_h, out_w = 1, 0, 2, 3, 1, 2
        count = n_kb * taps_w * taps_h + 2  # past the end: jr reaches taps_h
        walk = ext.phase_walk(count, n_kb, taps_w, tap0_h, tap0_w, step_h, step_w, out_h, out_w)
        for kt, (kb, js, jr, dp, dq, r, s) in enumerate(walk):
            tap, kb_ref = divmod(kt, n_kb)
            jr_ref, js_ref = divmod(tap, taps_w)
            assert (kb, js, jr) == (kb_ref, js_ref, jr_ref), (n_kb, taps_w, kt)
            assert (dp, dq) == (jr_ref * out_h, js_ref * out_w)
            assert (r, s) == (tap0_h + jr_ref * step_h, tap0_w + js_ref * step_w)


def test_pixel_walk_matches_the_decode(ext):
    checked = 0
    for P, Q, step in itertools.product([1, 2, 3, 7, 14, 56], [1, 2, 5, 7, 28, 56], [1, 16, 32, 64]):
        for npq0 in (0, 5, 31, P * Q - 1):
            count = 3 * P * Q // step + 4
            for i, (n, p, q) in enumerate(ext.pixel_walk(npq0, count, P, Q, step)):
                n_ref, rem = divmod(npq0 + i * step, P * Q)
                assert (n, p, q) == (n_ref, *divmod(rem, Q)), (P, Q, step, npq0, i)
                checked += 1
    assert checked > 10_000


def test_walks_reject_bad_arguments(ext):
    with pytest.raises(ValueError, match="tap_walk"):
        ext.tap_walk(0, 1, 0, 1, 1, 1, 4, 4, 8)
    with pytest.raises(ValueError, match="phase_walk"):
        ext.phase_walk(1, 0, 1, 0, 0, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="pixel_walk"):
        ext.pixel_walk(0, 1, 1, 0, 32)
