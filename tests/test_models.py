"""DEQ cells and classifiers: shapes, convergence at initialisation, gradient flow, options."""

import pytest
import torch

from deqkit import DEQ, Anderson, DEQInfo, Exact, Unrolled
from deqkit.models import ConvCell, DEQClassifier, MLPCell

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: a second thread only adds contention


def _mlp(grad=None, **kw):
    torch.manual_seed(0)
    return DEQClassifier.mlp(20, 32, 5, solver=Anderson(tol=1e-4, max_iter=40), grad=grad, **kw)


def _conv(grad=None, shape=(1, 8, 8), channels=8, **kw):
    torch.manual_seed(0)
    return DEQClassifier.conv(shape, channels, 5, groups=4, solver=Anderson(tol=1e-4, max_iter=40), grad=grad, **kw)


def test_mlp_classifier_shapes_and_info():
    model = _mlp()
    x = torch.randn(7, 20)
    logits = model(x)
    assert logits.shape == (7, 5)
    assert isinstance(model.last_info, DEQInfo)
    assert model.last_info.nstep.shape == (7,)
    logits2, info = model(x, return_info=True)
    assert info is model.last_info
    torch.testing.assert_close(logits, logits2)
    # image-shaped inputs are flattened by the injection
    assert model(torch.randn(3, 4, 5)).shape == (3, 5)


