"""Trainer: config validation, exact resume, atomic checkpoints, Ctrl-C, metrics, a real run."""

import json
import os
import signal
import warnings

import pytest
import torch
from conftest import NaNGradient

from deqkit import Anderson, ConvergenceWarning, Exact, NonFiniteError, Unrolled
from deqkit.cli.train import epoch_line
from deqkit.data import load_dataset
from deqkit.models import DEQClassifier
from deqkit.train import CHECKPOINT_NAME, Callback, TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: a second thread only adds contention


@pytest.fixture(scope="module")
def tiny():
    return load_dataset("digits", subset=200)  # 200 train (7 steps of 32), 22 val


def _model(seed=0, grad=None):
    torch.manual_seed(seed)
    return DEQClassifier.mlp(64, 32, 10, solver=Anderson(tol=1e-4, max_iter=30), grad=grad or Unrolled(5, 0.5))


def _cfg(tmp_path, **kw):
    base = dict(epochs=2, batch_size=32, lr=3e-3, seed=3, progress=False, checkpoint_dir=str(tmp_path / "ckpt"))
    base.update(kw)
    return TrainConfig(**base)


def _assert_same_weights(a, b, atol=1e-6):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=0, msg=k)


class _InterruptAt(Callback):
    def __init__(self, *, step=None, epoch=None):
        self.step, self.epoch = step, epoch

    def on_step_end(self, trainer, step):
        if step["global_step"] == self.step:
            raise KeyboardInterrupt

    def on_epoch_end(self, trainer, record):
        if record["epoch"] == self.epoch:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """An uninterrupted 2-epoch run: its weights and history."""
    tmp = tmp_path_factory.mktemp("ref")
    model = _model()
    history = Trainer(model, tiny.train, tiny.val, _cfg(tmp)).fit()
    return model, history


