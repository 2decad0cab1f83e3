"""The ViT's sizes: the one table of standard variants, the spec a model is built from, and its
parameter count and FLOPs in closed form. Pure Python: the config, the planner and weight import
read it before MindSpore starts."""
from __future__ import annotations

from dataclasses import dataclass

# name: (embed_dim, depth, num_heads), as in "An Image is Worth 16x16 Words" and DeiT; MLP 4x wide.
VIT_VARIANTS = {
    "ti": (192, 12, 3),
    "s": (384, 12, 6),
    "b": (768, 12, 12),
    "l": (1024, 24, 16),
    "h": (1280, 32, 16),
}


def standard_heads(embed_dim: int) -> int | None:
    """The head count of the standard variant of this width (sources like timm do not record it)."""
    return next((heads for dim, _, heads in VIT_VARIANTS.values() if dim == embed_dim), None)


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

    @property
    def tokens(self) -> int:
        return self.num_patches + 1

    @classmethod
    def of(cls, cfg, num_classes: int) -> "ViTSpec":
        """The spec of a config (host.config.Config) for num_classes classes."""
        m = cfg.model
        return cls(image_size=cfg.data.image_size, patch_size=m.patch_size, embed_dim=m.embed_dim, depth=m.depth,
                   num_heads=m.num_heads, mlp_dim=m.mlp_dim, num_classes=num_classes, dropout=m.dropout,
                   attention_dropout=m.attention_dropout, drop_path_rate=m.drop_path_rate,
                   layer_norm_eps=m.layer_norm_eps, gelu_approximate=m.gelu_approximate)


def parameter_shapes(spec: ViTSpec) -> dict[str, tuple[int, ...]]:
    """The model's trainable parameters by name, with their shapes (models/vit.py builds them so):
    what a weights-only file holds."""
    d, p, c = spec.embed_dim, spec.patch_size, spec.in_channels
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, spec.tokens, d), "patch_embed.proj.weight": (d, c, p, p),
              "patch_embed.proj.bias": (d,)}
    for i in range(spec.depth):
        block = f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            shapes.update({f"{block}{norm}.gamma": (d,), f"{block}{norm}.beta": (d,)})
        for proj in ("query", "key", "value", "out"):
            shapes.update({f"{block}attn.{proj}.weight": (d, d), f"{block}attn.{proj}.bias": (d,)})
        shapes.update({f"{block}mlp.fc1.weight": (spec.mlp_dim, d), f"{block}mlp.fc1.bias": (spec.mlp_dim,),
                       f"{block}mlp.fc2.weight": (d, spec.mlp_dim), f"{block}mlp.fc2.bias": (d,)})
    shapes.update({"norm.gamma": (d,), "norm.beta": (d,), "head.weight": (spec.num_classes, d),
                   "head.bias": (spec.num_classes,)})
    return shapes


def forward_flops(spec: ViTSpec) -> int:
    """Forward FLOPs per image, counting a multiply-add as 2; norms, softmax and GELU are ignored."""
    d = spec.embed_dim
    patch_embed = 2 * spec.num_patches * spec.patch_size ** 2 * spec.in_channels * d
    per_block = 2 * spec.tokens * (4 * d * d + 2 * d * spec.mlp_dim) + 4 * spec.tokens * spec.tokens * d
    return patch_embed + spec.depth * per_block + 2 * d * spec.num_classes


def train_flops_per_image(spec: ViTSpec) -> float:
    """Forward + backward FLOPs of one image: 3x the forward's matmul FLOPs (backward is two matmuls
    per forward matmul), the convention MFU figures use."""
    return 3.0 * forward_flops(spec)
