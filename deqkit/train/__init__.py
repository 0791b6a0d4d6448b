"""Training DEQ classifiers: metrics that include the solver's work, checkpoints, exact resume.

- :class:`TrainConfig` (:mod:`deqkit.train.config`): the settings of a run.
- :class:`Trainer` (:mod:`deqkit.train.loop`): the loop.
- :class:`ImageAugment` (:mod:`deqkit.train.augment`): random flips and shifts of image batches.
- :mod:`deqkit.train.checkpoint`: atomic checkpoints, RNG states, the seeded data order.
- :mod:`deqkit.train.metrics`: per-step and per-epoch statistics, the log, :class:`Callback`.
"""

from .augment import AUGMENTATIONS, ImageAugment
from .checkpoint import CHECKPOINT_NAME, seed_everything
from .config import TrainConfig
from .loop import Trainer
from .metrics import Callback

__all__ = ["TrainConfig", "Trainer", "Callback", "ImageAugment", "AUGMENTATIONS", "seed_everything", "CHECKPOINT_NAME"]
