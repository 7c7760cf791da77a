"""Tests for repair_pl.merge (TIES / DARE-TIES / linear / SLERP / sign merging)."""

from __future__ import annotations

import math

import pytest
import torch

from repair_pl.merge import (
    MERGERS,
    dare_ties_merge,
    linear_merge,
    merge,
    sign_merge,
    slerp_merge,
    ties_merge,
)

# Three shards over 5 entries, base = 0, so shard == task vector.
# Magnitudes are distinct within each shard so trimming is unambiguous.
S1 = [1.0, -3.0, 3.0, 0.5, 1.5]
S2 = [2.0, 1.0, -1.2, 0.6, -1.5]
S3 = [-4.0, 1.1, -0.9, -0.2, 0.1]


def _shards():
    return [torch.tensor(s) for s in (S1, S2, S3)]


def _close(a, b, atol=1e-6):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=atol, rtol=0)


# --------------------------------------------------------------------------- #
# TIES, hand-computed
# --------------------------------------------------------------------------- #
def test_ties_hand_computed_density_1():
    # entry 0: 1, 2, -4      -> sum -1  -> elect -, agreeing {-4}        -> -4
    # entry 1: -3, 1, 1.1    -> sum -0.9 -> elect -, agreeing {-3}       -> -3
    # entry 2: 3, -1.2, -0.9 -> sum 0.9 -> elect +, agreeing {3}         -> 3
    # entry 3: .5, .6, -.2   -> sum 0.9 -> elect +, mean(.5, .6)         -> 0.55
    # entry 4: 1.5,-1.5,0.1  -> sum 0.1 -> elect +, mean(1.5, 0.1)       -> 0.8
    out = ties_merge(torch.zeros(5), _shards(), density=1.0)
    _close(out, [-4.0, -3.0, 3.0, 0.55, 0.8])


def test_ties_hand_computed_trims_one_entry_per_shard():
    # density 0.8 of 5 entries keeps 4 per shard, dropping the smallest |tau|:
    #   S1 drops entry 3 (0.5), S2 drops entry 3 (0.6), S3 drops entry 4 (0.1).
    # entry 3: 0, 0, -0.2  -> elect -, -0.2   (sign flipped vs density 1!)
    # entry 4: 1.5, -1.5, 0 -> sum 0 -> no elected sign -> 0
    out = ties_merge(torch.zeros(5), _shards(), density=0.8)
    _close(out, [-4.0, -3.0, 3.0, -0.2, 0.0])


def test_ties_nonzero_base_is_offset():
    base = torch.arange(5, dtype=torch.float32)
    shards = [base + s for s in _shards()]
    out = ties_merge(base, shards, density=0.8)
    _close(out, base + torch.tensor([-4.0, -3.0, 3.0, -0.2, 0.0]))


def test_ties_weights_change_result_hand_computed():
    # weights [1, 1, 3]: S3 weighted = [-12, 3.3, -2.7, -0.6, 0.3]; the agreeing entries are
    # averaged with those weights (divided by the sum of their weights, as mergekit / WISE):
    # entry 0: 1, 2, -12     -> -         -> -12 / 3                    = -4
    # entry 1: -3, 1, 3.3    -> sum 1.3 + -> (1 + 3.3) / (1 + 3)        = 1.075
    # entry 2: 3, -1.2, -2.7 -> sum -.9 - -> (-1.2 - 2.7) / (1 + 3)     = -0.975
    # entry 3: .5, .6, -.6   -> sum .5  + -> (.5 + .6) / (1 + 1)        = 0.55
    # entry 4: 1.5, -1.5, .3 -> sum .3  + -> (1.5 + .3) / (1 + 3)       = 0.45
    out = ties_merge(torch.zeros(5), _shards(), weights=[1.0, 1.0, 3.0], density=1.0)
    _close(out, [-4.0, 1.075, -0.975, 0.55, 0.45])
    assert not torch.allclose(out, ties_merge(torch.zeros(5), _shards(), density=1.0))


