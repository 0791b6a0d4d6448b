"""Training augmentation: ImageAugment's flips and shifts, the trainer's seeding, what the commands build."""

import dataclasses

import pytest
import torch

from deqkit import Anderson, OptionError, Unrolled
from deqkit.apps.common import make_augment
from deqkit.data import load_dataset
from deqkit.models import DEQClassifier
from deqkit.train import Callback, ImageAugment, TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(B=200, C=2, H=6, W=7, seed=0):
    return torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed))


def _shifted(x, dy, dx, fill):
    """``x`` (C, H, W) moved down by ``dy`` and right by ``dx`` pixels, ``fill`` where uncovered."""
    C, H, W = x.shape
    out = fill.reshape(C, 1, 1).expand(C, H, W).clone()
    ys, xs = slice(max(dy, 0), H + min(dy, 0)), slice(max(dx, 0), W + min(dx, 0))
    yo, xo = slice(max(-dy, 0), H + min(-dy, 0)), slice(max(-dx, 0), W + min(-dx, 0))
    out[:, ys, xs] = x[:, yo, xo]
    return out


def test_flip_mirrors_about_half_of_the_images_and_leaves_the_rest():
    x = _images()
    out = ImageAugment(flip=True)(x, torch.Generator().manual_seed(1))
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert bool((flipped | kept).all())
    assert 70 <= int(flipped.sum()) <= 130  # Binomial(200, 1/2): mean 100, sd 7


def test_shift_is_a_translation_within_range_filled_with_the_background():
    x, s = _images(), 2
    fill = torch.tensor([-0.5, 3.0])
    out = ImageAugment(shift=s, fill=fill.tolist())(x, torch.Generator().manual_seed(2))
    offsets = set()
    for o, i in zip(out, x):
        hits = [(dy, dx) for dy in range(-s, s + 1) for dx in range(-s, s + 1) if torch.equal(o, _shifted(i, dy, dx, fill))]
        assert len(hits) == 1, "not a translation by at most 2 pixels with the fill value"
        offsets |= set(hits)
    assert len(offsets) == (2 * s + 1) ** 2  # every offset drawn over 200 samples


def test_augment_is_a_function_of_the_generator_and_does_not_modify_its_input():
    x = _images()
    before = x.clone()
    aug = ImageAugment(flip=True, shift=1)
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    c = aug(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(x, before)
    assert torch.equal(ImageAugment()(x, torch.Generator()), x)
    moved = ImageAugment(shift=3)(torch.ones(64, 1, 4, 4), torch.Generator().manual_seed(0))
    assert set(moved.unique().tolist()) == {0.0, 1.0}  # the default fill is 0


def test_names_give_the_flips_and_shifts_they_say():
    for name, flip, shift in (("flip", True, 0), ("shift", False, 2), ("flip+shift", True, 2)):
        aug = ImageAugment.from_name(name)
        assert (aug.flip, aug.shift) == (flip, shift), name
    assert ImageAugment.from_name("none") is None


def test_bad_settings_and_inputs_are_refused():
    with pytest.raises(OptionError, match="shift must be an integer >= 0"):
        ImageAugment(shift=-1)
    with pytest.raises(OptionError, match="flip must be True or False"):
        ImageAugment(flip="yes")
    with pytest.raises(OptionError, match=r"image batches \(B, C, H, W\)"):
        ImageAugment(flip=True)(torch.zeros(4, 64), torch.Generator())
    with pytest.raises(OptionError, match="fill has 3 values for 2 channels"):
        ImageAugment(shift=1, fill=[0.0, 0.0, 0.0])(_images(B=2), torch.Generator())
    with pytest.raises(OptionError, match="augment must be one of"):
        ImageAugment.from_name("rotate")


# -- the trainer ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images():
    return load_dataset("digits", subset=96, flatten=False)  # (1, 8, 8) images, 3 steps of 32


def _conv(seed=0):
    torch.manual_seed(seed)
    return DEQClassifier.conv((1, 8, 8), 8, 10, solver=Anderson(tol=1e-3, max_iter=15), grad=Unrolled(3, 0.5))


class _Recorder:
    """An augmentation that records the batches it saw."""

    def __init__(self, aug):
        self.aug, self.seen = aug, []

    def __repr__(self):
        return repr(self.aug)

    def __call__(self, x, generator):
        out = self.aug(x, generator)
        self.seen.append(out.clone())
        return out


class _StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, step):
        if step["global_step"] == self.step:
            raise KeyboardInterrupt


