"""Tolerances derived from the arithmetic, for the comparisons that cannot be bitwise.

Two runs agree to the bit when they do the same operations in the same order: the same thread
count (:func:`lightrft.testing.rank_threads` on the test's side, ``OMP_NUM_THREADS`` on the ranks')
and the same reduction order. Across backends and world sizes the order differs by design (micro-
batch gradients summed per rank then across ranks, a norm's squares per shard then across ranks);
what such a comparison may allow follows from the unit roundoff ``u`` of the dtype and the number
of terms summed:

- **Sums** (Higham, *Accuracy and Stability of Numerical Algorithms*, 2002, eq. 4.4): whatever the
  order, ``|fl(x_1 + ... + x_n) - sum| <= gamma(n - 1) * sum |x_i|`` with
  ``gamma(k) = k u / (1 - k u)``; two orders differ by at most twice that (:func:`sum_atol`).
- **Adam**: the update ``m_hat / (sqrt(v_hat) + eps)`` divides by the gradient's own size, so where a
  gradient element is ~0 a rounding-level difference can flip it by up to ``2 lr``: no tolerance on
  the gradients bounds the parameters unless ``eps`` does. To first order (:func:`adam_update_atol`),
  gradients that differ by at most ``delta`` per element give updates that differ by at most
  ``(1 + U_t) delta / eps``, ``U_t`` bounding ``|m_hat| / sqrt(v_hat)`` (:func:`adam_ratio_bound`).
  A parity test that compares parameters across reduction orders therefore trains with an ``eps``
  that makes that bound small (:data:`PARITY_ADAM_EPS`), on every side.
- **Two Adam kernels** (fused and foreach, DeepSpeedCPUAdam and torch's) on the same state and
  gradient compute the same formula with their own roundings (:func:`adam_step_atol`).
- **bf16 against fp32**, where no rounding bound on the gradients holds: whatever the gradients, an
  Adam step moves an element by at most ``lr_t U_t`` (:func:`adam_drift_atol`).

What these bounds leave out (an assumption, not arithmetic, besides :data:`MICRO_GRAD_SPREAD`): two
runs whose parameters differ after a step get gradients that differ at the next step by the model's
response to that difference (its Hessian times it), which no dtype or term count bounds. The
multi-step bounds count the rounding-level differences of every step (:func:`parity_grad_atol`,
about 1e-6 per element, three orders above the measured ones) and leave the Hessian term to that
margin; a comparison that must not rely on it compares one step from one state
(:func:`adam_step_atol`, the first loss of a run).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

#: Adam's eps in the parity runs that compare parameters across reduction orders: 1e-4 against
#: gradient elements of order 1e-3 to 1e-6, so ``(1 + U) delta / eps`` stays below 1e-3 relative to
#: lr for rounding-level ``delta`` (< 1e-7, see :func:`sum_atol`); the default 1e-8 lets one flip.
PARITY_ADAM_EPS = 1e-4


def unit_roundoff(dtype: torch.dtype = torch.float32) -> float:
    """``u``: half the distance from 1 to the next float of ``dtype`` (2**-24 for float32)."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: the relative error bound of n roundings in a row."""
    nu = n * unit_roundoff(dtype)
    if nu >= 1:
        raise ValueError(f"n={n} terms is too many for a bound in {dtype} (n u = {nu:.3g} >= 1)")
    return nu / (1 - nu)


def sum_atol(n: int, abs_sum: float, dtype: torch.dtype = torch.float32) -> float:
    """The most two summation orders of the same ``n`` terms can differ by, when the terms'
    absolute values add up to ``abs_sum``: ``2 gamma(n - 1) abs_sum`` (each order lies within
    ``gamma(n - 1) abs_sum`` of the exact sum). A mean divides both by n (exact for powers of 2,
    one more rounding otherwise: ``gamma(n)``)."""
    return 2 * gamma(max(n, 1), dtype) * abs_sum