def test_ties_weights_leave_an_entry_of_one_shard_as_it_is():
    # disjoint shards (REPAIR's masks): each entry has one contributor, whatever its weight
    a, b = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, -3.0, 0.0])
    _close(ties_merge(torch.zeros(3), [a, b], weights=[0.2, 5.0], density=1.0), [2.0, -3.0, -1.0])


def test_ties_trim_ties_at_threshold_are_kept():
    # |tau| = [3, 1, 1, 0.5]: density 0.5 -> k=2, threshold 1 -> both 1s kept
    out = ties_merge(torch.zeros(4), [torch.tensor([3.0, 1.0, -1.0, 0.5])], density=0.5)
    _close(out, [3.0, 1.0, -1.0, 0.0])


def test_ties_trim_is_over_whole_tensor_2d():
    shard = torch.tensor([[10.0, 0.1], [0.2, 5.0]])
    out = ties_merge(torch.zeros(2, 2), [shard], density=0.5)
    _close(out, [[10.0, 0.0], [0.0, 5.0]])


def test_single_shard_identity_ties_and_linear():
    torch.manual_seed(0)
    base = torch.randn(4, 6)
    shard = torch.randn(4, 6)
    _close(ties_merge(base, [shard], density=1.0), shard, atol=1e-6)
    _close(linear_merge(base, [shard]), shard, atol=1e-6)
    _close(slerp_merge(base, [shard]), shard, atol=1e-6)
    _close(sign_merge(base, [shard]), shard, atol=1e-6)


# --------------------------------------------------------------------------- #
# linear
# --------------------------------------------------------------------------- #
def test_linear_average_and_weights():
    base = torch.tensor([10.0, -1.0])
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    _close(linear_merge(base, [a, b]), [2.0, 4.0])
    # (1*[1,2] + 3*[3,6]) / 4 -- independent of base
    _close(linear_merge(base, [a, b], weights=[1.0, 3.0]), [2.5, 5.0])


def test_linear_zero_total_weight_raises():
    with pytest.raises(ValueError, match="positive total weight"):
        linear_merge(torch.zeros(2), [torch.ones(2), torch.ones(2)], weights=[0.0, 0.0])


# --------------------------------------------------------------------------- #
# sign
# --------------------------------------------------------------------------- #
def test_sign_merge_equals_ties_density_1():
    _close(sign_merge(torch.zeros(5), _shards()), [-4.0, -3.0, 3.0, 0.55, 0.8])
    w = [2.0, 0.5, 1.0]
    _close(
        sign_merge(torch.zeros(5), _shards(), weights=w),
        ties_merge(torch.zeros(5), _shards(), weights=w, density=1.0),
    )


