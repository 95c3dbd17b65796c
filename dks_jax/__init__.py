"""dks_jax: Deeply-supervised Knowledge Synergy and its family (DSN, DS, DHM, KD, BYOT) in JAX/Flax."""

__version__ = "0.1.0"
