"""ℓ1-ball projection and the well-posedness projection of ImplicitModel."""

import numpy as np
import pytest
import torch

from deqkit.sim import ImplicitModel, project_l1_ball


def test_projection_lands_in_ball_and_keeps_inside_rows():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(50, 12, generator=g, dtype=torch.float64) * torch.rand(50, 1, generator=g, dtype=torch.float64) * 0.3
    out = project_l1_ball(v, 0.99)
    norms_in, norms_out = v.abs().sum(1), out.abs().sum(1)
    assert torch.all(norms_out <= 0.99 + 1e-12)
    inside = norms_in <= 0.99
    assert inside.any() and (~inside).any()
    assert torch.equal(out[inside], v[inside])
    # rows outside land on the sphere and keep their signs
    assert torch.allclose(norms_out[~inside], torch.full_like(norms_out[~inside], 0.99), atol=1e-12)
    assert torch.all(out * v >= 0)


def test_projection_per_row_radius_inf_and_zero():
    v = torch.tensor([[3.0, -4.0], [3.0, -4.0], [3.0, -4.0]], dtype=torch.float64)
    out = project_l1_ball(v, torch.tensor([float("inf"), 0.0, 1.0], dtype=torch.float64))
    assert torch.equal(out[0], v[0])
    assert torch.equal(out[1], torch.zeros(2, dtype=torch.float64))
    # closed form: soft-threshold at θ = 3 → (0, -1)
    assert torch.allclose(out[2], torch.tensor([0.0, -1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="non-negative"):
        project_l1_ball(v, -1.0)


def test_projection_is_nearest_point_against_cvxpy():
    cp = pytest.importorskip("cvxpy")
    rng = np.random.default_rng(1)
    for trial in range(4):
        v = rng.normal(size=9) * (0.3 + trial)
        radius = 0.99
        a = cp.Variable(9)
        cp.Problem(cp.Minimize(cp.sum_squares(a - v)), [cp.norm1(a) <= radius]).solve(solver="CLARABEL")
        ours = project_l1_ball(torch.from_numpy(v), radius).numpy()
        assert np.abs(ours).sum() <= radius + 1e-12
        np.testing.assert_allclose(ours, a.value, atol=1e-6)
        # optimality: no feasible random point is closer than ours
        d_ours = np.sum((ours - v) ** 2)
        cand = project_l1_ball(torch.from_numpy(rng.normal(size=(200, 9))), radius).numpy()
        assert np.all(np.sum((cand - v) ** 2, axis=1) >= d_ours - 1e-12)


def test_model_project_wellposed():
    torch.manual_seed(0)
    m = ImplicitModel(20, 5, 3, kappa=0.9, dtype=torch.float64)
    with torch.no_grad():
        m.A.normal_()
    assert m.inf_norm() > 0.9 and not m.is_wellposed()
    before = m.A.detach().clone()
    m.project_wellposed()
    assert m.inf_norm() <= 0.9 + 1e-12 and m.is_wellposed()
    assert torch.allclose(m.A.detach(), project_l1_ball(before, 0.9))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"kappa": 1.0}, "kappa"), ({"phi": "sigmoidal"}, "relu"), ({"init": "ones"}, "zeros"), ({"n": 0}, "n must")],
)
def test_model_validates_options(kwargs, match):
    base = {"n": 4, "p": 3, "q": 2}
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ImplicitModel(**base)
    with pytest.raises(ValueError, match="criterion"):
        ImplicitModel(4, 3, 2).is_wellposed("spectral")
