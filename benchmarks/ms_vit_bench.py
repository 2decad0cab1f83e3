"""Plain MindSpore ViT training throughput on the CPU: the baseline vit-dist's step is compared with.

What it measures: images/s of a straightforward MindSpore ViT trained in graph mode on the CPU
backend, one process, float32, on one fixed synthetic batch. The model is what a MindSpore user
writes first: a Conv2d patch embedding, class token and position embedding, pre-norm blocks with one
nn.Dense for q, k and v, BatchMatMul attention and softmax, an nn.GELU MLP, a final LayerNorm and a
linear head. The step is ms.value_and_grad of the cross-entropy loss plus nn.AdamWeightDecay, in one
@ms.jit function. None of vit-dist's code is used.

Run it from the repository root with the vit-dist environment (mindspore==2.10.0, numpy<2):

    python benchmarks/ms_vit_bench.py --config b --steps 20     # config B: 32 px, batch 64
    python benchmarks/ms_vit_bench.py --config a --steps 10     # config A: ViT-Ti/16 at 224 px, batch 8
    python benchmarks/ms_vit_bench.py --config b --steps 3 --warmup 1   # a quick check that it runs

Options: --batch-size N, --warmup W, --threads N (MindSpore's CPU kernel threads; 0: its default),
--jit-level O0|O1|O2, --gelu-tanh, --peak-gflops G (MFU against G), --json. It prints one line: the
median images/s (min-max), step time, first step (compile + run), achieved GFLOP/s, peak RSS, the
first and last loss.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402

import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402
from mindspore import Parameter, Tensor, nn, ops  # noqa: E402
from mindspore.common.initializer import TruncatedNormal, initializer  # noqa: E402


class Attention(nn.Cell):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Dense(dim, 3 * dim)
        self.proj = nn.Dense(dim, dim)
        self.scores = ops.BatchMatMul(transpose_b=True)
        self.context = ops.BatchMatMul()
        self.softmax = nn.Softmax(axis=-1)

    def construct(self, x):
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = self.softmax(self.scores(q * self.scale, k))
        out = self.context(attn, v).transpose(0, 2, 1, 3).reshape(b, t, d)
        return self.proj(out)


class Block(nn.Cell):
    def __init__(self, dim, heads, gelu_tanh):
        super().__init__()
        self.norm1 = nn.LayerNorm((dim,), epsilon=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm((dim,), epsilon=1e-6)
        self.fc1 = nn.Dense(dim, 4 * dim)
        self.act = nn.GELU(approximate=gelu_tanh)
        self.fc2 = nn.Dense(4 * dim, dim)

    def construct(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ViT(nn.Cell):
    def __init__(self, img, patch, dim, depth, heads, classes, gelu_tanh=False, **_):
        super().__init__()
        patches = (img // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch, pad_mode="valid", has_bias=True)
        self.cls_token = Parameter(initializer("zeros", (1, 1, dim), ms.float32), name="cls_token")
        self.pos_embed = Parameter(initializer(TruncatedNormal(0.02), (1, patches + 1, dim), ms.float32),
                                   name="pos_embed")
        self.blocks = nn.SequentialCell([Block(dim, heads, gelu_tanh) for _ in range(depth)])
        self.norm = nn.LayerNorm((dim,), epsilon=1e-6)
        self.head = nn.Dense(dim, classes)

    def construct(self, x):
        x = self.patch_embed(x)
        b, d = x.shape[0], x.shape[1]
        x = x.reshape(b, d, -1).transpose(0, 2, 1)
        x = ops.concat((ops.broadcast_to(self.cls_token, (b, -1, -1)), x), 1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def main() -> None:
    p = bench_common.parser("Plain MindSpore ViT training throughput (graph mode, CPU, float32).")
    p.add_argument("--jit-level", default="", help="ms.jit's jit_level O0|O1|O2 (default: MindSpore's)")
    p.add_argument("--gelu-tanh", action="store_true", help="the tanh GELU instead of the exact one")
    args = p.parse_args()

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    if args.threads:
        ms.device_context.cpu.op_tuning.threads_num(args.threads)
    ms.set_seed(0)
    c = bench_common.config(args)
    net = ViT(**c, gelu_tanh=args.gelu_tanh)
    net.set_train(True)
    params = sum(int(np.prod(p.shape)) for p in net.trainable_params())
    loss_fn = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    optimizer = nn.AdamWeightDecay(net.trainable_params(), learning_rate=1e-4, weight_decay=0.05)

    def forward(x, y):
        return loss_fn(net(x), y)

    grad_fn = ms.value_and_grad(forward, None, optimizer.parameters)

    def train_step(x, y):
        loss, grads = grad_fn(x, y)
        return ops.depend(loss, optimizer(grads))

    train_step = ms.jit(train_step, jit_level=args.jit_level) if args.jit_level else ms.jit(train_step)

    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((c["batch"], 3, c["img"], c["img"])).astype(np.float32))
    y = Tensor(rng.integers(0, c["classes"], (c["batch"],)).astype(np.int32))
    timing = bench_common.run(lambda: float(train_step(x, y).asnumpy()), args)
    system = f"plain MindSpore {ms.__version__} (graph mode{', ' + args.jit_level if args.jit_level else ''}, fp32)"
    bench_common.report(system, args, c, params, timing)


if __name__ == "__main__":
    main()
