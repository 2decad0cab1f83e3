"""Vision Transformer ("An Image is Worth 16x16 Words"), as pure MindSpore Cells.

Pre-norm encoder blocks, convolutional patch embedding, class token, learned position embedding,
stochastic depth. The model takes its norm, attention and MLP layers through a declared seam
(ViTLayers), as timm's `norm_layer`/`attn_layer` do: that is how a backend's kernels plug in. No
parallel, precision or I/O code lives here: strategies and mixed precision are applied from outside.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import TruncatedNormal, Zero, initializer

from vit_dist.models.spec import ViTSpec


class Linear(nn.Cell):
    """x W^T + b with W stored (out, in) as nn.Dense, or in `weight_shape` (out, ...) such as a
    convolution kernel's, flattened for the product. The bias is added by Add rather than BiasAdd: on
    the CPU backend BiasAdd's gradient kernel is several times slower than the ReduceSum Add's takes."""

    def __init__(self, in_features: int, out_features: int, weight_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.out_features = out_features
        self.weight = Parameter(initializer(TruncatedNormal(0.02), weight_shape or (out_features, in_features),
                                            ms.float32), name="weight")
        self.bias = Parameter(initializer(Zero(), (out_features,), ms.float32), name="bias")
        self.matmul = ops.MatMul(transpose_b=True)
        self.bias_add = ops.Add()

    def construct(self, x):
        rows = self.matmul(x.reshape(-1, x.shape[-1]), self.weight.reshape(self.out_features, -1))
        return self.bias_add(rows, self.bias).reshape(x.shape[:-1] + (-1,))


class GELU(nn.Cell):
    """Exact GELU, x/2 * (1 + erf(x/sqrt 2)), from primitives of its own: nn.GELU divides by sqrt 2
    (Div is slow on the CPU backend), and a primitive per op can carry a shard strategy."""

    def __init__(self):
        super().__init__()
        self.scale_in = ops.Mul()
        self.erf = ops.Erf()
        self.add_one = ops.Add()
        self.mul = ops.Mul()
        self.half = ops.Mul()
        self.inv_sqrt2 = Tensor(1.0 / math.sqrt(2.0), ms.float32)
        self.one = Tensor(1.0, ms.float32)
        self.one_half = Tensor(0.5, ms.float32)

    def construct(self, x):
        dtype = x.dtype
        cdf = self.add_one(self.erf(self.scale_in(x, self.inv_sqrt2.astype(dtype))), self.one.astype(dtype))
        return self.half(self.mul(x, cdf), self.one_half.astype(dtype))


class TanhGELU(nn.Cell):
    """GELU's tanh approximation, as nn.GELU(approximate=True) computes it, through a primitive of its
    own: nn.GELU calls one shared by every caller, which cannot carry a shard strategy per layer."""

    def __init__(self):
        super().__init__()
        self.gelu = ops.GeLU()

    def construct(self, x):
        return self.gelu(x)


def layer_norm(spec: ViTSpec) -> nn.LayerNorm:
    return nn.LayerNorm((spec.embed_dim,), epsilon=spec.layer_norm_eps)


def dropout(drop_prob: float) -> nn.Cell:
    """The stock dropout layer of the seam."""
    return nn.Dropout(p=drop_prob)


class DropPath(nn.Cell):
    """Stochastic depth: drops a whole residual branch per sample, scaling survivors by 1/keep."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.enabled = drop_prob > 0.0
        # Dropout on a per-sample ones mask gives the Bernoulli draw and the 1/keep scaling in one op.
        self.dropout = nn.Dropout(p=drop_prob) if self.enabled else None
        self.mul = ops.Mul()

    def construct(self, x):
        if not self.enabled or not self.training:
            return x
        mask = ops.ones((x.shape[0], 1, 1), x.dtype)
        return self.mul(x, self.dropout(mask))


