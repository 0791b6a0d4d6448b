"""Mixed precision: bf16 autocast of the DEQ (CPU or ``DEQKIT_TEST_DEVICE``) and the trainer's AMP.

The reference problem is the benchmark's: ``DEQClassifier.mlp(64, 64, 10, init_scale=0.25)`` on a
digits batch of 64, Broyden forward. Under bf16 the forward tolerance is 1e-2 (bf16 resolves about
4e-3 relative; 1e-4 cannot be met); the float32 gradient is solved to 1e-4.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import requires_cuda_run
from torch.utils.data import TensorDataset

from deqkit import SHINE, Broyden, Exact, Unrolled
from deqkit.errors import OptionError
from deqkit.models import DEQClassifier
from deqkit.train import TrainConfig, Trainer

ESTIMATORS = {"exact": lambda: Exact(on_failure="ignore"), "shine": SHINE, "unrolled": lambda: Unrolled(k=5)}


def _digits(device: torch.device, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    from deqkit.data import load_dataset

    x, y = load_dataset("digits", seed=0).train[:n]
    return x.float().to(device), y.to(device)


def _reference(grad: str, tol: float, device: torch.device) -> DEQClassifier:
    torch.manual_seed(0)
    model = DEQClassifier.mlp(
        64, 64, 10, init_scale=0.25, solver=Broyden(memory=30, tol=tol, max_iter=30), grad=ESTIMATORS[grad](), on_failure="ignore"
    )
    return model.to(device).train()


def _gradient(model: DEQClassifier, x: torch.Tensor, y: torch.Tensor, dtype) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return torch.cat([p.grad.flatten().float() for p in model.parameters()])


@pytest.mark.parametrize("grad", sorted(ESTIMATORS))
def test_bf16_autocast_converges_and_keeps_the_gradient_direction(grad: str, test_device: torch.device) -> None:
    x, y = _digits(test_device)
    g32 = _gradient(_reference(grad, 1e-4, test_device), x, y, None)
    model = _reference(grad, 1e-2, test_device)
    g16 = _gradient(model, x, y, torch.bfloat16)
    info = model.last_info
    assert bool(info.converged.all()), info.forward.summary()
    # the tolerance is raised to what bf16 resolves (deqkit.solvers.precision.min_tol), never silently below it
    from deqkit.solvers.precision import min_tol

    assert info.forward.tol == pytest.approx(max(1e-2, min_tol(torch.bfloat16)))
    assert float(info.forward.residual.float().max()) <= info.forward.tol * 1.01
    assert torch.isfinite(g16).all()
    cos = float(g16 @ g32 / (g16.norm() * g32.norm()))
    assert cos >= 0.99, f"{grad}: cosine {cos:.4f} to the float32 gradient"


def test_bf16_autocast_keeps_the_solver_state_in_float32() -> None:
    x, _ = _digits(torch.device("cpu"))
    model = _reference("shine", 1e-2, torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    info = model.last_info
    # the solver's state (Broyden's U, V) is float32; z* comes back in the dtype the cell computes in
    assert info.forward.inverse is not None and info.forward.inverse.dense().dtype == torch.float32
    assert info.forward.z.dtype == torch.bfloat16
    # converged must agree with the residual it reports
    assert bool((info.forward.residual <= info.forward.tol).all()) == bool(info.converged.all())


def _data(n: int = 48) -> TensorDataset:
    from deqkit.data import load_dataset

    x, y = load_dataset("digits", seed=0).train[:n]
    return TensorDataset(x.float(), y)


def _trainer(amp, device: str = "cpu", **kw) -> Trainer:
    model = _reference("exact", 1e-2 if amp else 1e-4, torch.device("cpu"))
    cfg = TrainConfig(epochs=1, batch_size=16, lr=1e-2, progress=False, seed=0, amp=amp, device=device, **kw)
    return Trainer(model, _data(), None, cfg)


def test_trainer_bf16_trains_close_to_float32(test_device: torch.device, tmp_path) -> None:
    ref = _trainer(None, str(test_device)).fit()
    trainer = _trainer("bf16", str(test_device), checkpoint_dir=str(tmp_path))
    seen: list[torch.dtype] = []
    trainer.model.head.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype) if mod.training else None)
    hist = trainer.fit()
    assert seen and all(d == torch.bfloat16 for d in seen), "the training forward must run under bf16 autocast"
    assert hist[0]["fwd_converged"] == 1.0
    assert abs(hist[0]["train_loss"] - ref[0]["train_loss"]) < 0.05 * ref[0]["train_loss"]
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters()), "autocast must not change parameter dtypes"
    assert torch.load(tmp_path / "last.pt", weights_only=True)["config"]["amp"] == "bf16"


def test_fp16_on_cpu_is_refused_with_what_to_do() -> None:
    with pytest.raises(OptionError, match="amp='fp16' needs a CUDA device.*amp='bf16'"):
        _trainer("fp16", "cpu")


def test_amp_option_is_checked() -> None:
    with pytest.raises(OptionError, match="amp"):
        TrainConfig(amp="fp8")
    assert TrainConfig(amp="BF16").amp == "bf16"


@requires_cuda_run
def test_fp16_gradscaler_trains_on_cuda(tmp_path) -> None:
    trainer = _trainer("fp16", "cuda", checkpoint_dir=str(tmp_path))
    hist = trainer.fit()
    assert trainer._scaler is not None and trainer._scaler.get_scale() > 0
    assert hist[0]["train_loss"] is not None and hist[0]["train_loss"] == hist[0]["train_loss"]
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["scaler"] is not None and ckpt["scaler"]["scale"] > 0
    assert 0 <= hist[0]["amp_skipped"] < hist[0]["steps"], "the scaler may skip a few overflowed steps, not all"


@requires_cuda_run
def test_fp16_overflow_is_skipped_by_the_scaler_not_raised() -> None:
    # a scale of 2**40 overflows float16 gradients (max 65504) at once: the DEQ backward must hand the
    # NaN/Inf to the scaler (skip, halve the scale, count) instead of raising NonFiniteError
    trainer = _trainer("fp16", "cuda")
    trainer._scaler = torch.amp.GradScaler("cuda", init_scale=2.0**40)
    hist = trainer.fit()
    assert hist[0]["amp_skipped"] >= 1
    assert trainer._scaler.get_scale() <= 2.0 ** (40 - hist[0]["amp_skipped"])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_cli_refuses_fp16_on_cpu_in_one_line(capsys, tmp_path) -> None:
    from deqkit.cli import main

    argv = ["train", "--amp", "fp16", "--device", "cpu", "--subset", "32", "--epochs", "1", "--no-progress", "--nproc", "2"]
    rc = main([*argv, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "amp='fp16' needs a CUDA device" in err and "Traceback" not in err