# --------------------------------------------------------------------------- #
# DARE-TIES
# --------------------------------------------------------------------------- #
def test_dare_ties_deterministic_with_generator():
    torch.manual_seed(1)
    base = torch.randn(32, 16)
    shards = [base + torch.randn(32, 16) for _ in range(3)]
    out1 = dare_ties_merge(base, shards, density=0.4, generator=torch.Generator().manual_seed(7))
    out2 = dare_ties_merge(base, shards, density=0.4, generator=torch.Generator().manual_seed(7))
    out3 = dare_ties_merge(base, shards, density=0.4, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(out1, out2, atol=0, rtol=0)
    assert not torch.equal(out1, out3)


def test_dare_ties_density_1_equals_ties_untrimmed():
    out = dare_ties_merge(torch.zeros(5), _shards(), density=1.0,
                          generator=torch.Generator().manual_seed(0))
    _close(out, ties_merge(torch.zeros(5), _shards(), density=1.0))


def test_dare_ties_unbiased_on_average():
    # Single shard: sign election is trivial, so E[dare] = density * tau/density
    # = tau = ties' untrimmed value.  Average over many entries (loose bound).
    n, density = 100_000, 0.3
    g = torch.Generator().manual_seed(123)
    base = torch.zeros(n)
    tau = torch.full((n,), 0.7)
    out = dare_ties_merge(base, [tau], density=density, generator=g)
    kept = (out != 0).float().mean().item()
    assert abs(kept - density) < 0.01
    # kept entries are rescaled by exactly 1/density
    _close(out[out != 0], torch.full_like(out[out != 0], 0.7 / density), atol=1e-5)
    ties_val = ties_merge(base[:1], [tau[:1]], density=1.0).item()
    assert abs(out.mean().item() - ties_val) < 0.03 * ties_val

    # Per-entry expectation over repeated draws on a small tensor.
    small = torch.tensor([1.0, -2.0, 0.5, 3.0])
    acc = torch.zeros(4)
    g2 = torch.Generator().manual_seed(5)
    trials = 2000
    for _ in range(trials):
        acc += dare_ties_merge(torch.zeros(4), [small], density=0.5, generator=g2)
    expected = ties_merge(torch.zeros(4), [small], density=1.0)
    # std of the mean per entry = |tau| / sqrt(trials) ~ 0.067 for |tau|=3
    _close(acc / trials, expected, atol=0.25)


def test_dare_ties_multi_shard_signs_follow_election():
    # All shards share the sign per entry: every nonzero output has that sign.
    torch.manual_seed(2)
    sign = torch.sign(torch.randn(500))
    shards = [sign * (torch.rand(500) + 0.1) for _ in range(4)]
    out = dare_ties_merge(torch.zeros(500), shards, density=0.5,
                          generator=torch.Generator().manual_seed(3))
    nz = out != 0
    assert nz.float().mean() > 0.8  # P(all 4 dropped) = 1/16
    assert torch.equal(torch.sign(out[nz]), sign[nz])


# --------------------------------------------------------------------------- #
# SLERP
# --------------------------------------------------------------------------- #
def test_slerp_endpoints_and_midpoint_norm():
    base = torch.tensor([5.0, -5.0])
    a = base + torch.tensor([1.0, 0.0])
    b = base + torch.tensor([0.0, 1.0])
    _close(slerp_merge(base, [a, b], weights=[1.0, 0.0]), a)
    _close(slerp_merge(base, [a, b], weights=[0.0, 1.0]), b)
    mid = slerp_merge(base, [a, b]) - base
    # orthogonal unit task vectors: slerp keeps unit norm (lerp would give 1/sqrt 2)
    assert math.isclose(mid.norm().item(), 1.0, rel_tol=1e-5)
    _close(mid, [math.sqrt(0.5), math.sqrt(0.5)], atol=1e-5)
    lerp_mid = linear_merge(base, [a, b]) - base
    assert lerp_mid.norm().item() < mid.norm().item() - 0.2


def test_slerp_colinear_falls_back_to_lerp():
    out = slerp_merge(torch.zeros(2), [torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0])])
    _close(out, [2.0, 0.0])
    out0 = slerp_merge(torch.zeros(2), [torch.zeros(2), torch.tensor([0.0, 2.0])])
    _close(out0, [0.0, 1.0])


def test_slerp_three_shards_fold_left_to_right():
    e = torch.eye(3)
    out = slerp_merge(torch.zeros(3), [e[0], e[1], e[2]])
    # step 1 (t=1/2): u = (e0+e1)/sqrt2; step 2 (t=1/3, angle 90deg):
    # sin(60deg) u + sin(30deg) e2
    c = math.sqrt(3) / 2 / math.sqrt(2)
    _close(out, [c, c, 0.5], atol=1e-5)
    assert math.isclose(out.norm().item(), 1.0, rel_tol=1e-5)


def test_slerp_negative_weight_raises():
    with pytest.raises(ValueError, match="non-negative"):
        slerp_merge(torch.zeros(2), [torch.ones(2), torch.ones(2)], weights=[2.0, -1.0])