def _cfg(tmp_path, **kw):
    return TrainConfig(epochs=2, batch_size=32, lr=3e-3, seed=5, progress=False, checkpoint_dir=str(tmp_path), **kw)


def test_trainer_augments_training_batches_only_and_a_resumed_run_augments_the_same(images, tmp_path):
    aug = ImageAugment(flip=True, shift=1)
    straight = _Recorder(aug)
    model = _conv()
    Trainer(model, images.train, images.val, _cfg(tmp_path / "a"), augment=straight).fit()
    assert len(straight.seen) == 6  # 2 epochs × 3 steps; validation is not augmented
    plain = _conv()
    Trainer(plain, images.train, images.val, _cfg(tmp_path / "p")).fit()
    weights = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
    assert not torch.allclose(weights(model), weights(plain))  # the augmentation reached training

    first = _Recorder(aug)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_conv(), images.train, images.val, _cfg(tmp_path / "b"), callbacks=[_StopAt(4)], augment=first).fit()
    second = _Recorder(aug)
    resumed = _conv(seed=9)
    Trainer(resumed, images.train, images.val, _cfg(tmp_path / "b"), augment=second).fit(resume=True)
    seen = first.seen + second.seen
    assert len(seen) == 6
    for a, b in zip(seen, straight.seen):
        assert torch.equal(a, b)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, atol=1e-6, rtol=0, msg=k)


def test_trainer_refuses_an_augment_that_is_not_callable(images):
    with pytest.raises(OptionError, match="augment must be a callable"):
        Trainer(_conv(), images.train, None, TrainConfig(progress=False), augment="flip")


# -- what the commands choose ------------------------------------------------------------------------


def test_the_commands_build_the_named_augmentation_filled_with_black(images):
    aug = make_augment("flip+shift", images, "conv")
    assert (aug.flip, aug.shift) == (True, 2)
    torch.testing.assert_close(aug.fill, (-images.mean / images.std).double())  # raw black, normalised
    aug = make_augment("shift", images, "mdeq")
    assert (aug.flip, aug.shift) == (False, 2)
    assert make_augment("none", images, "conv") is None
    flat = load_dataset("digits", subset=96)
    assert make_augment("none", flat, "mlp") is None
    with pytest.raises(OptionError, match="needs image-shaped inputs"):
        make_augment("flip", flat, "mlp")
    with pytest.raises(OptionError, match="augment must be one of none, flip"):
        make_augment("auto", images, "conv")


def test_resuming_with_another_augmentation_warns(images, tmp_path):
    cfg = _cfg(tmp_path, max_steps=2)
    Trainer(_conv(), images.train, None, cfg, augment=ImageAugment(flip=True)).fit()
    longer = dataclasses.replace(cfg, max_steps=4)
    with pytest.warns(UserWarning, match=r"augment: ImageAugment\(flip=True, shift=0\) -> None"):
        Trainer(_conv(), images.train, None, longer).fit(resume=True)


def test_augment_generator_depends_on_seed_step_and_rank_only():
    """Each rank's shard holds other samples, so each rank draws its own augmentation; a rerun (or a
    resume) of the same (seed, step, rank) draws the same."""
    from deqkit.train.checkpoint import augment_generator

    draw = lambda *key: torch.rand(8, generator=augment_generator(*key))
    assert torch.equal(draw(3, 10, 1), draw(3, 10, 1))
    others = [draw(3, 10, 0), draw(3, 11, 1), draw(4, 10, 1)]
    assert all(not torch.equal(draw(3, 10, 1), o) for o in others)
