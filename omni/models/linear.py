"""The GPT's linear layers and the products they compute: `Dense`, the tied embedding `Embed`, and the kernel
parameters and matrix products that attention shares with them (omni/models/gpt.py builds the model from them).

Two model config keys change how a kernel is stored, never what the model computes:
- model.quant: 'int8' keeps each kernel and the embedding as int8 values with float32 scales per output channel
  (omni/compress/quant.py converts a trained model's params). Each product converts the values inside the jit'd
  matmul and multiplies its output channels by their scales afterwards (x @ (V s) = (x @ V) s), so no float copy
  of a kernel is kept. 'w8a8' quantises the activations too, one scale per token, and multiplies int8 x int8 ->
  int32.
- model.transposed_kernels: kernels stored [out, in] instead of [in, out], decoding's layout
  (omni.models.params.transposed makes that copy of the weights). Decoding multiplies a few rows by every kernel,
  and XLA:CPU runs those products as (W^T x^T)^T about 30% faster when W^T is laid out in memory (measured: +29%
  decode tokens/s at batch 8); transposing inside the decode loop would copy each token.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

QMAX = 127  # symmetric int8: -127..127, so that negating a weight never overflows

# Below this many tokens per call (generation), XLA:CPU would copy the transposed [vocab, d_model] embedding on
# every call for `x @ embedding.T`, which costs more than the product itself.
DECODE_ROWS = 64


def init_normal(std: float, axes: tuple):
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def init_zeros(axes: tuple):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def init_ones(axes: tuple):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


class Dense(nn.Module):
    """A linear layer: kernel [in, out] and bias, as nn.Dense stores them (same names, same initial values), or
    int8 (model.quant) or [out, in] (model.transposed_kernels)."""
    config: ml_collections.ConfigDict
    features: int
    axes: tuple  # logical axes of the [in, out] kernel
    std: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        m = self.config
        w, scale = kernel_param(self, "kernel", self.std, ((self.axes[0],), (x.shape[-1],)),
                                ((self.axes[1],), (self.features,)))
        b = self.param("bias", init_zeros((self.axes[1],)), (self.features,), m.param_dtype)
        return matmul(m, x, w, scale) + b.astype(m.dtype)


class Embed(nn.Module):
    """The token embedding [vocab, embed], also the output layer (tied, as in GPT-1/2/3). Under model.quant its
    rows are int8 with one scale each: a row's scale serves both the lookup and that token's logit."""
    config: ml_collections.ConfigDict

    def setup(self):
        m = self.config
        shape, axes = (m.vocab_size, m.d_model), ("vocab", "embed")
        self.scale = None
        if m.get("quant", "none") == "none":
            self.embedding = self.param("embedding", init_normal(0.02, axes), shape, m.param_dtype)
        else:
            self.embedding = self.param("embedding", init_zeros(axes), shape, jnp.int8)
            self.scale = self.param(scale_name("embedding"), init_ones(axes[:1]), shape[:1], jnp.float32)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = jnp.take(self.embedding, tokens, axis=0).astype(self.config.dtype)
        return x if self.scale is None else x * jnp.take(self.scale, tokens)[..., None].astype(x.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits x @ embedding^T."""
        if self.scale is None:
            return unembed(x, self.embedding.astype(self.config.dtype))
        return _logits(x, self.embedding) * self.scale.astype(x.dtype)


def kernel_param(module: nn.Module, name: str, std: float, inputs: tuple, outputs: tuple):
    """A linear kernel's parameter(s): (float kernel, None), or under model.quant (int8 values, float32 scales
    per output channel). `inputs` and `outputs` are (logical axes, shape) pairs; the kernel is inputs + outputs,
    or outputs + inputs under model.transposed_kernels."""
    m = module.config
    first, second = (outputs, inputs) if m.get("transposed_kernels", False) else (inputs, outputs)
    axes, shape = first[0] + second[0], first[1] + second[1]
    if m.get("quant", "none") == "none":
        return module.param(name, init_normal(std, axes), shape, m.param_dtype), None
    # Quantized weights come from omni.compress.quant.quantize_model; initialising them has no use beyond shapes.
    values = module.param(name, init_zeros(axes), shape, jnp.int8)
    return values, module.param(scale_name(name), init_ones(outputs[0]), outputs[1], jnp.float32)


def scale_name(kernel_name: str) -> str:
    """The parameter holding a quantized weight's scales: qkv_kernel -> qkv_scale; kernel, embedding -> scale."""
    return kernel_name.replace("kernel", "scale") if "kernel" in kernel_name else "scale"