def adam_ratio_bound(step: int, betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """``U_t``: the largest ``|m_hat_t| / sqrt(v_hat_t)`` any gradient sequence can produce at Adam
    step ``t`` (Cauchy-Schwarz on ``m_hat = sum a_k g_k``, ``v_hat = sum b_k g_k^2``:
    ``|m_hat| <= sqrt(sum a_k^2 / b_k) sqrt(v_hat)``). 1 at the first step."""
    b1, b2 = betas
    a = [(1 - b1) * b1 ** (step - k) / (1 - b1**step) for k in range(1, step + 1)]
    b = [(1 - b2) * b2 ** (step - k) / (1 - b2**step) for k in range(1, step + 1)]
    return math.sqrt(sum(x * x / y for x, y in zip(a, b)))


def adam_update_atol(
    grad_atol: float, eps: float, step: int, betas: tuple[float, float] = (0.9, 0.999)
) -> float:
    """First-order bound on how far two Adam updates ``m_hat / (sqrt(v_hat) + eps)`` at step ``t``
    lie apart when every gradient so far differs by at most ``grad_atol`` per element: with
    ``s = sqrt(v_hat)``, ``|d m_hat| <= grad_atol`` and ``|d s| <= grad_atol`` (the weights ``a_k``,
    ``b_k`` sum to 1), so ``|d u| <= grad_atol / (s + eps) + |m_hat| grad_atol / (s + eps)^2
    <= (1 + U_t) grad_atol / eps``."""
    return (1 + adam_ratio_bound(step, betas)) * grad_atol / eps


def adam_param_atol(
    lrs: Sequence[float],
    grad_atol: float,
    eps: float,
    betas: tuple[float, float] = (0.9, 0.999),
    first_step: int = 1,
) -> float:
    """How far two AdamW runs' parameters can drift apart over the steps with learning rates
    ``lrs`` when their gradients differ by at most ``grad_atol`` per element at every step:
    ``sum_t lr_t * adam_update_atol(t)`` (decoupled weight decay multiplies a difference by
    ``1 - lr wd <= 1``: it never grows one). ``first_step``: Adam's step count at ``lrs[0]`` (a run
    resumed from one saved state: the earlier gradients are the same on both sides, so ``m_hat``
    and ``sqrt(v_hat)`` still move by at most ``grad_atol``, and ``U_t`` is the later step's)."""
    return sum(lr * adam_update_atol(grad_atol, eps, t, betas) for t, lr in enumerate(lrs, start=first_step))


#: Roundings on either term of one AdamW step of one element, counted on torch's foreach /
#: single-tensor AdamW (the fused CPU kernel, FusedAdam and DeepSpeedCPUAdam compute the same formula
#: with as many or fewer). The decayed ``D = p (1 - lr wd)``: the factor's cast, the product and the
#: final sum's rounding, 3 (relative to ``|p|``). The update ``(lr / bc1) m / d``: ``v = b2 v + (1 -
#: b2) g^2`` 6 (casts, products, the sum; every term >= 0, so relative), of which the square root
#: keeps half, 3; ``d = sqrt(v) / sqrt(bc2) + eps`` 5 more (the root, the cast and the quotient, the
#: eps's cast and the sum: positive terms); the step size's cast, the quotient ``m / d``, the product
#: and the final sum, 4: 12 relative to ``|update| <= lr U_t``. ``m = lerp(m, g, 1 - b1)`` loses at
#: most 3 roundings of ``|m| + w |g - m| <= 2 (b1 |m| + (1 - b1) |g|)``, whose ratio to ``bc1 d`` is
#: at most ``U_t`` (Cauchy-Schwarz as in :func:`adam_ratio_bound`, on ``|g_k|``): 6 more relative to
#: ``lr U_t``. 18 on the update, 3 on the decayed term; 20 covers both (``gamma(a) + gamma(b) +
#: gamma(a) gamma(b) <= gamma(a + b)``).
ADAM_STEP_ROUNDINGS = 20


def adam_step_atol(
    p_abs: torch.Tensor | float,
    lr: float,
    step: int,
    betas: tuple[float, float] = (0.9, 0.999),
    dtype: torch.dtype = torch.float32,
    roundings: int = ADAM_STEP_ROUNDINGS,
) -> torch.Tensor | float:
    """Per element, how far two AdamW implementations' results lie apart after one step from the
    same parameters ``p`` (``p_abs = |p|``; a tensor gives a per-element bound), Adam state and
    gradient, at Adam step ``step`` with learning rate at most ``lr``: each lies within
    ``gamma(roundings) (|p| + lr U_t)`` of the exact ``p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)``
    (:data:`ADAM_STEP_ROUNDINGS` counts how), whatever ``eps`` and the gradient; two
    implementations, twice that. ``roundings`` more for a kernel that adds its own
    (:func:`float32_scalar_roundings`)."""
    return 2 * gamma(roundings, dtype) * (p_abs + lr * adam_ratio_bound(step, betas))


def float32_scalar_roundings(step: int, betas: tuple[float, float] = (0.9, 0.999)) -> int:
    """Roundings, relative to the update, that a kernel adds when it holds the betas and the bias
    corrections in float32 (DeepSpeedCPUAdam: ``_betta1_t *= _betta1``) where torch computes them in
    float64: ``1 - b`` from a rounded ``b`` loses ``b / (1 - b)`` roundings (cancellation), ``1 - b^t``
    from ``t + 1`` rounded factors ``(t + 1) b^t / (1 - b^t)``; beta2's reach the update through a
    square root, which halves them."""
    b1, b2 = betas

    def lost(b: float) -> float:
        return b / (1 - b) + (step + 1) * b**step / (1 - b**step)

    return math.ceil(lost(b1) + lost(b2) / 2)


def adam_drift_atol(lrs: Sequence[float], betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """Per element, how far two AdamW runs from the same parameters can lie apart after the steps
    with learning rates ``lrs``, whatever their gradients (bf16 against fp32, where no rounding
    bound on the gradients holds): a step moves an element by ``lr_t m_hat / (sqrt(v_hat) + eps)``,
    at most ``lr_t U_t`` (:func:`adam_ratio_bound`) either way, after the decay ``1 - lr wd <= 1``,
    which never grows a difference: ``sum_t 2 lr_t U_t``."""
    return sum(2 * lr * adam_ratio_bound(t, betas) for t, lr in enumerate(lrs, start=1))


#: Confidence multiple of the probabilistic sum bound (Higham & Mary, SIAM J. Sci. Comput. 41(5),
#: 2019, Thm 2.4: with rounding errors independent and mean-zero, a sum of n terms lies within
#: ``lam sqrt(n) u sum |x_i|`` of the exact sum with probability at least ``1 - 2 n exp(-lam^2/2)``):
#: 10 fails less than once in 1e15 for a million terms. The worst-case ``gamma(n)`` is ~7% at a
#: million terms, no check at all.
LAMBDA = 10.0
#: The one assumption of :func:`parity_grad_atol` (not arithmetic): summed over the micro-batches, a
#: gradient element's absolute values are at most this many times the largest element of the
#: accumulated gradient (the tests draw every micro-batch from one distribution of random tokens).
MICRO_GRAD_SPREAD = 4.0


def norm_rtol(n_elements: int, dtype: torch.dtype = torch.float32) -> float:
    """Relative bound on two reduction orders of one L2 norm over ``n_elements`` (squares summed per
    shard then across ranks, or per parameter then over parameters): twice the probabilistic bound
    on the sum of squares (:data:`LAMBDA`); the square root halves a relative error, kept as margin."""
    return 2 * LAMBDA * math.sqrt(n_elements) * unit_roundoff(dtype)


def parity_grad_atol(micro_steps: int, max_norm: float, dtype: torch.dtype = torch.float32) -> float:
    """Per element, how far two reduction orders of one clipped accumulated gradient lie apart:
    ``micro_steps`` micro-batch gradients summed in two orders (:func:`sum_atol`), each element of
    the clipped result at most ``max_norm``, their absolute values at most
    :data:`MICRO_GRAD_SPREAD` times that."""
    return sum_atol(micro_steps, MICRO_GRAD_SPREAD * max_norm, dtype)


def parity_loss_atol(
    loss: float, norm: float, params_l2_diff: float, micro_steps: int, dtype: torch.dtype = torch.float32
) -> float:
    """How far two runs' losses at one step may lie apart: the mean of ``micro_steps`` micro-batch
    losses in two orders (``sum_atol``), plus, to first order, the gradient norm at that step times
    the (measured) L2 distance of the two runs' parameters, twice over (the final parameters stand
    for the step's: the distance only grows over these few steps; the factor 2 covers second order)."""
    return sum_atol(micro_steps, abs(loss), dtype) + 2 * norm * params_l2_diff


def parity_param_atol(
    lr: float,
    steps: int,
    micro_steps: int,
    max_norm: float,
    n_elements: int,
    eps: float,
    dtype: torch.dtype = torch.float32,
    betas: tuple[float, float] = (0.9, 0.999),
    first_step: int = 1,
) -> float:
    """Per element, how far two AdamW runs of ``steps`` steps at learning rates at most ``lr`` lie
    apart when they reduce in different orders: the gradients' difference (:func:`parity_grad_atol`)
    through Adam's Lipschitz bound (:func:`adam_param_atol`, which needs ``eps`` >> that difference:
    :data:`PARITY_ADAM_EPS`), plus the clip factor's relative difference (:func:`norm_rtol`), which
    scales a whole gradient: it moves ``m_hat / (sqrt(v_hat) + eps)`` by at most ``U_t`` times itself
    (the derivative along ``g -> c g`` is ``m_hat eps / (sqrt(v_hat) + eps)^2``). ``first_step``:
    Adam's step count at the first of these steps, for runs resumed from one saved state (the
    steps before it the same on both sides)."""
    lrs = [lr] * steps
    grad = adam_param_atol(lrs, parity_grad_atol(micro_steps, max_norm, dtype), eps, betas, first_step)
    scale = sum(
        lr * adam_ratio_bound(t, betas) * norm_rtol(n_elements, dtype)
        for t in range(first_step, first_step + steps)
    )
    return grad + scale
