"""Notebook use of dks_jax.losses: gradients of the DKS synergy loss with ``jax.grad``.

Run: ``python examples/notebook_synergy_grad.py`` (or paste the cells into a notebook).
"""

import jax
import jax.numpy as jnp
import numpy as np

from dks_jax import losses

# Three heads (main classifier, then auxiliaries deepest -> shallowest), batch 2, 4 classes.
keys = jax.random.split(jax.random.key(0), 3)
logits = tuple(jax.random.normal(k, (2, 4)) for k in keys)

# Bidirectional synergy: every head teaches every other head (teachers under stop_gradient).
loss_fn = lambda z: losses.synergy_loss(z, "bidirectional", weights=1.0, temperature=1.0)
loss, grads = jax.value_and_grad(loss_fn)(logits)

np.set_printoptions(precision=4, suppress=True)
print(f"synergy loss: {float(loss):.6f}")
for h, g in enumerate(grads):
    print(f"d loss / d logits[{h}] =\n{np.asarray(g)}")
# Softmax gradients: each example's row sums to zero.
print("each gradient row sums to 0:", all(bool(jnp.allclose(g.sum(-1), 0, atol=1e-6)) for g in grads))

# One pair (teacher 0 -> student 1): only the student moves, by (softmax(z1) - softmax(z0)) / B.
pair_grads = jax.grad(lambda z: losses.synergy_loss(z, [(0, 1)]))(logits)
expected = (jax.nn.softmax(logits[1]) - jax.nn.softmax(logits[0])) / logits[0].shape[0]
ok = bool(jnp.allclose(pair_grads[1], expected, atol=1e-6)) and not pair_grads[0].any()
print("one pair (0 -> 1) matches (softmax(z1) - softmax(z0)) / B:", ok)