class PatchEmbed(nn.Cell):
    """Non-overlapping patches projected to tokens: the strided convolution of every ViT, with its
    (D, C, p, p) kernel, computed as one matmul over flattened patches, which the CPU backend runs
    tens of times faster than its Conv2D."""

    def __init__(self, spec: ViTSpec):
        super().__init__()
        self.patch_size = spec.patch_size
        c, p = spec.in_channels, spec.patch_size
        self.proj = Linear(c * p * p, spec.embed_dim, weight_shape=(spec.embed_dim, c, p, p))
        self.to_patches = ops.Transpose()

    def construct(self, x):
        b, c, h, w = x.shape
        p = self.patch_size
        # (B, C, H/p, p, W/p, p) -> (B, H/p, W/p, C, p, p): each patch flattened as the kernel is.
        patches = self.to_patches(x.reshape(b, c, h // p, p, w // p, p), (0, 2, 4, 1, 3, 5))
        return self.proj(patches.reshape(b, (h // p) * (w // p), c * p * p))  # (B, N, D)


class Attention(nn.Cell):
    """Multi-head self-attention. Separate q/k/v projections: splitting one fused qkv output costs a
    strided slice per head group, which is slow on CPU and gains nothing on accelerators. Every op but
    the reshapes is a primitive of this layer's own, so that each can carry a shard strategy."""

    def __init__(self, spec: ViTSpec, dropout: Callable[[float], nn.Cell] = dropout):
        super().__init__()
        dim = spec.embed_dim
        self.num_heads = spec.num_heads
        self.head_dim = dim // spec.num_heads
        self.scale = self.head_dim ** -0.5
        self.query_scale = Tensor(self.scale, ms.float32)
        self.query = Linear(dim, dim)
        self.key = Linear(dim, dim)
        self.value = Linear(dim, dim)
        self.out = Linear(dim, dim)
        self.scale_query = ops.Mul()
        self.split_heads = ops.Transpose()
        self.merge_heads = ops.Transpose()
        self.scores = ops.BatchMatMul(transpose_b=True)
        self.context = ops.BatchMatMul()
        self.softmax = nn.Softmax(axis=-1)
        self.attn_drop = dropout(spec.attention_dropout)
        self.out_drop = dropout(spec.dropout)

    def _heads(self, x, b, t):
        return self.split_heads(x.reshape(b, t, self.num_heads, self.head_dim), (0, 2, 1, 3))  # (B, H, T, hd)

    def construct(self, x):
        b, t, d = x.shape
        q = self.query(x)
        q = self._heads(self.scale_query(q, self.query_scale.astype(q.dtype)), b, t)
        k = self._heads(self.key(x), b, t)
        v = self._heads(self.value(x), b, t)
        weights = self.attn_drop(self.softmax(self.scores(q, k)))
        context = self.merge_heads(self.context(weights, v), (0, 2, 1, 3)).reshape(b, t, d)
        return self.out_drop(self.out(context))


class Mlp(nn.Cell):
    """fc1, GELU, dropout, fc2, dropout. Two dropout layers, as timm's Mlp has: the hidden and the
    output activation have different shapes (and layouts under semi_auto)."""

    def __init__(self, spec: ViTSpec, dropout: Callable[[float], nn.Cell] = dropout):
        super().__init__()
        self.fc1 = Linear(spec.embed_dim, spec.mlp_dim)
        self.act = TanhGELU() if spec.gelu_approximate else GELU()
        self.drop1 = dropout(spec.dropout)
        self.fc2 = Linear(spec.mlp_dim, spec.embed_dim)
        self.drop2 = dropout(spec.dropout)

    def construct(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


@dataclass(frozen=True)
class ViTLayers:
    """The seam: each field builds one layer from the spec. A replacement keeps the stock layer's
    Parameters and their names (checkpoints and shard strategies refer to them) and its mathematics."""
    norm: Callable[[ViTSpec], nn.Cell] = layer_norm  # over the last axis: norm1, norm2 and the final norm
    attention: Callable[[ViTSpec, Callable], nn.Cell] = Attention  # (spec, the seam's dropout factory)
    mlp: Callable[[ViTSpec, Callable], nn.Cell] = Mlp
    drop_path: Callable[[float], nn.Cell] = DropPath  # from the block's drop probability
    dropout: Callable[[float], nn.Cell] = dropout  # from a drop probability: the model's and attention's dropout


class Block(nn.Cell):
    """Pre-norm encoder block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, spec: ViTSpec, drop_path: float, layers: ViTLayers):
        super().__init__()
        self.norm1 = layers.norm(spec)
        self.attn = layers.attention(spec, layers.dropout)
        self.norm2 = layers.norm(spec)
        self.mlp = layers.mlp(spec, layers.dropout)
        self.drop_path = layers.drop_path(drop_path)
        self.add_attention = ops.Add()  # the residual adds: primitives of their own, for shard strategies
        self.add_mlp = ops.Add()

    def construct(self, x):
        x = self.add_attention(x, self.drop_path(self.attn(self.norm1(x))))
        return self.add_mlp(x, self.drop_path(self.mlp(self.norm2(x))))


class VisionTransformer(nn.Cell):
    def __init__(self, spec: ViTSpec, layers: ViTLayers = ViTLayers()):
        super().__init__()
        self.spec = spec
        self.patch_embed = PatchEmbed(spec)
        self.cls_token = Parameter(initializer(Zero(), (1, 1, spec.embed_dim), ms.float32), name="cls_token")
        self.pos_embed = Parameter(initializer(TruncatedNormal(0.02), (1, spec.num_patches + 1, spec.embed_dim),
                                               ms.float32), name="pos_embed")
        self.pos_drop = layers.dropout(spec.dropout)
        # Stochastic depth grows linearly with depth, from 0 at the first block.
        rates = [spec.drop_path_rate * i / max(spec.depth - 1, 1) for i in range(spec.depth)]
        self.blocks = nn.SequentialCell([Block(spec, rate, layers) for rate in rates])
        self.norm = layers.norm(spec)
        self.head = Linear(spec.embed_dim, spec.num_classes)
        self.prepend_class_token = ops.Concat(axis=1)
        self.add_position = ops.Add()

    def construct(self, x):
        x = self.patch_embed(x)
        cls = ops.broadcast_to(self.cls_token, (x.shape[0], -1, -1)).astype(x.dtype)
        x = self.add_position(self.prepend_class_token((cls, x)), self.pos_embed.astype(x.dtype))
        x = self.norm(self.blocks(self.pos_drop(x)))
        return self.head(x[:, 0])


def count_parameters(net: nn.Cell) -> int:
    return sum(p.size for p in net.trainable_params())
