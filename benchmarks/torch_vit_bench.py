"""PyTorch ViT training throughput on the CPU: the peer vit-dist's step is compared with.

What it measures: images/s of one PyTorch training step (forward, cross-entropy, backward,
torch.optim.AdamW, zero_grad) in eager mode, one process, on one fixed synthetic batch, for the same
two configs as ms_vit_bench.py. The model is one of:

    --impl hf          Hugging Face transformers' ViTForImageClassification (default)
    --impl plain       a hand-written ViT, the same as ms_vit_bench.py's (conv patch embedding, fused qkv
                       Linear, matmul attention and softmax, exact GELU MLP)
    --impl plain-sdpa  the same with torch's scaled_dot_product_attention

Run it from the repository root in an environment with torch==2.13.0 (CPU build) and transformers
(the test extra installs both: launch/install.sh test):

    python benchmarks/torch_vit_bench.py --config b --impl hf --steps 20
    python benchmarks/torch_vit_bench.py --config a --impl hf --steps 10
    python benchmarks/torch_vit_bench.py --config b --impl plain --steps 3 --warmup 1   # a quick check

Options: --batch-size N, --warmup W, --threads N (torch.set_num_threads; 0: torch's default, the
core count), --bf16 (CPU bfloat16 autocast), --compile (torch.compile), --peak-gflops G (MFU against
G), --json. It prints the same line as ms_vit_bench.py.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class Block(nn.Module):
    def __init__(self, dim, heads, sdpa):
        super().__init__()
        self.heads, self.head_dim, self.sdpa = heads, dim // heads, sdpa
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = torch.matmul(torch.matmul(q * self.head_dim ** -0.5, k.transpose(-2, -1)).softmax(-1), v)
        x = x + self.proj(out.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class PlainViT(nn.Module):
    def __init__(self, img, patch, dim, depth, heads, classes, sdpa=False, **_):
        super().__init__()
        patches = (img // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, sdpa) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class HFLogits(nn.Module):
    """ViTForImageClassification returning its logits, so every --impl is called alike."""

    def __init__(self, c):
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification

        self.model = ViTForImageClassification(ViTConfig(
            image_size=c["img"], patch_size=c["patch"], hidden_size=c["dim"], num_hidden_layers=c["depth"],
            num_attention_heads=c["heads"], intermediate_size=4 * c["dim"], num_labels=c["classes"]))

    def forward(self, x):
        return self.model(pixel_values=x).logits


def build(impl: str, c: dict) -> nn.Module:
    if impl == "hf":
        return HFLogits(c)
    return PlainViT(**c, sdpa=impl == "plain-sdpa")


def main() -> None:
    p = bench_common.parser("PyTorch ViT training throughput (eager, CPU).")
    p.add_argument("--impl", choices=("hf", "plain", "plain-sdpa"), default="hf",
                   help="hf: transformers' ViTForImageClassification (default); plain: a hand-written ViT; "
                        "plain-sdpa: with scaled_dot_product_attention")
    p.add_argument("--bf16", action="store_true", help="torch.autocast('cpu', dtype=torch.bfloat16)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c = bench_common.config(args)
    model = build(args.impl, c)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    forward = torch.compile(model) if args.compile else model
    x = torch.randn(c["batch"], 3, c["img"], c["img"])
    y = torch.randint(0, c["classes"], (c["batch"],))

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    timing = bench_common.run(step, args)
    system = (f"PyTorch {torch.__version__} eager, {args.impl}{', compiled' if args.compile else ''}, "
              f"{'bf16 autocast' if args.bf16 else 'fp32'}")
    bench_common.report(system, args, c, params, timing)


if __name__ == "__main__":
    main()
