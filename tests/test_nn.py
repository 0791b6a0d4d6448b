"""deqkit.nn: norm helpers computed once per DEQ call and deep-copy safe; variational dropout with
one mask per call."""

import copy
import math

import pytest
import torch
from torch import nn

from deqkit import DEQ, Anderson, Exact
from deqkit.errors import OptionError
from deqkit.models import DEQClassifier, MLPCell
from deqkit.nn import VariationalDropout, apply_spectral_norm, apply_weight_norm


class _DropCell(nn.Module):
    """f(z, x) = tanh(drop(W z) + x), float64."""

    def __init__(self, d=6, p=0.3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin = nn.Linear(d, d, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.lin.weight.copy_(0.6 * torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d))
        self.drop = VariationalDropout(p, per_channel=False)

    def forward(self, z, x):
        return torch.tanh(self.drop(self.lin(z)) + x)


class _MaskedCell(nn.Module):
    """The same map with a fixed mask (the reference)."""

    def __init__(self, lin, mask):
        super().__init__()
        self.lin, self.mask = lin, mask

    def forward(self, z, x):
        return torch.tanh(self.lin(z) * self.mask + x)


def _record_masks(drop):
    seen = []
    drop.register_forward_hook(lambda m, a, out: seen.append(m.mask))
    return seen


def test_variational_dropout_one_mask_per_call_same_in_backward():
    torch.manual_seed(0)
    cell = _DropCell()
    deq = DEQ(cell, Anderson(tol=1e-11, max_iter=200), Exact())
    deq.train()
    seen = _record_masks(cell.drop)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    z, info = deq(x)
    assert info.converged.all()
    assert len(seen) > 5 and all(m is seen[0] for m in seen), "the mask changed within one DEQ call"
    assert cell.drop.n_masks == 1
    mask = seen[0].clone()
    assert (mask == 0).any() and (mask != 0).any()
    loss = (z.sin() * torch.arange(6)).sum()
    gW, gx = torch.autograd.grad(loss, [cell.lin.weight, x])
    assert all(m is seen[0] for m in seen), "the backward drew a new mask"
    # the reference: the same map with the mask fixed, solved and differentiated exactly
    ref_cell = _MaskedCell(cell.lin, mask)
    ref = DEQ(ref_cell, Anderson(tol=1e-11, max_iter=200), Exact())
    x2 = x.detach().clone().requires_grad_()
    zr, _ = ref(x2)
    torch.testing.assert_close(z, zr, rtol=0, atol=1e-9)
    rW, rx = torch.autograd.grad((zr.sin() * torch.arange(6)).sum(), [cell.lin.weight, x2])
    torch.testing.assert_close(gW, rW, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(gx, rx, rtol=1e-7, atol=1e-9)
    # a new call draws a new mask
    deq(x)
    assert cell.drop.n_masks == 2 and not torch.equal(seen[-1], mask)


def test_variational_dropout_eval_is_identity_and_options():
    drop = VariationalDropout(0.5)
    drop.eval()
    x = torch.randn(3, 4, 5, 5)
    assert torch.equal(drop(x), x) and drop.n_masks == 0
    drop.train()
    y = drop(x)
    assert drop.mask.shape == (3, 4, 1, 1)  # per channel
    assert torch.equal(drop(x), y)  # no reset: same mask
    drop.reset_per_call()
    drop(x)
    assert drop.n_masks == 2
    with pytest.raises(OptionError, match="p"):
        VariationalDropout(1.0)
    with pytest.raises(OptionError, match="Did you mean 'p'"):
        VariationalDropout(pp=0.1)
    assert copy.deepcopy(drop).mask is None


def _count_parametrization_calls(module):
    counts = []
    for m in module.modules():
        if hasattr(m, "parametrizations") and "weight" in m.parametrizations:
            box = [0]
            m.parametrizations.weight[0].register_forward_hook(lambda *a, box=box: box.__setitem__(0, box[0] + 1))
            counts.append(box)
    return counts


@pytest.mark.parametrize("norm", ["weight", "spectral"])
def test_norms_are_computed_once_per_deq_call(norm):
    torch.manual_seed(0)
    cell = MLPCell(8, norm=None)
    apply_weight_norm(cell) if norm == "weight" else apply_spectral_norm(cell, scale=0.9)
    deq = DEQ(cell, Anderson(tol=1e-5, max_iter=60), Exact())
    deq.train()
    counts = _count_parametrization_calls(cell)
    assert len(counts) == 1
    u = torch.randn(4, 8)
    z, info = deq(u)
    assert int(info.nstep.max()) > 3
    z.square().sum().backward()
    assert counts[0][0] == 1, f"the {norm}-normalised weight was computed {counts[0][0]} times in one call"
    deq(u)
    assert counts[0][0] == 2


def test_spectral_norm_scale_and_named_submodules():
    torch.manual_seed(0)
    cell = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
    apply_spectral_norm(cell, ["0"], scale=0.5, n_power_iterations=50)
    cell.train()
    for _ in range(5):
        w = cell[0].weight
    assert torch.linalg.matrix_norm(w.detach(), ord=2) == pytest.approx(0.5, rel=1e-3)
    assert not hasattr(cell[2], "parametrizations")
    with pytest.raises(OptionError, match="unknown submodule '3'. Valid submodules: 0, 2"):
        apply_weight_norm(cell, ["3"])
    with pytest.raises(OptionError, match="already normalised"):
        apply_weight_norm(cell, ["0"])
    with pytest.raises(OptionError, match="no weight"):
        apply_weight_norm(cell, ["1"])


def test_deepcopy_of_a_normed_model():
    torch.manual_seed(0)
    model = DEQClassifier.mdeq((1, 8, 8), 10, channels=(8, 16), solver=Anderson(tol=1e-6, max_iter=60), dropout=0.1)
    assert any(hasattr(m, "parametrizations") for m in model.modules())
    x = torch.randn(3, 1, 8, 8)
    twin = copy.deepcopy(model)
    model.eval(), twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    # independent parameters: changing the copy leaves the original alone (an EMA copy)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.9)
        before = model(x)
    name = next(n for n, _ in model.named_parameters() if "original0" in n)
    assert not torch.equal(dict(model.named_parameters())[name], dict(twin.named_parameters())[name])
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    # the copy trains, and its normalised weights follow its own parameters
    twin.train()
    nn.functional.cross_entropy(twin(x), torch.tensor([1, 2, 3])).backward()
    assert all(p.grad is not None for p in twin.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters())
    # state dicts round-trip between the two
    model.load_state_dict(twin.state_dict())
