"""Vision Transformer ("An Image is Worth 16x16 Words"), as pure MindSpore Cells.

Pre-norm encoder blocks, convolutional patch embedding, class token, learned position embedding,
stochastic depth. No parallel, precision or I/O code lives here: strategies and mixed precision
are applied to a built model from outside.
"""
from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import TruncatedNormal, Zero, initializer


@dataclass(frozen=True)
class ViTSpec:
    image_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    num_classes: int
    in_channels: int = 3
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path_rate: float = 0.0
    layer_norm_eps: float = 1e-6
    gelu_approximate: bool = False

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _dense(in_features: int, out_features: int) -> nn.Dense:
    return nn.Dense(in_features, out_features, weight_init=TruncatedNormal(0.02), bias_init=Zero())


def _layer_norm(spec: ViTSpec) -> nn.LayerNorm:
    return nn.LayerNorm((spec.embed_dim,), epsilon=spec.layer_norm_eps)


class DropPath(nn.Cell):
    """Stochastic depth: drops a whole residual branch per sample, scaling survivors by 1/keep."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.enabled = drop_prob > 0.0
        # Dropout on a per-sample ones mask gives the Bernoulli draw and the 1/keep scaling in one op.
        self.dropout = nn.Dropout(p=drop_prob) if self.enabled else None

    def construct(self, x):
        if not self.enabled or not self.training:
            return x
        mask = ops.ones((x.shape[0], 1, 1), x.dtype)
        return x * self.dropout(mask)


class PatchEmbed(nn.Cell):
    """Non-overlapping patches projected by a strided convolution, flattened to tokens."""

    def __init__(self, spec: ViTSpec):
        super().__init__()
        self.proj = nn.Conv2d(spec.in_channels, spec.embed_dim, spec.patch_size, stride=spec.patch_size,
                              pad_mode="valid", has_bias=True, weight_init=TruncatedNormal(0.02), bias_init=Zero())

    def construct(self, x):
        x = self.proj(x)  # (B, D, H/p, W/p)
        b, d = x.shape[0], x.shape[1]
        return x.reshape(b, d, -1).transpose(0, 2, 1)  # (B, N, D)


class Attention(nn.Cell):
    """Multi-head self-attention. Separate q/k/v projections: splitting one fused qkv output costs a
    strided slice per head group, which is slow on CPU and gains nothing on accelerators."""

    def __init__(self, spec: ViTSpec):
        super().__init__()
        dim = spec.embed_dim
        self.num_heads = spec.num_heads
        self.head_dim = dim // spec.num_heads
        self.scale = self.head_dim ** -0.5
        self.query = _dense(dim, dim)
        self.key = _dense(dim, dim)
        self.value = _dense(dim, dim)
        self.out = _dense(dim, dim)
        self.scores = ops.BatchMatMul(transpose_b=True)
        self.context = ops.BatchMatMul()
        self.softmax = nn.Softmax(axis=-1)
        self.attn_drop = nn.Dropout(p=spec.attention_dropout)
        self.out_drop = nn.Dropout(p=spec.dropout)

    def _heads(self, x, b, t):
        return x.reshape(b, t, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)  # (B, H, T, hd)

    def construct(self, x):
        b, t, d = x.shape
        q = self._heads(self.query(x) * self.scale, b, t)
        k = self._heads(self.key(x), b, t)
        v = self._heads(self.value(x), b, t)
        weights = self.attn_drop(self.softmax(self.scores(q, k)))
        context = self.context(weights, v).transpose(0, 2, 1, 3).reshape(b, t, d)
        return self.out_drop(self.out(context))


class Mlp(nn.Cell):
    def __init__(self, spec: ViTSpec):
        super().__init__()
        self.fc1 = _dense(spec.embed_dim, spec.mlp_dim)
        self.act = nn.GELU(approximate=spec.gelu_approximate)
        self.fc2 = _dense(spec.mlp_dim, spec.embed_dim)
        self.drop = nn.Dropout(p=spec.dropout)

    def construct(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Cell):
    """Pre-norm encoder block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, spec: ViTSpec, drop_path: float):
        super().__init__()
        self.norm1 = _layer_norm(spec)
        self.attn = Attention(spec)
        self.norm2 = _layer_norm(spec)
        self.mlp = Mlp(spec)
        self.drop_path = DropPath(drop_path)

    def construct(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Cell):
    def __init__(self, spec: ViTSpec):
        super().__init__()
        self.spec = spec
        self.patch_embed = PatchEmbed(spec)
        self.cls_token = Parameter(initializer(Zero(), (1, 1, spec.embed_dim), ms.float32), name="cls_token")
        self.pos_embed = Parameter(initializer(TruncatedNormal(0.02), (1, spec.num_patches + 1, spec.embed_dim),
                                               ms.float32), name="pos_embed")
        self.pos_drop = nn.Dropout(p=spec.dropout)
        # Stochastic depth grows linearly with depth, from 0 at the first block.
        rates = [spec.drop_path_rate * i / max(spec.depth - 1, 1) for i in range(spec.depth)]
        self.blocks = nn.SequentialCell([Block(spec, rate) for rate in rates])
        self.norm = _layer_norm(spec)
        self.head = _dense(spec.embed_dim, spec.num_classes)

    def construct(self, x):
        x = self.patch_embed(x)
        cls = ops.broadcast_to(self.cls_token, (x.shape[0], -1, -1)).astype(x.dtype)
        x = ops.concat((cls, x), 1) + self.pos_embed.astype(x.dtype)
        x = self.norm(self.blocks(self.pos_drop(x)))
        return self.head(x[:, 0])


def count_parameters(net: nn.Cell) -> int:
    return sum(p.size for p in net.trainable_params())


def forward_flops(spec: ViTSpec) -> int:
    """Forward FLOPs per image, counting a multiply-add as 2; norms, softmax and GELU are ignored."""
    tokens = spec.num_patches + 1
    d = spec.embed_dim
    patch_embed = 2 * spec.num_patches * spec.patch_size ** 2 * spec.in_channels * d
    per_block = 2 * tokens * (4 * d * d + 2 * d * spec.mlp_dim) + 4 * tokens * tokens * d
    return patch_embed + spec.depth * per_block + 2 * d * spec.num_classes