# --------------------------------------------------------------------------- #
# dtype / device / purity
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("method", sorted(MERGERS))
def test_dtype_preserved_bfloat16(method):
    base = torch.zeros(5, dtype=torch.bfloat16)
    shards = [s.to(torch.bfloat16) for s in _shards()]
    out = merge(method, base, shards, density=0.8, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16
    assert out.shape == base.shape
    assert out.device == base.device


def test_bfloat16_values_match_float32():
    shards = [s.to(torch.bfloat16) for s in _shards()]
    out = ties_merge(torch.zeros(5, dtype=torch.bfloat16), shards, density=1.0)
    ref = ties_merge(torch.zeros(5), [s.float() for s in shards], density=1.0)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_float64_preserved():
    base = torch.zeros(5, dtype=torch.float64)
    out = ties_merge(base, [torch.tensor(s, dtype=torch.float64) for s in (S1, S2, S3)], density=1.0)
    assert out.dtype == torch.float64
    _close(out, [-4.0, -3.0, 3.0, 0.55, 0.8], atol=1e-12)


@pytest.mark.parametrize("method", sorted(MERGERS))
def test_inputs_unmodified(method):
    torch.manual_seed(4)
    base = torch.randn(6, 3)
    shards = [base + torch.randn(6, 3) for _ in range(3)]
    base_copy = base.clone()
    shard_copies = [s.clone() for s in shards]
    out = merge(method, base, shards, weights=[1.0, 2.0, 0.5], density=0.5,
                generator=torch.Generator().manual_seed(0))
    assert torch.equal(base, base_copy)
    for s, c in zip(shards, shard_copies):
        assert torch.equal(s, c)
    # output must not alias an input
    assert out.data_ptr() != base.data_ptr()
    assert all(out.data_ptr() != s.data_ptr() for s in shards)


def test_single_shard_result_does_not_alias():
    base = torch.zeros(3)
    shard = torch.ones(3)
    out = slerp_merge(base, [shard])
    out += 1
    assert torch.equal(shard, torch.ones(3))


# --------------------------------------------------------------------------- #
# dispatch
# --------------------------------------------------------------------------- #
def test_mergers_registry_and_dispatch():
    assert set(MERGERS) == {"ties", "dare_ties", "linear", "slerp", "sign"}
    base = torch.zeros(5)
    _close(merge("ties", base, _shards(), density=0.8), ties_merge(base, _shards(), density=0.8))
    _close(merge("linear", base, _shards()), linear_merge(base, _shards()))
    _close(merge("sign", base, _shards()), sign_merge(base, _shards()))
    _close(merge("slerp", base, _shards()), slerp_merge(base, _shards()))
    _close(
        merge("dare_ties", base, _shards(), density=0.6, generator=torch.Generator().manual_seed(9)),
        dare_ties_merge(base, _shards(), density=0.6, generator=torch.Generator().manual_seed(9)),
    )


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="bogus") as exc:
        merge("bogus", torch.zeros(2), [torch.ones(2)])
    for name in MERGERS:
        assert name in str(exc.value)


# --------------------------------------------------------------------------- #
# validation errors
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("method", sorted(MERGERS))
def test_empty_shards_raises(method):
    with pytest.raises(ValueError, match="non-empty"):
        merge(method, torch.zeros(2), [])


@pytest.mark.parametrize("method", sorted(MERGERS))
def test_shape_mismatch_raises(method):
    with pytest.raises(ValueError, match=r"shard 1 has shape \(3,\) but base has shape \(2,\)"):
        merge(method, torch.zeros(2), [torch.ones(2), torch.ones(3)])


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
@pytest.mark.parametrize("fn", [ties_merge, dare_ties_merge])
def test_bad_density_raises(fn, density):
    with pytest.raises(ValueError, match="density"):
        fn(torch.zeros(2), [torch.ones(2)], density=density)


@pytest.mark.parametrize("method", sorted(MERGERS))
def test_weights_length_mismatch_raises(method):
    with pytest.raises(ValueError, match="2 weights for 3 shards"):
        merge(method, torch.zeros(2), [torch.ones(2)] * 3, weights=[1.0, 1.0])


@pytest.mark.parametrize("method", sorted(MERGERS))
def test_negative_total_weight_raises(method):
    with pytest.raises(ValueError, match="total weight"):
        merge(method, torch.zeros(2), [torch.ones(2)] * 2, weights=[-1.0, -2.0])