def test_conv_classifier_shapes():
    model = _conv()
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 5)
    assert model(torch.randn(3, 64)).shape == (3, 5)  # flat inputs are reshaped to (1, 8, 8)
    big = _conv(shape=(1, 28, 28))
    logits, info = big(torch.randn(2, 1, 28, 28), return_info=True)
    assert logits.shape == (2, 5)
    assert info.converged.all()
    with pytest.raises(ValueError, match="expected inputs of shape"):
        model(torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("norm", ["layer", "group", None])
def test_mlp_deq_converges_at_init(norm):
    model = _mlp(norm=norm, on_failure="ignore")
    _, info = model(torch.randn(128, 20), return_info=True)
    assert info.converged.float().mean() >= 0.95
    # the batch iterates until its last sample converges; each sample's own first step under tol:
    assert info.forward.stop_mode == "rel"
    under = info.forward.rel_trace <= info.forward.tol
    first = torch.where(under.any(0), under.float().argmax(0) + 1, under.shape[0])
    assert first.float().mean() < 25


def test_conv_deq_converges_at_init():
    model = _conv()
    _, info = model(torch.randn(16, 1, 8, 8), return_info=True)
    assert info.converged.float().mean() >= 0.95


@pytest.mark.parametrize("kind", ["mlp", "mlp-hidden-wn", "mlp-sn", "conv"])
@pytest.mark.parametrize("grad", [Exact(), Unrolled(5, 0.5)], ids=["exact", "unrolled"])
def test_gradients_reach_every_parameter(kind, grad):
    if kind == "mlp":
        model, x = _mlp(grad), torch.randn(16, 20)
    elif kind == "mlp-hidden-wn":
        model, x = _mlp(grad, hidden=24, weight_norm=True), torch.randn(16, 20)
    elif kind == "mlp-sn":
        model, x = _mlp(grad, spectral_norm=True, norm=None), torch.randn(16, 20)
    else:
        model, x = _conv(grad), torch.randn(6, 1, 8, 8)
    y = torch.randint(0, 5, (x.shape[0],))
    x.requires_grad_()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert model.last_info.backward is not None
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_exact_gradient_matches_finite_differences_float64():
    torch.manual_seed(0)
    model = DEQClassifier.mlp(
        6, 8, 3, solver=Anderson(tol=1e-12, max_iter=200), grad=Exact(tol=1e-12, max_iter=200), init_scale=0.5
    ).double()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    w = model.cell.linear.weight

    def loss():
        return torch.nn.functional.cross_entropy(model(x), y)

    loss().backward()
    g = w.grad[0, :3].clone()
    eps = 1e-6
    for j in range(3):
        with torch.no_grad():
            w[0, j] += eps
            lp = loss().item()
            w[0, j] -= 2 * eps
            lm = loss().item()
            w[0, j] += eps
        assert abs((lp - lm) / (2 * eps) - g[j].item()) < 1e-6 * max(1.0, abs(g[j].item()))


def test_spectral_norm_keeps_the_weight_contractive():
    torch.manual_seed(0)
    cell = MLPCell(16, spectral_norm=True, spectral_scale=0.8, norm=None)
    opt = torch.optim.SGD(cell.parameters(), lr=1.0)
    for _ in range(5):  # large steps that would blow up an unconstrained weight
        z, u = torch.randn(8, 16), torch.randn(8, 16)
        opt.zero_grad()
        (-cell(z, u).pow(2).sum()).backward()
        opt.step()
    with torch.no_grad():
        cell(torch.zeros(1, 16), torch.zeros(1, 16))  # one more power iteration
        sigma = torch.linalg.matrix_norm(cell.linear.linear.weight * cell.linear.scale, ord=2)
    assert abs(sigma.item() - 0.8) < 0.05


def test_mlp_cell_with_its_own_injection_in_a_plain_deq():
    torch.manual_seed(0)
    cell = MLPCell(12, input_dim=5)
    deq = DEQ(cell, Anderson(tol=1e-6, max_iter=60), state_shape=(12,))
    x = torch.randn(9, 5)
    z, info = deq(x)
    assert z.shape == (9, 12) and info.converged.all()
    with torch.no_grad():
        torch.testing.assert_close(cell(z, x), z, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="injection has shape"):
        MLPCell(12)(torch.zeros(2, 12), torch.zeros(2, 5))


def test_options_are_validated():
    with pytest.raises(ValueError, match="Valid options.*width"):
        MLPCell(8, widht=3)
    with pytest.raises(ValueError, match="norm"):
        MLPCell(8, norm="batch")
    with pytest.raises(ValueError, match="groups"):
        MLPCell(10, norm="group", groups=4)
    with pytest.raises(ValueError, match="activation"):
        MLPCell(8, activation="sigmoid")
    with pytest.raises(ValueError, match="spectral_scale"):
        MLPCell(8, spectral_norm=True, spectral_scale=1.5)
    with pytest.raises(ValueError, match="groups"):
        ConvCell(10, groups=4)
    with pytest.raises(ValueError, match="odd"):
        ConvCell(8, kernel_size=4)
    with pytest.raises(ValueError, match="Valid options.*solver"):
        DEQClassifier.mlp(4, 8, 2, solvr=Anderson())
    with pytest.raises(ValueError, match="input_shape"):
        DEQClassifier.conv((28, 28), 8, 10)
    with pytest.raises(ValueError, match="nn.Module"):
        DEQClassifier(MLPCell(4), lambda x: x, torch.nn.Linear(4, 2))


def test_eval_mode_uses_eval_max_iter():
    model = _mlp(eval_max_iter=2, on_failure="ignore").eval()
    with torch.no_grad():
        _, info = model(torch.randn(8, 20), return_info=True)
    assert int(info.nstep.max()) <= 2


def test_target_feeds_the_loss_to_an_outer_problem_aware_solver():
    from deqkit import Broyden

    torch.manual_seed(0)
    model = DEQClassifier.mlp(20, 16, 5, solver=Broyden(memory=20, opa_freq=2, tol=1e-6, max_iter=20), grad=Unrolled(2, 0.5))
    calls = {"n": 0}
    model.head.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    x, y = torch.randn(8, 20), torch.randint(0, 5, (8,))
    with pytest.warns(UserWarning, match="opa_freq set but forward"):  # said once, not silently skipped
        plain = model(x)
    assert calls["n"] == 1
    with_target = model(x, target=y)
    assert calls["n"] > 2  # the solver evaluated the loss during the solve
    torch.testing.assert_close(plain, with_target, atol=1e-4, rtol=1e-4)  # same equilibrium
    model.eval()
    calls["n"] = 0
    model(x, target=y)
    assert calls["n"] == 1  # no outer-problem awareness outside training


def test_spectral_norm_cell_is_one_fixed_map_per_call_and_trains_with_every_estimator():
    """Spectral norm's power iteration runs once per DEQ call (parametrisations cached), so the
    solve sees one map, and the z-graph Exact/Neumann build for their VJPs uses the same weights."""
    import deqkit as dk

    torch.manual_seed(0)
    for est in [dk.Exact(), dk.Neumann(3, 0.5), dk.Unrolled(3, 0.5), dk.SHINE(refine=2)]:
        m = dk.DEQClassifier.mlp(
            16, 32, 4, spectral_norm=True, solver=dk.Broyden(tol=1e-5, max_iter=60), grad=est, on_failure="ignore"
        )
        m.train()
        x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
        for _ in range(2):
            m.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            grads = [p.grad for p in m.parameters() if p.requires_grad]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
