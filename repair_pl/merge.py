"""Merging of knowledge shards (task vectors) back into a single weight.

WISE (arXiv 2405.14768) edits a copy of one FFN weight ("side memory") and
splits the edit stream over several random *knowledge shards*.  Each shard
``W'_k`` differs from the shared base ``W`` by a task vector
``tau_k = W'_k - W``; the shards are then merged back into one weight.  WISE
(and EasyEdit's implementation) uses TIES-Merging (Yadav et al., 2023) for
this; the other mergers here are common baselines.

All functions are pure: they never modify their inputs, they work on any
device, compute in (at least) float32 and return a tensor in ``base``'s dtype
on ``base``'s device.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "ties_merge",
    "dare_ties_merge",
    "linear_merge",
    "slerp_merge",
    "sign_merge",
    "MERGERS",
    "merge",
]

# Above this |cosine similarity| two task vectors are treated as colinear and
# SLERP falls back to linear interpolation (sin(omega) ~ 0 is unstable).
_SLERP_COLINEAR_DOT = 0.9995
_EPS = 1e-12


# --------------------------------------------------------------------------- #
# validation / shared helpers
# --------------------------------------------------------------------------- #
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 at least (bf16/fp16 sums lose too much); keep float64 if given.
    if dtype == torch.float64:
        return torch.float64
    return torch.float32


def _check_density(density: float) -> float:
    try:
        d = float(density)
    except (TypeError, ValueError):
        raise ValueError(f"density must be a number in (0, 1], got {density!r}") from None
    if not (0.0 < d <= 1.0) or math.isnan(d):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    return d


def _prepare(
    base: Tensor,
    shards: Sequence[Tensor],
    weights: Sequence[float] | None,
) -> tuple[Tensor, list[Tensor], list[float]]:
    """Validate inputs and return (base_c, task_vectors, weights) in compute dtype."""
    if not isinstance(base, Tensor):
        raise ValueError(f"base must be a torch.Tensor, got {type(base).__name__}")
    if shards is None or len(shards) == 0:
        raise ValueError("shards must be a non-empty sequence of tensors")
    for i, s in enumerate(shards):
        if not isinstance(s, Tensor):
            raise ValueError(f"shard {i} must be a torch.Tensor, got {type(s).__name__}")
        if s.shape != base.shape:
            raise ValueError(
                f"shard {i} has shape {tuple(s.shape)} but base has shape {tuple(base.shape)}"
            )

    if weights is None:
        w = [1.0] * len(shards)
    else:
        w = [float(x) for x in weights]
        if len(w) != len(shards):
            raise ValueError(
                f"got {len(w)} weights for {len(shards)} shards; lengths must match"
            )
        if any(not math.isfinite(x) for x in w):
            raise ValueError(f"weights must be finite, got {w}")
    total = sum(w)
    if total < 0:
        raise ValueError(f"total weight must be non-negative, got sum(weights)={total}")

    cdtype = _compute_dtype(base.dtype)
    # .to() may alias when dtype/device already match; every later op is
    # out-of-place, so the caller's tensors are never written.
    base_c = base.detach().to(dtype=cdtype)
    taus = [s.detach().to(device=base.device, dtype=cdtype) - base_c for s in shards]
    return base_c, taus, w


def _finish(base: Tensor, base_c: Tensor, merged_tau: Tensor) -> Tensor:
    out = base_c + merged_tau
    if not (base.dtype.is_floating_point or base.dtype.is_complex):
        # integer weights: round instead of truncating toward zero
        out = out.round()
    return out.to(base.dtype)


def _magnitude_trim(tau: Tensor, density: float) -> Tensor:
    """Keep the top-``density`` fraction of entries by |value|; zero the rest."""
    n = tau.numel()
    if density >= 1.0 or n == 0:
        return tau
    # ceil (with a tolerance for float noise such as 0.7*10=7.000000000000001)
    # so that at least a `density` fraction survives, and never fewer than 1.
    k = max(1, math.ceil(density * n - 1e-9))
    if k >= n:
        return tau
    mag = tau.abs().flatten()
    threshold = torch.topk(mag, k, sorted=False).values.min()
    # entries tied with the threshold are kept (simpler, and order-independent)
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def _dare_drop(tau: Tensor, density: float, generator: torch.Generator | None) -> Tensor:
    """DARE: drop entries with prob. 1-density, rescale survivors by 1/density."""
    if density >= 1.0:
        return tau
    # draw on the generator's device (a CPU generator cannot feed CUDA rand)
    gen_device = generator.device if generator is not None else tau.device
    u = torch.rand(tau.shape, generator=generator, device=gen_device, dtype=torch.float32)
    keep = (u < density).to(tau.device)
    # rescale keeps E[dropped tau] == tau (unbiased)
    return torch.where(keep, tau / density, torch.zeros_like(tau))


def _sign_elect_disjoint_mean(taus: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """TIES steps 2+3: elect a sign per entry, take the weighted mean of the agreeing entries.

    The mean divides by the weights of the agreeing entries (mergekit's ``normalize``, which
    WISE's TIES uses), so weights decide between shards that share an entry and an entry held
    by one shard keeps its value whatever its weight."""
    w = torch.tensor(list(weights), dtype=taus[0].dtype, device=taus[0].device).view(-1, *([1] * taus[0].dim()))
    stacked = torch.stack(list(taus), dim=0) * w
    # elected sign = sign of the total (weighted) mass, as in TIES "sum" election
    elected = torch.sign(stacked.sum(dim=0))
    # zeros never agree: trimmed/dropped entries must not dilute the mean
    agree = (torch.sign(stacked) == elected) & (stacked != 0)
    divisor = (w * agree).sum(dim=0)
    total = (stacked * agree).sum(dim=0)
    # entries with no agreeing value (incl. elected sign 0) -> 0
    held = divisor != 0
    return torch.where(held, total / torch.where(held, divisor, torch.ones_like(divisor)), torch.zeros_like(total))


# --------------------------------------------------------------------------- #
# public mergers
# --------------------------------------------------------------------------- #
def ties_merge(
    base: Tensor,
    shards: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    density: float = 0.53,
) -> Tensor:
    """TIES-Merging (Yadav et al., 2023) of shards onto ``base``.

    For each shard the task vector ``tau_k = shard_k - base`` is trimmed to its
    top-``density`` fraction of entries by magnitude (per shard, over the whole
    tensor; entries tied with the threshold are kept), a sign is elected per
    entry as the sign of the sum of the weighted trimmed taus (weights default
    to 1.0), and the merged tau is the weighted mean of only those nonzero taus
    whose sign agrees with the elected one, ``sum_k w_k tau_k / sum_k w_k`` over
    the agreeing k (0 where none agree), as mergekit's TIES with ``normalize``
    (WISE's).  Weights thus decide between shards that share an entry; an entry
    only one shard holds keeps that shard's value.  Returns ``base + merged_tau``
    in ``base.dtype``.

    Raises ValueError for empty ``shards``, shape mismatch, ``density`` outside
    (0, 1], a weights/shards length mismatch or negative total weight.
    """
    density = _check_density(density)
    base_c, taus, w = _prepare(base, shards, weights)
    trimmed = [_magnitude_trim(t, density) for t in taus]
    return _finish(base, base_c, _sign_elect_disjoint_mean(trimmed, w))


def dare_ties_merge(
    base: Tensor,
    shards: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    density: float = 0.53,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DARE-TIES: TIES merging with DARE's random drop instead of magnitude trim.

    Each entry of each task vector is kept independently with probability
    ``density`` (drawn from ``generator``; pass a seeded generator for
    reproducibility) and survivors are rescaled by ``1/density`` so the
    dropped task vector is unbiased.  Sign election and disjoint mean are as
    in :func:`ties_merge`.  ``density=1`` drops nothing and equals
    ``ties_merge(..., density=1)``.
    """
    density = _check_density(density)
    base_c, taus, w = _prepare(base, shards, weights)
    dropped = [_dare_drop(t, density, generator) for t in taus]
    return _finish(base, base_c, _sign_elect_disjoint_mean(dropped, w))


def linear_merge(
    base: Tensor,
    shards: Sequence[Tensor],
    weights: Sequence[float] | None = None,
) -> Tensor:
    """Weighted average of the shards: ``base + sum_k w_k tau_k / sum_k w_k``.

    Weights default to 1.0 (plain mean).  The total weight must be positive.
    """
    base_c, taus, w = _prepare(base, shards, weights)
    total = sum(w)
    if total <= 0:
        raise ValueError(f"linear_merge needs a positive total weight, got sum(weights)={total}")
    merged = sum(t * (wk / total) for t, wk in zip(taus, w))
    return _finish(base, base_c, merged)


def _slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Spherical interpolation between task vectors a (t=0) and b (t=1).

    The angle is measured between the normalised vectors and the coefficients
    are applied to the unnormalised ones (as mergekit does), so the norm is
    interpolated too.  Near-colinear or zero vectors fall back to lerp.
    """
    a_flat, b_flat = a.flatten(), b.flatten()
    na, nb = a_flat.norm(), b_flat.norm()
    if na <= _EPS or nb <= _EPS:
        return (1.0 - t) * a + t * b
    dot = torch.clamp(torch.dot(a_flat / na, b_flat / nb), -1.0, 1.0)
    if abs(float(dot)) > _SLERP_COLINEAR_DOT:
        return (1.0 - t) * a + t * b
    omega = torch.arccos(dot)
    sin_omega = torch.sin(omega)
    ca = torch.sin((1.0 - t) * omega) / sin_omega
    cb = torch.sin(t * omega) / sin_omega
    return ca * a + cb * b


def slerp_merge(
    base: Tensor,
    shards: Sequence[Tensor],
    weights: Sequence[float] | None = None,
) -> Tensor:
    """Spherical linear interpolation (SLERP) of the task vectors.

    Two shards: ``base + slerp(tau_0, tau_1, t)`` with ``t = w_1 / (w_0 + w_1)``
    (0.5 by default).  More shards are folded pairwise left to right,
    ``acc = slerp(acc, tau_k, t_k)`` with ``t_k = w_k / sum_{j<=k} w_j``
    (the cumulative weight share), so equal weights give each new shard its
    fair share.  Note the fold is order dependent.  One shard: returns (a
    copy of) that shard.  Weights must be non-negative with positive total.
    """
    base_c, taus, w = _prepare(base, shards, weights)
    if any(x < 0 for x in w):
        raise ValueError(f"slerp_merge needs non-negative weights, got {w}")
    if sum(w) <= 0:
        raise ValueError(f"slerp_merge needs a positive total weight, got sum(weights)={sum(w)}")
    acc = taus[0]
    cum = w[0]
    for tau_k, w_k in zip(taus[1:], w[1:]):
        cum += w_k
        # cum == 0 means everything so far has zero weight; any t works for
        # the result, 0 keeps acc (it will be overwritten by a later t=1).
        t = w_k / cum if cum > 0 else 0.0
        acc = _slerp(acc, tau_k, t)
    return _finish(base, base_c, acc)


def sign_merge(
    base: Tensor,
    shards: Sequence[Tensor],
    weights: Sequence[float] | None = None,
) -> Tensor:
    """TIES sign election + disjoint mean without trimming (``density=1``).

    Equivalent to ``ties_merge(base, shards, weights, density=1.0)``.
    """
    return ties_merge(base, shards, weights, density=1.0)


MERGERS: dict[str, Callable[..., Tensor]] = {
    "ties": ties_merge,
    "dare_ties": dare_ties_merge,
    "linear": linear_merge,
    "slerp": slerp_merge,
    "sign": sign_merge,
}


def merge(
    method: str,
    base: Tensor,
    shards: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    density: float = 0.53,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Dispatch to the merger named ``method`` (a key of :data:`MERGERS`).

    ``density`` is used by ``"ties"`` and ``"dare_ties"``, ``generator`` only
    by ``"dare_ties"``; both are ignored by the other methods.  An unknown
    method raises ValueError naming it and listing the valid choices.
    """
    if not isinstance(method, str) or method not in MERGERS:
        raise ValueError(
            f"unknown merge method {method!r}; valid choices: {sorted(MERGERS)}"
        )
    if method == "ties":
        return ties_merge(base, shards, weights, density=density)
    if method == "dare_ties":
        return dare_ties_merge(base, shards, weights, density=density, generator=generator)
    return MERGERS[method](base, shards, weights)
