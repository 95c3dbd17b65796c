"""Layers shared by every family: PyTorch-style initialisation, BatchNorm with a statistics group
size, dropout that draws from call-time RNGs, pooling, and an analytic multiply-add counter.

Conventions (the papers trained in PyTorch; these reproduce its defaults):

- Convolutions: no bias, Kaiming-normal init with ``mode='fan_out'`` (torchvision ResNet), explicit
  symmetric padding ``(k - 1) // 2`` like ``nn.Conv2d(padding=k // 2)`` (Flax's ``'SAME'`` pads
  stride-2 convolutions asymmetrically, PyTorch does not).
- Fully connected layers: PyTorch's ``nn.Linear`` default, weight and bias ~ U(-1/sqrt(fan_in), +).
- BatchNorm: PyTorch momentum 0.1 is Flax momentum 0.9 (decay of the running average), eps 1e-5;
  running variance updated with the unbiased batch variance, as ``torch.nn.BatchNorm2d`` does.

Parameters are always float32; ``dtype`` is the compute dtype (inputs and weights are cast to it).
Every module keeps only ``nnx.Param`` and ``nnx.BatchStat`` leaves: no RNG state is stored.

Multiply-adds (MACs) are counted analytically from the traced shapes: ``Conv`` and ``Linear`` add
``output elements x fan-in`` per example while a :func:`count_macs` context is open (use it under
``jax.eval_shape``; nothing is computed). Normalisation, activations, pooling and additions are not
counted, as in the papers' FLOP figures (ResNet-18: 1.81 G).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

BN_MOMENTUM = 0.9  # Flax convention; PyTorch's momentum=0.1
BN_EPSILON = 1e-5

conv_kernel_init = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# ---------------------------------------------------------------------------------------------
# Multiply-add counting.

_MACS: contextvars.ContextVar[tuple[dict[str, int], str] | None] = contextvars.ContextVar(
    "dks_jax_macs", default=None
)


@contextlib.contextmanager
def count_macs() -> Iterator[dict[str, int]]:
    """Collects per-example multiply-adds of the ``Conv``/``Linear`` calls traced inside.

    Yields a dict ``scope -> MACs``; the scope is ``"main"`` unless :func:`mac_scope` sets another.
    """
    totals: dict[str, int] = {}
    token = _MACS.set((totals, "main"))
    try:
        yield totals
    finally:
        _MACS.reset(token)


@contextlib.contextmanager
def mac_scope(scope: str) -> Iterator[None]:
    """Attributes the multiply-adds traced inside to ``scope`` (no-op unless counting)."""
    current = _MACS.get()
    token = _MACS.set((current[0], scope)) if current is not None else None
    try:
        yield
    finally:
        if token is not None:
            _MACS.reset(token)


def _add_macs(n: int) -> None:
    current = _MACS.get()
    if current is not None:
        totals, scope = current
        totals[scope] = totals.get(scope, 0) + int(n)


# ---------------------------------------------------------------------------------------------
# Layers.


class Conv(nnx.Module):
    """2-D convolution, NHWC, square kernel, no bias (torchvision style)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        dtype=jnp.float32,
        rngs: InitRngs,
    ):
        if in_features % groups or out_features % groups:
            raise ValueError(f"groups={groups} must divide {in_features} and {out_features}")
        shape = (kernel_size, kernel_size, in_features // groups, out_features)
        self.kernel = nnx.Param(conv_kernel_init(rngs.params(), shape, jnp.float32))
        self.in_features, self.out_features = in_features, out_features
        self.kernel_size, self.stride, self.groups = kernel_size, stride, groups
        self.padding = (kernel_size - 1) // 2 if padding is None else padding
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """``float[B, H, W, in_features]`` (cast to the compute dtype) -> ``dtype[B, H', W',
        out_features]``, ``H' = (H + 2 * padding - kernel_size) // stride + 1``."""
        p = self.padding
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.kernel.get_value().astype(self.dtype),
            window_strides=(self.stride, self.stride),
            padding=((p, p), (p, p)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=self.groups,
        )
        fan_in = self.kernel_size * self.kernel_size * self.in_features // self.groups
        _add_macs(math.prod(y.shape[1:]) * fan_in)
        return y


# Whether :func:`materialize` acts (on the CPU backend); a switch for measuring its effect.
MATERIALIZE_ON_CPU = True


def materialize(x: jax.Array) -> jax.Array:
    """``x`` itself (``x / 1``: exact, but for subnormals, which XLA:CPU's arithmetic flushes to
    zero anyway), stored once where XLA:CPU would recompute it.

    XLA's fusion copies cheap elementwise producers into each consumer. In a residual stream,
    ``x_k = relu(x_{k-1} + bn(conv(...)))``, every block's output is such a producer of the
    next, so a consumer that cannot read the stored array in order (on the CPU: the transposed
    copy that feeds a convolution's weight gradient) recomputes every earlier block of the stage,
    element by element in transposed order. A float division is one of the operations that
    XLA:CPU never duplicates; its divisor, 1, sits behind an optimization barrier so that it is
    not folded away. Residual blocks apply this to their output. On other backends, or with
    :data:`MATERIALIZE_ON_CPU` false, ``x`` is returned as it is.
    """
    if not MATERIALIZE_ON_CPU or jax.default_backend() != "cpu":
        return x
    return x / jax.lax.optimization_barrier(jnp.ones((), x.dtype))


def _torch_linear_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class Linear(nnx.Module):
    """Fully connected layer with PyTorch's default initialisation."""

    def __init__(self, in_features: int, out_features: int, *, dtype=jnp.float32, rngs: InitRngs):
        init = _torch_linear_init(in_features)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features)))
        self.bias = nnx.Param(init(rngs.params(), (out_features,)))
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """``float[..., in_features]`` -> ``dtype[..., out_features]`` (the compute dtype)."""
        y = x.astype(self.dtype) @ self.kernel.get_value().astype(self.dtype)
        _add_macs(self.in_features * self.out_features)
        return y + self.bias.get_value().astype(self.dtype)


