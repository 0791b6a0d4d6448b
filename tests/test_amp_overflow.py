"""fp16 loss scaling and the DEQ backward's NaN/Inf checks: an overflow is the scaler's to skip.

Under a ``GradScaler`` an overflowing scaled gradient is expected: the scaler finds NaN/Inf,
skips the step and halves its scale. Inside ``loss_scaled_backward()`` (the trainer enters it
around its scaled backward) a DEQ's backward meeting NaN/Inf returns a NaN adjoint instead of
raising; outside it, the same non-finite gradient still raises ``NonFiniteError``.

Runs on CPU: ``torch.amp.GradScaler("cpu")`` scales float32 gradients just as on CUDA; the
overflow is either injected into the gradient arriving at the DEQ (a pre-hook on the head) or
real (a scale of 2**100 overflows the float32 adjoint solve of ``Exact``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from deqkit import SHINE, Broyden, Exact, JacobianFree, Neumann, Unrolled
from deqkit.errors import NonFiniteError
from deqkit.estimators import Adaptive, loss_scaled_backward, loss_scaling_active
from deqkit.models import DEQClassifier
from deqkit.train import TrainConfig, Trainer
from deqkit.train.precision import scaled_backward, scaler_step

pytestmark = pytest.mark.usefixtures("one_thread")

ESTIMATORS = {
    "exact": lambda: Exact(on_failure="ignore"),
    "exact-raise": lambda: Exact(on_failure="raise"),
    "shine": SHINE,
    "jfb": JacobianFree,
    "neumann": lambda: Neumann(k=3),
    "unrolled": lambda: Unrolled(k=3),
    "adaptive": lambda: Adaptive(check_every=1),
}
#: backpropagate through their unrolled steps: no hook, NaN/Inf propagates into the gradients (never a
#: finite wrong number, tests/faults), which is what the scaler needs and what the trainer's next loss check sees
UNROLLED = ("jfb", "unrolled")
HOOKED = sorted(set(ESTIMATORS) - set(UNROLLED))


class _Poison(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by Inf while ``armed`` (an overflow)."""

    armed = False

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return z.view_as(z)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return g * float("inf") if _Poison.armed else g


@pytest.fixture(autouse=True)
def _disarmed():
    _Poison.armed = False
    yield
    _Poison.armed = False


def _model(grad: str, poison: bool = True) -> DEQClassifier:
    torch.manual_seed(0)
    model = DEQClassifier.mlp(
        64,
        32,
        10,
        init_scale=0.25,
        solver=Broyden(memory=20, tol=1e-4, max_iter=30),
        grad=ESTIMATORS[grad](),
        on_failure="ignore",
    )
    if poison:  # the gradient arriving at z* (the DEQ's output) passes through _Poison
        model.head.register_forward_pre_hook(lambda mod, args: (_Poison.apply(args[0]),))
    return model.train()


def _batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    from deqkit.data import load_dataset

    x, y = load_dataset("digits", seed=0).train[:n]
    return x.float(), y


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("grad", sorted(ESTIMATORS))
def test_overflow_under_the_scaler_is_skipped_then_training_continues(grad: str) -> None:
    model = _model(grad)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1000)
    x, y = _batch()
    before = _params(model)

    _Poison.armed = True
    scaled_backward(scaler, F.cross_entropy(model(x), y))  # must not raise
    assert not loss_scaling_active()
    assert model.last_info.backward is not None and model.last_info.backward.overflow == (grad in HOOKED)
    assert scaler_step(scaler, opt) is True, "the scaler must see the overflow and skip the step"
    assert _same(before, _params(model)), "a skipped step must leave the parameters unchanged"
    assert scaler.get_scale() == 2.0**15

    _Poison.armed = False
    opt.zero_grad(set_to_none=True)
    scaled_backward(scaler, F.cross_entropy(model(x), y))
    assert not model.last_info.backward.overflow
    assert scaler_step(scaler, opt) is False
    assert not _same(before, _params(model)), "the next, finite step must update the parameters"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert scaler.get_scale() == 2.0**15


@pytest.mark.parametrize("grad", HOOKED)
def test_the_same_nonfinite_gradient_without_a_scaler_still_raises(grad: str) -> None:
    model = _model(grad)
    x, y = _batch()
    _Poison.armed = True
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        F.cross_entropy(model(x), y).backward()


