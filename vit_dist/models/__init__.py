"""Model factory: turns the typed config into a built network."""
from __future__ import annotations

from vit_dist.config import Config
from vit_dist.models.vit import ViTSpec, VisionTransformer


def vit_spec(cfg: Config, num_classes: int) -> ViTSpec:
    m = cfg.model
    return ViTSpec(image_size=cfg.data.image_size, patch_size=m.patch_size, embed_dim=m.embed_dim, depth=m.depth,
                   num_heads=m.num_heads, mlp_dim=m.mlp_dim, num_classes=num_classes, dropout=m.dropout,
                   attention_dropout=m.attention_dropout, drop_path_rate=m.drop_path_rate,
                   layer_norm_eps=m.layer_norm_eps, gelu_approximate=m.gelu_approximate)


def build_model(cfg: Config, num_classes: int) -> VisionTransformer:
    return VisionTransformer(vit_spec(cfg, num_classes))
