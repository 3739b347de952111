"""The Adam bounds of ``lightrft.testing.tolerance`` against torch's own AdamW kernels and float64:
each bound holds on adversarial inputs (gradients near eps and near zero, parameters of every size)
and is not far above what the arithmetic really does."""

from __future__ import annotations

import pytest
import torch

from lightrft.testing import rank_threads
from lightrft.testing.tolerance import (
    ADAM_STEP_ROUNDINGS,
    adam_drift_atol,
    adam_ratio_bound,
    adam_step_atol,
    gamma,
)

BETAS = (0.9, 0.95)
LR, WD = 1e-2, 0.01


def _elements(n: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """float64 parameters of sizes 1e-6 to 10 and 4 gradients per element spanning 1e-12 to 1 in
    size, both signs: near-zero gradients make m_hat / (sqrt(v_hat) + eps) as sensitive as it gets."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=g, dtype=torch.float64) * 10 ** torch.empty(n, dtype=torch.float64).uniform_(
        -6, 1, generator=g
    )
    grads = [
        torch.randn(n, generator=g, dtype=torch.float64)
        * 10 ** torch.empty(n, dtype=torch.float64).uniform_(-12, 0, generator=g)
        for _ in range(4)
    ]
    return p, grads


def _adamw_after(
    p: torch.Tensor, grads: list[torch.Tensor], eps: float, dtype: torch.dtype, **kind: bool
) -> list:
    """Parameters and Adam states after each step: AdamW of one kind on a ``dtype`` copy."""
    x = p.to(dtype).clone().requires_grad_(True)
    opt = torch.optim.AdamW([x], lr=LR, betas=BETAS, eps=eps, weight_decay=WD, **kind)
    out = []
    for grad in grads:
        x.grad = grad.to(dtype)
        opt.step()
        st = opt.state[x]
        out.append((x.detach().clone(), st["exp_avg"].clone(), st["exp_avg_sq"].clone()))
    return out


def _one_step(p, m, v, grad, step: int, eps: float, dtype: torch.dtype, **kind: bool) -> torch.Tensor:
    """One AdamW step at Adam step ``step`` from the given state, in ``dtype``."""
    x = p.to(dtype).clone().requires_grad_(True)
    opt = torch.optim.AdamW([x], lr=LR, betas=BETAS, eps=eps, weight_decay=WD, **kind)
    x.grad = grad.to(dtype)
    opt.step()  # creates the state: overwrite it with the given one, then step again
    st = opt.state[x]
    with torch.no_grad():
        x.copy_(p.to(dtype))
        st["exp_avg"].copy_(m.to(dtype))
        st["exp_avg_sq"].copy_(v.to(dtype))
        st["step"].fill_(step - 1)
    opt.step()
    return x.detach()


@pytest.mark.parametrize("eps", [1e-8, 1e-4])
@pytest.mark.parametrize("kind", [{"foreach": False}, {"foreach": True}, {"fused": True}])
def test_each_float32_adamw_kernel_lies_within_its_step_bound_of_the_exact_step(
    eps: float, kind: dict[str, bool]
) -> None:
    p, grads = _elements(50_000, seed=1)
    with rank_threads():
        states = _adamw_after(p, grads[:-1], eps, torch.float64)
        for step, (p_t, m_t, v_t) in enumerate(states, start=2):
            # From one state (float32-representable), the step in float32 and in float64.
            p32, m32, v32 = (t.to(torch.float32).to(torch.float64) for t in (p_t, m_t, v_t))
            g32 = grads[step - 1].to(torch.float32).to(torch.float64)
            exact = _one_step(p32, m32, v32, g32, step, eps, torch.float64, foreach=False)
            got = _one_step(p32, m32, v32, g32, step, eps, torch.float32, **kind).double()
            # One implementation's error: half of adam_step_atol (which bounds two of them).
            bound = adam_step_atol(p32.abs(), LR, step, BETAS) / 2
            err = (got - exact).abs()
            assert bool((err <= bound).all()), (step, float((err / bound).max()))
            # The bound is the arithmetic's, not a loose guess: the worst element uses over 5 % (about 15 % measured).
            assert float((err / bound).max()) > 0.05


def test_fused_and_foreach_differ_by_at_most_the_two_kernel_bound() -> None:
    p, grads = _elements(50_000, seed=2)
    with rank_threads():
        a = _adamw_after(p, grads[:1], 1e-8, torch.float32, foreach=True)[0][0]
        b = _adamw_after(p, grads[:1], 1e-8, torch.float32, fused=True)[0][0]
    bound = adam_step_atol(p.to(torch.float32).abs(), LR, 1, BETAS)
    assert bool(((a - b).abs() <= bound).all())
    assert gamma(ADAM_STEP_ROUNDINGS) < 2e-6  # the bound stays far below a step (lr) for |p| <= 1


def test_adam_drift_bound_holds_whatever_the_gradients_and_is_reached() -> None:
    """Two runs from the same parameters: opposite constant gradients move each element by lr a step
    either way (U_t = 1 for constant gradients, whatever their size above eps), the most
    adam_drift_atol allows up to U_t's excess over 1; random gradients of any size stay within it."""
    p, grads = _elements(20_000, seed=3)
    lrs = [LR] * len(grads)
    bound = adam_drift_atol(lrs, BETAS)
    with rank_threads():
        up = _adamw_after(p, [torch.ones_like(p)] * 4, 1e-8, torch.float64)[-1][0]
        down = _adamw_after(p, [-torch.ones_like(p)] * 4, 1e-8, torch.float64)[-1][0]
        assert float((up - down).abs().max()) <= bound
        assert float((up - down).abs().min()) > 0.99 * 2 * LR * len(lrs)
        other = [torch.flip(g, [0]) * 1e6 for g in grads]
        x = _adamw_after(p, grads, 1e-8, torch.float32)[-1][0].double()
        y = _adamw_after(p, other, 1e-8, torch.float32)[-1][0].double()
    assert float((x - y).abs().max()) <= bound + 2 * gamma(ADAM_STEP_ROUNDINGS) * (float(p.abs().max()) + 1)
    assert adam_ratio_bound(1, BETAS) == 1.0