def test_a_real_overflow_of_the_adjoint_solve_is_skipped_and_raises_without_the_scaler() -> None:
    # no injection: a scale of 2**100 makes the float32 adjoint residual norms overflow in Exact's solve
    x, y = _batch()
    model = _model("exact", poison=False)
    with pytest.raises(NonFiniteError, match="adjoint solve produced NaN/Inf"):
        (F.cross_entropy(model(x), y) * 2.0**100).backward()

    model = _model("exact", poison=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100, growth_interval=1000)
    before = _params(model)
    scaled_backward(scaler, F.cross_entropy(model(x), y))
    assert model.last_info.backward.overflow
    assert scaler_step(scaler, opt) is True
    assert _same(before, _params(model)) and scaler.get_scale() == 2.0**99


def test_the_loss_scaling_flag_is_scoped() -> None:
    assert not loss_scaling_active()
    with pytest.raises(RuntimeError):
        with loss_scaled_backward():
            with loss_scaled_backward():
                assert loss_scaling_active()
            assert loss_scaling_active()
            raise RuntimeError("boom")
    assert not loss_scaling_active()


# -- the trainer ---------------------------------------------------------------------------------
def _trainer(grad: str, scaler: bool, tmp_path, **kw) -> Trainer:
    from deqkit.data import load_dataset

    x, y = load_dataset("digits", seed=0).train[:48]
    cfg = TrainConfig(
        epochs=1, batch_size=16, lr=1e-2, progress=False, seed=0, device="cpu", log_path=str(tmp_path / "log.jsonl"), **kw
    )
    trainer = Trainer(_model(grad), TensorDataset(x.float(), y), None, cfg)
    if scaler:  # fp16 is CUDA-only; the CPU GradScaler drives the same code path on float32 gradients
        trainer._scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1000)
    return trainer


class _FirstStepOverflows:
    """Arms the poison for the first training forward only; snapshots the parameters after step 1."""

    def __init__(self, trainer: Trainer) -> None:
        self.calls, self.after_first = 0, None
        trainer.model.register_forward_pre_hook(self._pre)
        trainer.callbacks.append(self)

    def _pre(self, mod, args) -> None:
        if mod.training:
            self.calls += 1
            _Poison.armed = self.calls == 1

    def on_step_end(self, trainer: Trainer, step: dict) -> None:
        if step["global_step"] == 1:
            self.after_first = (_params(trainer.model), step["amp_skipped"])

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        pass


@pytest.mark.parametrize("grad", ["exact", "shine"])
def test_trainer_skips_and_counts_an_overflowed_step(grad: str, tmp_path) -> None:
    import json

    from deqkit.cli.train import epoch_line

    trainer = _trainer(grad, scaler=True, tmp_path=tmp_path, grad_clip=1.0)
    before = _params(trainer.model)
    probe = _FirstStepOverflows(trainer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hist = trainer.fit()
    # the schedule follows the step count; torch's "scheduler before optimizer" note is no news here
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert probe.after_first is not None
    params_1, skipped_1 = probe.after_first
    assert skipped_1 == 1 and _same(before, params_1), "the overflowed first step must be skipped"
    assert hist[0]["steps"] == 3 and hist[0]["amp_skipped"] == 1
    assert trainer._scaler.get_scale() == 2.0**15
    assert not _same(before, _params(trainer.model)), "training must continue after the skipped step"
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["amp_skipped"] == 1
    assert "amp skipped 1/3 steps" in epoch_line(hist[0], 1)


def test_trainer_without_a_scaler_reports_the_same_gradient(tmp_path) -> None:
    trainer = _trainer("exact", scaler=False, tmp_path=tmp_path)
    _FirstStepOverflows(trainer)
    with pytest.raises(NonFiniteError, match="incoming gradient"):
        trainer.fit()


def test_trainer_without_overflow_counts_nothing(tmp_path) -> None:
    from deqkit.cli.train import epoch_line

    hist = _trainer("jfb", scaler=True, tmp_path=tmp_path).fit()
    assert hist[0]["amp_skipped"] == 0 and "amp skipped" not in epoch_line(hist[0], 1)