def matmul(m: ml_collections.ConfigDict, x: jax.Array, w: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """x @ w for w [in, out], or for w stored transposed [out, in] (model.transposed_kernels); an int8 w (model.quant)
    is converted inside the product and its output channels multiplied by `scale` after it, or, under 'w8a8',
    multiplied by x quantised per token in int8 x int8 -> int32."""
    transposed = m.get("transposed_kernels", False)
    if m.get("quant", "none") == "w8a8":
        return w8a8_matmul(x, w, scale, transposed).astype(m.dtype)
    if not transposed:
        y = x @ w.astype(m.dtype)
    elif (rows := math.prod(x.shape[:-1])) <= DECODE_ROWS:
        y = few_rows_matmul(x.reshape(rows, -1), w).reshape(x.shape[:-1] + (w.shape[0],))
    else:
        y = x @ w.astype(m.dtype).T
    return y if scale is None else y * scale.reshape(-1).astype(m.dtype)


def few_rows_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [rows, in] times w stored [out, in], for the few rows of a decoding step: (w x^T)^T, which contracts w's
    rows in place. On CPU, 2-64 rows go faster as one fused multiply-and-sum that streams w once than as a GEMM,
    whose kernels pack w for so few rows (measured through the 55 MB of the generation benchmark's weights:
    7.3 vs 10.7 ms at 8 rows, 11.7 vs 13.9 at 32, even at 64); one row of float weights stays a matrix-vector
    product. An int8 w is converted inside the fused loop, streaming a quarter of the bytes."""
    if jax.default_backend() == "cpu":
        if 1 < x.shape[0]:
            return (w[None].astype(x.dtype) * x[:, None, :]).sum(-1, dtype=jnp.float32).astype(x.dtype)
        if w.dtype == jnp.int8:
            return (w.astype(x.dtype) * x).sum(-1, dtype=jnp.float32).astype(x.dtype)[None]
    return (w.astype(x.dtype) @ x.T).T


@jax.custom_vjp
def unembed(x: jax.Array, embedding: jax.Array) -> jax.Array:
    """x @ embedding^T, with a hand-written backward pass. Autodiff's embedding gradient contracts the
    [tokens, vocab] logit gradient over its leading axis, which XLA:CPU does by first transposing that whole
    array; contracting a (small) transposed x against it instead is a plain matmul (+5-10% step speed)."""
    return _logits(x, embedding)


def _logits(x, embedding):
    rows = math.prod(x.shape[:-1])
    if rows <= DECODE_ROWS:  # decoding: contract the embedding's rows in place
        return few_rows_matmul(x.reshape(rows, -1), embedding).reshape(x.shape[:-1] + (-1,))
    return x @ embedding.astype(x.dtype).T


def _unembed_fwd(x, embedding):
    return _logits(x, embedding), (x, embedding)


def _unembed_bwd(residuals, d_logits):
    x, embedding = residuals
    x_t = x.reshape(-1, x.shape[-1]).T
    # The barrier stops XLA from folding the transpose back into the dot (which restores the slow form).
    d_embedding = jax.lax.optimization_barrier(x_t) @ d_logits.reshape(-1, d_logits.shape[-1])
    return d_logits @ embedding, d_embedding.T


unembed.defvjp(_unembed_fwd, _unembed_bwd)


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Dynamic per-token INT8 of activations [..., in]: (int8 values, float32 scales [...])."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scales = jnp.where(amax > 0, amax / QMAX, 1.0)
    return jnp.clip(jnp.round(x / scales[..., None]), -QMAX, QMAX).astype(jnp.int8), scales


def w8a8_matmul(x: jax.Array, values: jax.Array, scales: jax.Array, transposed: bool = False) -> jax.Array:
    """x [..., in] times the int8 matrix `values` [in, out] ([out, in] if transposed) with both sides in INT8:
    an int8 x int8 dot accumulated in int32, rescaled by the token's and the output channel's scales. float32."""
    xq, x_scales = quantize_rows(x)
    if transposed and xq.size == xq.shape[-1] and jax.default_backend() == "cpu":
        # One row (batch-1 decoding): XLA:CPU's int8 dot is a slow generic loop; a fused int32 multiply-sum over
        # the kernel's rows streams it 4-5x faster (measured through the generation benchmark's weights).
        acc = (values.astype(jnp.int32) * xq.reshape(1, -1).astype(jnp.int32)).sum(-1).reshape(xq.shape[:-1] + (-1,))
    else:
        acc = jax.lax.dot_general(xq, values, (((xq.ndim - 1,), (1 if transposed else 0,)), ((), ())),
                                  preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * x_scales[..., None] * scales.reshape(-1)