# -- config ------------------------------------------------------------------------------------


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match=r"Valid options: epochs, batch_size.*Did you mean 'epochs'"):
        TrainConfig(epoch=3)
    with pytest.raises(ValueError, match="Valid options"):
        TrainConfig.from_dict({"lr": 1e-3, "learning_rate": 1e-3})
    for bad, pattern in [
        (dict(epochs=0), "epochs"),
        (dict(batch_size=2.5), "batch_size"),
        (dict(lr=-1.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(optimizer="adma"), "'adam', 'adamw', 'sgd'.*Did you mean 'adam'"),
        (dict(schedule="linear"), "'cosine', 'none'"),
        (dict(device="gpu"), "device"),
        (dict(progress="yes"), "progress"),
        (dict(max_steps=0), "max_steps"),
        (dict(grad_clip=0.0), "grad_clip"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            TrainConfig(**bad)
    cfg = TrainConfig.from_dict({"epochs": 3, "optimizer": "SGD", "checkpoint_dir": None})
    assert cfg.optimizer == "sgd" and TrainConfig.from_dict(cfg.to_dict()) == cfg


# -- resume ------------------------------------------------------------------------------------


def test_resume_after_epoch_equals_uninterrupted_run(tiny, tmp_path, reference):
    ref_model, ref_hist = reference
    cfg = _cfg(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_model(), tiny.train, tiny.val, cfg, callbacks=[_InterruptAt(epoch=1)]).fit()
    ckpt = torch.load(tmp_path / "ckpt" / CHECKPOINT_NAME, weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"], len(ckpt["history"])) == (1, 0, 1)
    fresh = _model(seed=123)  # different init: everything must come from the checkpoint
    hist = Trainer(fresh, tiny.train, tiny.val, cfg).fit(resume=True)
    _assert_same_weights(fresh, ref_model)
    assert [h["epoch"] for h in hist] == [1, 2]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "fwd_steps", "global_step", "lr"):
        assert [h[key] for h in hist] == pytest.approx([h[key] for h in ref_hist], abs=1e-6), key


def test_one_epoch_then_a_new_trainer_for_one_more(tiny, tmp_path):
    # extending a finished run: no schedule, so 1 + 1 epochs == 2 epochs
    straight = _model()
    Trainer(straight, tiny.train, None, _cfg(tmp_path / "a", schedule="none")).fit()
    first = _model()
    Trainer(first, tiny.train, None, _cfg(tmp_path / "b", schedule="none", epochs=1)).fit()
    second = _model(seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # changing only `epochs` without a schedule is exact: no warning
        hist = Trainer(second, tiny.train, None, _cfg(tmp_path / "b", schedule="none", epochs=2)).fit(resume=True)
    assert len(hist) == 2
    _assert_same_weights(second, straight)


def test_keyboard_interrupt_mid_epoch_saves_and_resume_continues(tiny, tmp_path, reference):
    ref_model, _ = reference
    cfg = _cfg(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_model(), tiny.train, tiny.val, cfg, callbacks=[_InterruptAt(step=10)]).fit()
    ckpt = torch.load(tmp_path / "ckpt" / CHECKPOINT_NAME, weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["global_step"]) == (1, 3, 10)  # 7 steps per epoch
    fresh = _model(seed=99)
    hist = Trainer(fresh, tiny.train, tiny.val, cfg).fit(resume=True)
    assert len(hist) == 2 and hist[-1]["global_step"] == 14
    _assert_same_weights(fresh, ref_model)


def test_interrupt_inside_the_forward_pass_keeps_the_last_completed_step(tiny, tmp_path, reference, monkeypatch):
    ref_model, _ = reference
    cfg = _cfg(tmp_path)
    model = _model()
    calls = {"n": 0}
    forward = type(model).forward

    def flaky_forward(self, x, return_info=False):
        if self.training:
            calls["n"] += 1
            if calls["n"] == 5:  # during the 5th training step, before any update
                raise KeyboardInterrupt
        return forward(self, x, return_info)

    monkeypatch.setattr(type(model), "forward", flaky_forward)
    with pytest.raises(KeyboardInterrupt):
        Trainer(model, tiny.train, tiny.val, cfg).fit()
    monkeypatch.undo()
    ckpt = torch.load(tmp_path / "ckpt" / CHECKPOINT_NAME, weights_only=True)
    assert ckpt["global_step"] == 4
    fresh = _model(seed=5)
    Trainer(fresh, tiny.train, tiny.val, cfg).fit(resume=True)
    _assert_same_weights(fresh, ref_model)


def test_sigint_is_deferred_to_the_step_boundary(tiny, tmp_path, reference):
    ref_model, _ = reference
    cfg = _cfg(tmp_path)

    class SendSigint(Callback):
        def on_step_end(self, trainer, step):
            if step["global_step"] == 2:
                os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN under nohup / a background job
    with pytest.raises(KeyboardInterrupt):
        Trainer(_model(), tiny.train, tiny.val, cfg, callbacks=[SendSigint()]).fit()
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    ckpt = torch.load(tmp_path / "ckpt" / CHECKPOINT_NAME, weights_only=True)
    assert ckpt["global_step"] == 2
    fresh = _model(seed=1)
    Trainer(fresh, tiny.train, tiny.val, cfg).fit(resume=True)
    _assert_same_weights(fresh, ref_model)


def test_resume_checks(tiny, tmp_path):
    with pytest.raises(ValueError, match="checkpoint_dir"):
        Trainer(_model(), tiny.train, None, _cfg(tmp_path, checkpoint_dir=None)).fit(resume=True)
    cfg = _cfg(tmp_path, epochs=1)
    Trainer(_model(), tiny.train, None, cfg).fit()
    small = torch.utils.data.TensorDataset(*(t[:100] for t in tiny.train.tensors))
    with pytest.raises(ValueError, match="200 samples"):
        Trainer(_model(), small, None, cfg).fit(resume=True)
    with pytest.warns(UserWarning, match="changed settings.*lr"):
        Trainer(_model(), tiny.train, None, _cfg(tmp_path, epochs=1, lr=1e-2)).fit(resume=True)
    with pytest.warns(UserWarning, match="no checkpoint"):
        Trainer(_model(), tiny.train, None, _cfg(tmp_path / "new", epochs=1)).fit(resume=True)


# -- checkpoint atomicity --------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["replace", "partial-write"])
def test_failed_checkpoint_write_keeps_the_previous_one(tiny, tmp_path, monkeypatch, failure):
    cfg = _cfg(tmp_path, epochs=1)
    trainer = Trainer(_model(), tiny.train, None, cfg)
    trainer.fit()
    ckpt_dir = tmp_path / "ckpt"
    before = (ckpt_dir / CHECKPOINT_NAME).read_bytes()
    # change the state so a successful write would differ
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)

    if failure == "replace":

        def broken_replace(src, dst):
            raise OSError("disk full (simulated)")

        monkeypatch.setattr("os.replace", broken_replace)
    else:
        real_save = torch.save

        def crash_mid_write(obj, f, *a, **k):
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError("killed mid-write (simulated)")

        monkeypatch.setattr(torch, "save", crash_mid_write)
        assert real_save is not torch.save
    with pytest.raises(OSError, match="simulated"):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert sorted(os.listdir(ckpt_dir)) == [CHECKPOINT_NAME]  # no temp file left behind
    assert (ckpt_dir / CHECKPOINT_NAME).read_bytes() == before
    ckpt = torch.load(ckpt_dir / CHECKPOINT_NAME, weights_only=True)
    assert ckpt["epoch"] == 1


# -- metrics, logging, non-convergence ------------------------------------------------------------


def test_nonconvergence_is_counted_not_warned(tiny, tmp_path):
    torch.manual_seed(0)
    grad = Exact(max_iter=2, tol=1e-10, unconverged="exact")  # solve the adjoint even where the forward failed
    model = DEQClassifier.mlp(64, 32, 10, solver=Anderson(tol=1e-10, max_iter=3), grad=grad)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        trainer = Trainer(model, tiny.train, tiny.val, _cfg(tmp_path, epochs=1, checkpoint_dir=None))
        (rec,) = trainer.fit()
        ev = trainer.evaluate(tiny.val)
    assert rec["fwd_unconverged"] == 200 and rec["fwd_converged"] == 0.0
    assert rec["bwd_unconverged"] == 200
    assert rec["val_fwd_unconverged"] == len(tiny.val) == ev["fwd_unconverged"]
    assert rec["fwd_steps"] == 3.0
    assert rec["bwd_amplification"] is not None and rec["bwd_amplification"] > 1.0  # Exact on a contractive cell
    assert rec["bwd_fallback"] == 0
    # the model's own policies are restored after training
    policy = getattr(model.deq, "on_failure", None) or model.deq.on_nonconvergence  # the DEQ's name before/after the rename
    assert policy == "warn" and model.deq.grad.on_failure == "warn"


def test_exact_falls_back_to_jacobian_free_where_the_forward_failed_and_counts_it(tiny, tmp_path):
    """Exact gives ``w = v`` to samples whose forward missed its tolerance by more than
    ``fallback_error`` (estimated): every one here, and the epoch counts them."""
    torch.manual_seed(0)
    grad = Exact(max_iter=2, tol=1e-10, fallback_error=1e-12)
    model = DEQClassifier.mlp(64, 32, 10, solver=Anderson(tol=1e-10, max_iter=3), grad=grad)
    (rec,) = Trainer(model, tiny.train, tiny.val, _cfg(tmp_path, epochs=1, checkpoint_dir=None)).fit()
    assert rec["fwd_unconverged"] == 200 and rec["bwd_fallback"] == 200
    assert rec["bwd_amplification"] == pytest.approx(1.0)  # w = v
    assert "bwd fallback 200" in epoch_line(rec, 1)


def test_max_steps_and_eval_every(tiny, tmp_path):
    trainer = Trainer(_model(), tiny.train, tiny.val, _cfg(tmp_path, epochs=5, max_steps=9, eval_every=3))
    hist = trainer.fit()
    assert [h["global_step"] for h in hist] == [7, 9]
    assert hist[0]["val_acc"] is None and hist[1]["val_acc"] is not None  # the last epoch is evaluated
    assert hist[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine reaches 0 at max_steps


def test_digits_training_reaches_good_accuracy_and_logs_json_lines(tmp_path):
    # Checked on seeds 0, 1, 2 (5 epochs): test accuracy 0.970 / 0.967 / 0.974 with Unrolled(5, 0.5)
    # and 0.967 / 0.963 / 0.978 with Exact; chance is 0.1.
    splits = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    model = DEQClassifier.mlp(64, 64, 10, solver=Anderson(tol=1e-4, max_iter=30), grad=Unrolled(5, 0.5))
    log = tmp_path / "metrics.jsonl"
    cfg = TrainConfig(epochs=5, batch_size=64, lr=3e-3, seed=0, progress=False, log_path=str(log))
    trainer = Trainer(model, splits.train, splits.val, cfg)
    hist = trainer.fit()
    test = trainer.evaluate(splits.test)
    assert test["acc"] >= 0.85, test
    assert test["n"] == len(splits.test) and test["fwd_converged"] >= 0.9
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 5 and [r["epoch"] for r in lines] == [1, 2, 3, 4, 5]
    assert lines == json.loads(json.dumps(hist))
    last = lines[-1]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "fwd_steps", "fwd_converged", "bwd_ms", "fwd_ms", "elapsed_s"):
        assert isinstance(last[key], float), key
    assert last["fwd_converged"] >= 0.9 and 1 <= last["fwd_steps"] <= 30
    assert last["train_loss"] < lines[0]["train_loss"]
    assert last["elapsed_s"] >= lines[0]["elapsed_s"] > 0


def test_rng_states_are_restored_for_stochastic_models(tiny, tmp_path):
    # dropout draws from torch's global generator: resume must restore it mid-epoch
    def model(seed):
        torch.manual_seed(seed)
        base = _model(seed)
        base.head = torch.nn.Sequential(torch.nn.Dropout(0.3), base.head)
        return base

    straight = model(0)
    Trainer(straight, tiny.train, None, _cfg(tmp_path / "a")).fit()
    cfg = _cfg(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        Trainer(model(0), tiny.train, None, cfg, callbacks=[_InterruptAt(step=9)]).fit()
    resumed = model(4)
    Trainer(resumed, tiny.train, None, cfg).fit(resume=True)
    _assert_same_weights(resumed, straight)


def test_rng_state_round_trip():
    import random

    import numpy as np

    from deqkit.train.checkpoint import rng_state as _rng_state
    from deqkit.train.checkpoint import set_rng_state as _set_rng_state

    state = _rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    _set_rng_state(state)
    second = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(first[0], second[0])
    assert np.array_equal(first[1], second[1]) and first[2] == second[2]


def test_progress_bar_and_optional_tensorboard(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    cfg = _cfg(tmp_path, epochs=1, max_steps=3, progress=True, checkpoint_dir=None, tensorboard_dir=str(tmp_path / "tb"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hist = Trainer(_model(), tiny.train, tiny.val, cfg).fit()
    assert hist[-1]["global_step"] == 3
    err = capsys.readouterr().err
    assert "epoch 1/1" in err  # the bar was shown (its refresh rate is tqdm's to choose)
    try:
        import torch.utils.tensorboard  # noqa: F401
    except Exception:
        assert any("TensorBoard logging disabled" in str(w.message) for w in caught)
    else:
        assert any((tmp_path / "tb").iterdir())


def test_trainer_passes_labels_for_outer_problem_awareness(tiny):
    from deqkit import Broyden

    torch.manual_seed(0)
    model = DEQClassifier.mlp(64, 16, 10, solver=Broyden(memory=10, opa_freq=2, tol=1e-5, max_iter=10), grad=Unrolled(2, 0.5))
    calls = {"n": 0}
    model.head.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    Trainer(model, tiny.train, None, TrainConfig(epochs=1, max_steps=1, batch_size=32, progress=False)).fit()
    assert calls["n"] > 1


def test_adjoint_time_is_reported_only_where_it_is_measured(tiny, tmp_path):
    # Exact computes w in its own solve (timed); Unrolled's w is autograd's pass: no quiet 0 ms
    exact = Trainer(_model(grad=Exact()), tiny.train, None, _cfg(tmp_path / "e", epochs=1)).fit()[-1]
    unrolled = Trainer(_model(), tiny.train, None, _cfg(tmp_path / "u", epochs=1)).fit()[-1]
    assert exact["adjoint_ms"] is not None and exact["adjoint_ms"] > 0
    assert unrolled["adjoint_ms"] is None and unrolled["bwd_ms"] > 0


def test_resume_with_a_swapped_estimator_warns(tiny, tmp_path):
    cfg = _cfg(tmp_path, epochs=1)
    Trainer(_model(), tiny.train, None, cfg).fit()
    assert torch.load(tmp_path / "ckpt" / CHECKPOINT_NAME, weights_only=True)["deqs"][0].endswith(
        "grad=Unrolled(k=5, damping=0.5)"
    )
    with pytest.warns(UserWarning, match=r"DEQ solver/estimator: .*Unrolled.* -> .*Exact"):
        Trainer(_model(grad=Exact()), tiny.train, None, cfg).fit(resume=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same estimator: no warning
        Trainer(_model(), tiny.train, None, cfg).fit(resume=True)


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_nan_gradients_through_an_unrolled_estimator_stop_training_before_the_update(tiny, tmp_path, grad_clip):
    """``Unrolled`` has no adjoint hook to raise on a NaN backward: the trainer refuses the step."""
    model = _model()
    cell = model.cell
    original = cell.forward
    cell.forward = lambda z, x: original(NaNGradient.apply(z), x)  # finite forward, NaN VJP through z
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, tiny.train, tiny.val, _cfg(tmp_path, epochs=1, checkpoint_dir=None, grad_clip=grad_clip))
    with pytest.raises(NonFiniteError, match=r"gradients contain NaN/Inf at step 1 \(estimator Unrolled\).*not updated"):
        trainer.fit()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the optimiser never stepped on NaN


def test_quiet_deqs_silences_the_estimators_an_adaptive_holds_and_restores_them():
    """Training counts failures instead of warning per batch, also for the exact estimator inside
    ``Adaptive`` (its adjoint misses and Jacobian-free fallbacks); the policies come back after."""
    from deqkit import Adaptive
    from deqkit.train.metrics import quiet_deqs

    inner = Exact(on_failure="raise")
    model = DEQClassifier.mlp(64, 16, 10, grad=Adaptive(exact=inner))
    with quiet_deqs(model):
        assert inner.on_failure == "ignore" and model.deq.grad._exact.on_failure == "ignore"
    assert inner.on_failure == "raise"
