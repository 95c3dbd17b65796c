"""Labels with noise (DKS section 4.3; DHM supplement E).

A fraction of the training labels is replaced by a *different* class drawn uniformly at random.
The choice is made once from the seed, with NumPy only, so it is identical in every run with that
seed and on every host, whichever loader serves the data. Exactly ``round(fraction * N)`` labels
change, so the realised fraction is that number over ``N`` (reported, and logged by the trainer).

The noise is stored as an offset per example (0 = unchanged, else 1..K-1), so it can be applied
to labels that are only known when an example is read (the streaming loader):
``noisy = (label + offset[index]) % num_classes``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Separates the noise stream from the example-order stream drawn from the same seed.
_NOISE_STREAM = 0x4E015E


@dataclasses.dataclass(frozen=True)
class LabelNoise:
    """Per-example label offsets: ``offsets[i]`` in ``[0, num_classes)``, 0 = label kept."""

    offsets: np.ndarray  # int32 [N]
    num_classes: int
    requested: float
    seed: int

    @property
    def num_changed(self) -> int:
        return int(np.count_nonzero(self.offsets))

    @property
    def realised(self) -> float:
        return self.num_changed / max(len(self.offsets), 1)

    def apply(self, labels: np.ndarray) -> np.ndarray:
        """Noisy labels for ``labels`` (int [N], the split's clean labels in index order)."""
        labels = np.asarray(labels)
        if labels.shape != self.offsets.shape:
            raise ValueError(f"labels have shape {labels.shape}, noise has {self.offsets.shape}")
        return ((labels.astype(np.int64) + self.offsets) % self.num_classes).astype(np.int32)

    def report(self) -> dict:
        return {
            "requested": float(self.requested),
            "realised": self.realised,
            "num_changed": self.num_changed,
            "num_examples": len(self.offsets),
            "seed": self.seed,
        }


def label_noise(num_examples: int, num_classes: int, fraction: float, seed: int) -> LabelNoise:
    """Chooses ``round(fraction * num_examples)`` examples and a different class for each.

    Args:
      num_examples: size N of the training split.
      num_classes: K; every changed example gets an offset in 1..K-1, i.e. a different class.
      fraction: in [0, 1].
      seed: any int; the same seed gives the same noise.

    Returns:
      LabelNoise with ``offsets`` int32 [N].
    """
    fraction = float(fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"label_noise must be a fraction in [0, 1], got {fraction}")
    if fraction > 0 and num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, the data set has {num_classes}")
    rng = np.random.default_rng([_NOISE_STREAM, int(seed) % 2**63])
    num_changed = int(round(fraction * num_examples))
    offsets = np.zeros(num_examples, np.int32)
    if num_changed:
        chosen = rng.choice(num_examples, size=num_changed, replace=False)
        offsets[chosen] = rng.integers(1, num_classes, size=num_changed, dtype=np.int32)
    offsets.flags.writeable = False
    return LabelNoise(offsets=offsets, num_classes=num_classes, requested=fraction, seed=int(seed))
