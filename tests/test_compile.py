"""``torch.compile`` of the DEQ cell: the same ``z*`` and gradients as eager.

The tests compile with ``backend="aot_eager"`` (dynamo's graph capture and AOT autograd, no code
generation), on CPU and on ``DEQKIT_TEST_DEVICE=cuda``: inductor took about a minute per graph on
this project's loaded 2-core CPU, so inductor is the benchmark's business
(``python -m deqkit.apps.bench.scale compile``, also run by ``scripts/gpu_check.sh`` on CUDA).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TanhCell, randn

from deqkit import DEQ, SHINE, Broyden, Exact, Unrolled
from deqkit.models import DEQClassifier
from deqkit.train import TrainConfig, Trainer
from deqkit.train.precision import compile_cells

BACKEND = "aot_eager"
ESTIMATORS = {"exact": lambda: Exact(tol=1e-12, max_iter=200), "shine": SHINE, "unrolled": lambda: Unrolled(k=4)}

torch_dynamo = pytest.importorskip("torch._dynamo")


@pytest.mark.parametrize("grad", sorted(ESTIMATORS))
def test_compiled_cell_gives_eager_z_and_gradients(grad: str, test_device: torch.device) -> None:
    torch._dynamo.reset()
    cell = TanhCell(d=6, p=4, rho=0.5, seed=3).to(test_device)
    eager = DEQ(cell, Broyden(memory=20, tol=1e-12, max_iter=100), ESTIMATORS[grad](), state_shape=(6,))
    compiled = copy.deepcopy(eager)
    assert compile_cells(compiled, BACKEND) == 1
    assert compiled.cell._compiled_call_impl is not None and eager.cell._compiled_call_impl is None
    x = randn(5, 4, seed=4).to(test_device)
    c = randn(5, 6, seed=5).to(test_device)
    out = []
    for deq in (eager, compiled):
        z, info = deq(x)
        (z * c).sum().backward()
        out.append((z.detach(), [p.grad.clone() for p in deq.cell.parameters()], int(info.nstep.max())))
    (z_e, g_e, n_e), (z_c, g_c, n_c) = out
    assert n_e == n_c
    assert torch.allclose(z_c, z_e, rtol=0, atol=1e-12)
    for a, b in zip(g_c, g_e):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_the_cell_compiles_without_graph_breaks() -> None:
    torch._dynamo.reset()
    cell = TanhCell(d=6, p=4, seed=3)
    z, x = randn(5, 6, seed=1), randn(5, 4, seed=2)
    explanation = torch._dynamo.explain(cell)(z, x)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_trainer_compile_cell_keeps_checkpoint_keys(tmp_path) -> None:
    torch._dynamo.reset()
    from deqkit.data import load_dataset

    x, y = load_dataset("digits", seed=0).train[:32]
    data = torch.utils.data.TensorDataset(x.float(), y)

    def run(compile_cell: bool, out: str) -> dict:
        torch.manual_seed(0)
        model = DEQClassifier.mlp(
            64, 16, 10, solver=Broyden(memory=20, tol=1e-5, max_iter=30), grad=Exact(on_failure="ignore"), on_failure="ignore"
        )
        cfg = TrainConfig(
            epochs=1,
            batch_size=16,
            lr=1e-2,
            progress=False,
            compile_cell=compile_cell,
            compile_backend=BACKEND,
            checkpoint_dir=out,
        )
        Trainer(model, data, None, cfg).fit()
        return model.state_dict()

    eager = run(False, str(tmp_path / "eager"))
    compiled = run(True, str(tmp_path / "compiled"))
    assert list(compiled) == list(eager), "compiling in place must keep the state-dict keys"
    for k in eager:
        assert torch.allclose(compiled[k], eager[k], rtol=1e-4, atol=1e-5), k
