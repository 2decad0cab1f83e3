"""The two benchmark configs and the FLOPs and parameters of a standard ViT.

Shared by ms_vit_bench.py and torch_vit_bench.py; run it alone to print both configs:

    python benchmarks/vit_flops.py

Forward FLOPs per image (a multiply-add counts as 2; LayerNorm, softmax, GELU and biases are ignored):

    patch embedding   2 * Np * (p * p * C) * d
    each block        2 * T * 12 * d^2   (q, k, v 3d^2 + out d^2 + MLP 2 * d * 4d)  +  4 * T^2 * d  (QK^T and AV)
    head              2 * d * classes    (class token only)

with Np = (H / p)^2 patches and T = Np + 1 tokens. Training FLOPs = 3 x forward (the backward pass is
counted as twice the forward). This is the count `vit-dist info` and `vit-dist bench` use, so MFU
figures of the three programs compare directly.
"""
from __future__ import annotations

# name: image size, patch, width, depth, heads, classes, batch. The same as configs/bench/*.yaml.
CONFIGS = {
    # A: ViT-Ti/16 at 224 px, 1000 classes (configs/bench/vit_ti16_224.yaml)
    "a": dict(img=224, patch=16, dim=192, depth=12, heads=3, classes=1000, batch=8),
    # B: 32 px, patch 4, 10 classes (configs/bench/vit_32px.yaml)
    "b": dict(img=32, patch=4, dim=192, depth=6, heads=3, classes=10, batch=64),
}


def vit_flops(img, patch, dim, depth, heads, classes, chans=3, **_):
    """{"tokens": T, "fwd": forward FLOPs per image, "train": training FLOPs per image}."""
    patches = (img // patch) ** 2
    tokens = patches + 1
    d = dim
    patch_embed = 2 * patches * patch * patch * chans * d
    blocks = depth * (2 * tokens * 12 * d * d + 4 * tokens * tokens * d)
    head = 2 * d * classes
    forward = patch_embed + blocks + head
    return dict(tokens=tokens, fwd=forward, train=3 * forward)


def vit_params(img, patch, dim, depth, heads, classes, chans=3, **_):
    """Parameters of the ViT both benchmarks build (patch embedding with bias, class token, position
    embedding, blocks with biases and two LayerNorms, final LayerNorm, head)."""
    patches = (img // patch) ** 2
    d = dim
    patch_embed = patch * patch * chans * d + d
    blocks = depth * (12 * d * d + 9 * d + 4 * d)  # weights, biases (qkv 3d, out d, fc1 4d, fc2 d), 2 LayerNorms (4d)
    return patch_embed + blocks + (patches + 1) * d + d + 2 * d + d * classes + classes


def main() -> None:
    for name, c in CONFIGS.items():
        f = vit_flops(**c)
        print(f"config {name}: {c['img']} px, patch {c['patch']}, dim {c['dim']}, depth {c['depth']}, "
              f"heads {c['heads']}, {c['classes']} classes, batch {c['batch']}: "
              f"{vit_params(**c) / 1e6:.3f}M parameters, {f['tokens']} tokens, "
              f"forward {f['fwd'] / 1e9:.3f} GFLOP/image, training {f['train'] / 1e9:.3f} GFLOP/image, "
              f"{f['train'] * c['batch'] / 1e9:.1f} GFLOP per step")


if __name__ == "__main__":
    main()