class BatchNorm(nnx.Module):
    """BatchNorm over the last axis with statistics computed in groups of ``group_size`` examples.

    Training: the batch ``[B, ...]`` is viewed as ``[B // g, g, ...]``; every group of ``g``
    consecutive examples is normalised with its own mean and (biased) variance, as ``g`` examples
    per GPU were in the papers' multi-GPU runs. ``group_size=None`` uses the whole batch. The
    running statistics move towards the mean over groups of the group means and of the unbiased
    group variances. Evaluation uses the running statistics. Statistics are computed in float32.
    """

    def __init__(
        self,
        num_features: int,
        *,
        group_size: int | None = None,
        zero_init: bool = False,
        momentum: float = BN_MOMENTUM,
        epsilon: float = BN_EPSILON,
        dtype=jnp.float32,
    ):
        if group_size is not None and group_size < 1:
            raise ValueError(f"bn group size must be >= 1 or None, got {group_size}")
        self.scale = nnx.Param((jnp.zeros if zero_init else jnp.ones)((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.num_features = num_features
        self.group_size, self.momentum, self.epsilon = group_size, momentum, epsilon
        self.dtype = dtype

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """``float[B, ..., num_features]`` -> the same shape in the compute dtype. Training
        updates the running statistics; ``B`` must be a multiple of ``group_size``."""
        xf = x.astype(jnp.float32)
        if train:
            batch = x.shape[0]
            g = batch if self.group_size is None else self.group_size
            if batch % g:
                raise ValueError(
                    f"batch of {batch} examples does not split into BatchNorm groups of {g} "
                    "(set bn_group_size to a divisor of the per-device batch, or None)"
                )
            xg = xf.reshape((batch // g, g) + x.shape[1:])
            axes = tuple(range(1, xg.ndim - 1))
            sx = jax.lax.stop_gradient(xg)  # _normalize's gradient goes through the statistics
            mean = jnp.mean(sx, axis=axes, keepdims=True)
            var = jnp.maximum(jnp.mean(jnp.square(sx), axis=axes, keepdims=True) - mean**2, 0.0)
            y = _normalize(xg, mean, var, self.scale.get_value(), self.bias.get_value(),
                           self.epsilon).reshape(x.shape)
            n = g * math.prod(x.shape[1:-1])
            group_mean = mean.reshape(-1, x.shape[-1]).mean(axis=0)
            group_var = var.reshape(-1, x.shape[-1]).mean(axis=0) * (n / max(n - 1, 1))
            m = self.momentum
            # set_value, not ``v[...] = ``: indexed assignment of a traced value costs time
            # proportional to the whole trace in flax 0.12 (quadratic in depth: ResNet-1202).
            self.mean.set_value(m * self.mean.get_value() + (1.0 - m) * group_mean)
            self.var.set_value(m * self.var.get_value() + (1.0 - m) * group_var)
            return y.astype(self.dtype)
        y = (xf - self.mean.get_value()) * jax.lax.rsqrt(self.var.get_value() + self.epsilon)
        return (y * self.scale.get_value() + self.bias.get_value()).astype(self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _normalize(x, mean, var, scale, bias, epsilon):
    """``(x - mean) / sqrt(var + epsilon) * scale + bias`` for ``x: float[G, g, ..., C]`` whose
    ``mean`` and ``var`` (``[G, 1, ..., 1, C]``) are its own statistics over the middle axes.

    The gradient is BatchNorm's, through the statistics (which arrive without a gradient of their
    own): with ``xhat`` the normalised ``x`` and ``n`` the elements per group and channel,
    ``dx = scale / sqrt(var + epsilon) / n * (n * dy - sum(dy) - xhat * sum(dy * xhat))``. Written
    out, the backward pass recomputes ``xhat`` from ``x`` where it reads it; autodiff instead keeps
    ``x - mean`` and ``xhat`` as residuals, two more stored arrays per BatchNorm (the CIFAR
    ResNet-32 training step on one CPU core: 1.12x faster without branches, 1.06x with DKS).
    """
    return (x - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias


def _normalize_fwd(x, mean, var, scale, bias, epsilon):
    return _normalize(x, mean, var, scale, bias, epsilon), (x, mean, var, scale)


def _normalize_bwd(epsilon, residuals, dy):
    x, mean, var, scale = residuals
    axes = tuple(range(1, x.ndim - 1))
    n = math.prod(x.shape[1:-1])
    rstd = jax.lax.rsqrt(var + epsilon)
    xhat = (x - mean) * rstd
    sum_dy = jnp.sum(dy, axis=axes, keepdims=True)
    sum_dy_xhat = jnp.sum(dy * xhat, axis=axes, keepdims=True)
    dx = (scale * rstd / n) * (n * dy - sum_dy - xhat * sum_dy_xhat)
    dscale = jnp.sum(sum_dy_xhat, axis=0).reshape(scale.shape)
    dbias = jnp.sum(sum_dy, axis=0).reshape(scale.shape)
    return dx, jnp.zeros_like(mean), jnp.zeros_like(var), dscale, dbias


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


class ConvBN(nnx.Module):
    """Conv -> BatchNorm -> optional ReLU (post-activation unit)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        stride: int = 1,
        groups: int = 1,
        relu: bool = True,
        zero_init: bool = False,
        cfg: LayerConfig,
        rngs: InitRngs,
    ):
        self.conv = Conv(
            in_features, out_features, kernel_size, stride=stride, groups=groups,
            dtype=cfg.dtype, rngs=rngs,
        )
        self.bn = cfg.bn(out_features, zero_init=zero_init)
        self.relu = relu
        self.out_features = out_features

    def __call__(self, x, *, train: bool, rngs: nnx.Rngs | None = None):
        """``float[B, H, W, in_features]`` -> ``dtype[B, H', W', out_features]`` (compute dtype;
        ``H' = ceil(H / stride)`` for odd kernels). ``rngs`` is unused."""
        y = self.bn(self.conv(x), train=train)
        return jax.nn.relu(y) if self.relu else y


class StemConv(nnx.Module):
    """A 3x3 convolution from RGB, without normalisation: the stem of the pre-activation nets
    (WRN, DenseNet), whose first block normalises and activates it.
    ``float[B, H, W, 3] -> float[B, H, W, features]``."""

    def __init__(self, features: int, *, cfg: LayerConfig, rngs: InitRngs):
        self.conv = Conv(3, features, 3, dtype=cfg.dtype, rngs=rngs)
        self.out_features = features

    def __call__(self, x, *, train, rngs=None):
        """``float[B, H, W, 3]`` -> ``[B, H, W, features]`` (compute dtype). ``train`` and
        ``rngs`` are unused."""
        return self.conv(x)


class NormAct(nnx.Module):
    """BatchNorm -> ReLU (the final norm of pre-activation networks)."""

    def __init__(self, num_features: int, *, cfg: LayerConfig):
        self.bn = cfg.bn(num_features)
        self.out_features = num_features

    def __call__(self, x, *, train: bool, rngs: nnx.Rngs | None = None):
        """``float[B, H, W, C]`` -> the same shape in the compute dtype. ``rngs`` is unused."""
        return jax.nn.relu(self.bn(x, train=train))


class KeySeq:
    """Per-layer initialisation keys ``fold_in(key, 0), fold_in(key, 1), ...``.

    Builders call ``keys.params()`` like ``nnx.Rngs.params()``. ``create`` draws one key from the
    caller's ``nnx.Rngs`` and hands the layers this sequence instead: mutating an ``nnx.Rngs``
    counter thousands of times inside ``nnx.eval_shape``/``jit`` costs time quadratic in the trace
    (ResNet-1202: a minute), a Python counter costs nothing.

    ``key`` and every key returned: a PRNG key, typed ``key[]`` or raw ``uint32[2]`` (the kind of
    ``key``).
    """

    def __init__(self, key: jax.Array):
        self.key = key
        self.count = 0

    def params(self) -> jax.Array:
        key = jax.random.fold_in(self.key, self.count)
        self.count += 1
        return key


# What layer constructors draw their initialisation keys from (``rngs.params()``).
InitRngs = nnx.Rngs | KeySeq


class LayerConfig:
    """Build-time settings passed to every layer: compute dtype and BN statistics group size."""

    def __init__(self, dtype=jnp.float32, bn_group_size: int | None = None):
        self.dtype = dtype
        self.bn_group_size = bn_group_size

    def bn(self, num_features: int, *, zero_init: bool = False) -> BatchNorm:
        return BatchNorm(
            num_features, group_size=self.bn_group_size, zero_init=zero_init, dtype=self.dtype
        )


# ---------------------------------------------------------------------------------------------
# Functions.


def dropout(x: jax.Array, rate: float, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    """Inverted dropout drawing its mask from ``rngs.dropout()``; identity unless training.

    ``x``: any shape and float dtype; the result has the same shape and dtype.
    """
    if not train or rate == 0.0:
        return x
    if rngs is None:
        raise ValueError(
            "this model uses dropout: call it with rngs=nnx.Rngs(dropout=key) when train=True"
        )
    try:
        key = rngs.dropout()
    except AttributeError as e:
        raise ValueError("dropout needs an RNG stream named 'dropout' in rngs") from e
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def max_pool(x: jax.Array, kernel: int, stride: int, padding: int) -> jax.Array:
    """``nn.MaxPool2d(kernel, stride, padding)`` on NHWC (padding never wins the max).

    ``[B, H, W, C]`` -> ``[B, H', W', C]``, ``H' = (H + 2 * padding - kernel) // stride + 1``, in
    ``x``'s dtype.
    """
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    init = -jnp.inf  # a Python scalar: a typed array makes the reduction non-differentiable
    return jax.lax.reduce_window(
        x, init, jax.lax.max, (1, kernel, kernel, 1), (1, stride, stride, 1), pad
    )


def avg_pool(x: jax.Array, kernel: int, stride: int, padding: int = 0) -> jax.Array:
    """``nn.AvgPool2d(kernel, stride, padding)`` on NHWC (zero padding counted, PyTorch default).

    ``[B, H, W, C]`` -> ``[B, H', W', C]``, ``H' = (H + 2 * padding - kernel) // stride + 1``;
    summed in float32, returned in ``x``'s dtype.
    """
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    total = jax.lax.reduce_window(
        x.astype(jnp.float32), 0.0, jax.lax.add, (1, kernel, kernel, 1), (1, stride, stride, 1), pad
    )
    return (total / (kernel * kernel)).astype(x.dtype)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over the spatial axes of NHWC, accumulated in float32: ``[B, H, W, C]`` -> ``[B, C]``,
    returned in ``x``'s dtype."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)
