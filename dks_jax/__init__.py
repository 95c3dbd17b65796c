"""dks_jax: Deeply-supervised Knowledge Synergy and its family (DSN, DS, DHM, KD, BYOT) in JAX/Flax."""

__version__ = "0.1.0"


def load(directory):
    """The export in ``directory`` as a ``Predictor``: ``dks_jax.load(path)(uint8_images)`` gives
    class probabilities (``export.load``). Imported on use, so that ``import dks_jax`` stays light
    (the command lines set XLA flags before JAX starts)."""
    from dks_jax import export

    return export.load(directory)
