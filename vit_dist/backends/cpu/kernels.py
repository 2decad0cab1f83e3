"""Fused float32 CPU kernels for what MindSpore's CPU backend runs slowest in a ViT step: LayerNorm
(its LayerNormGrad takes about 11 ns per element on one thread), the exact GELU (scalar erf and exp,
and a Pow in its autodiff backward) with fc1's bias, and attention (head transposes, BatchMatMuls and
an unfused softmax backward, each a pass over memory). `kernels.cc` is compiled once with the
system's C++ compiler into MindSpore AOT custom ops, and the layers that run them plug into the
model's seam (models.vit.ViTLayers). Same mathematics and Parameters: outputs and gradients equal
MindSpore's own ops within float32 rounding (tested).

Without a compiler, or with one that fails, the model keeps MindSpore's layers (backends says so once)."""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from vit_dist.host.atomic import atomic_path
from vit_dist.host.private import is_private, private_folder
from vit_dist.models.spec import ViTSpec
from vit_dist.models.vit import Attention, Mlp, ViTLayers

SOURCE = Path(__file__).with_suffix(".cc")
# -ffast-math lets GCC call glibc's vectorised erff/expf (libmvec, glibc 2.35+); --no-undefined turns
# a glibc without them into a link error, and the plain build is tried next.
BUILDS = (
    ["-O3", "-march=native", "-ffast-math", "-Wl,--no-undefined", "-lmvec"],
    ["-O3", "-march=native", "-Wl,--no-undefined"],
)
COMMON_FLAGS = ["-std=c++17", "-shared", "-fPIC", "-pthread"]


def build_library(compiler: str = "g++", cache_dir: Optional[Path] = None) -> Optional[Path]:
    """Compiles kernels.cc once per source, compiler and host (-march=native) into cache_dir (a
    per-user folder under the temporary directory by default) and returns the library, or None if
    no build succeeds. The folder must be the user's own (the library is loaded and run): otherwise
    ConfigError. Concurrent ranks each build into an exclusive temporary file renamed into place."""
    key = hashlib.sha256(SOURCE.read_bytes() + f"{compiler} {BUILDS} {platform.node()}".encode()).hexdigest()[:16]
    folder = private_folder(cache_dir or Path(tempfile.gettempdir()) / f"vit-dist-kernels-{os.getuid()}",
                            "the fused CPU kernels' cache", "remove it, or set parallel.fused_cpu_kernels=false")
    library = folder / f"cpu_kernels-{key}.so"
    if library.is_file() and not library.is_symlink() and is_private(library):
        return library
    return library if any(_build(compiler, flags, library) for flags in BUILDS) else None


def _build(compiler: str, flags: list[str], library: Path) -> bool:
    """One build into an exclusive temporary file, renamed to `library` if the compiler succeeds."""
    try:
        with atomic_path(library, durable=False) as tmp:
            subprocess.run([compiler, *COMMON_FLAGS, "-o", str(tmp), str(SOURCE), *flags, "-lm"],
                           capture_output=True, timeout=120, check=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def custom_ops(library: Path, threads: int) -> dict:
    """The AOT custom ops (forward ops carry their backward as bprop), on `threads` threads each."""
    ctypes.CDLL(str(library)).vit_dist_set_threads(threads)
    f32 = ms.float32

    def aot(name: str, out_shape: Callable, outputs: int, bprop=None):
        dtype = (lambda *_: (f32,) * outputs) if outputs > 1 else (lambda *_: f32)
        return ops.Custom(f"{library}:{name}", out_shape=out_shape, out_dtype=dtype, func_type="aot", bprop=bprop)

    layer_norm_backward = aot("LayerNormBackward", lambda dy, x, gamma, mean, rstd: (x, gamma, gamma), 3)
    bias_gelu_backward = aot("BiasGeluBackward", lambda x, bias, dy: (x, bias), 2)
    attention_backward = aot("AttentionBackward", lambda dcontext, qkv, bias, head_scale, probs: (qkv, bias), 2)

    def layer_norm_bprop(x, gamma, beta, epsilon, out, dout):
        dx, dgamma, dbeta = layer_norm_backward(dout[0], x, gamma, out[1], out[2])
        return dx, dgamma, dbeta, ops.zeros_like(epsilon)

    def bias_gelu_bprop(x, bias, out, dout):
        dx, dbias = bias_gelu_backward(x, bias, dout)
        return dx, dbias

    def attention_bprop(qkv, bias, head_scale, out, dout):
        dqkv, dbias = attention_backward(dout[0], qkv, bias, head_scale, out[1])
        return dqkv, dbias, ops.zeros_like(head_scale)

    def attention_shapes(qkv, bias, head_scale):
        batch, tokens, width = qkv
        return (batch, tokens, width // 3), (batch, head_scale[0], tokens, -(-tokens // 16) * 16)

    return {
        # (y, mean, rstd): the statistics are kept for the backward.
        "layer_norm": aot("LayerNormForward", lambda x, gamma, beta, epsilon: (x, x[:-1], x[:-1]), 3,
                          layer_norm_bprop),
        "bias_gelu": aot("BiasGeluForward", lambda x, bias: x, 1, bias_gelu_bprop),
        # (context, softmax probabilities): the probabilities are kept for the backward.
        "attention": aot("AttentionForward", attention_shapes, 2, attention_bprop),
    }


class FusedLayerNorm(nn.LayerNorm):
    """nn.LayerNorm over the last axis through the fused op."""

    def __init__(self, spec: ViTSpec, fused):
        super().__init__((spec.embed_dim,), epsilon=spec.layer_norm_eps)
        self.fused = fused
        self.epsilon_tensor = ms.Tensor([spec.layer_norm_eps], ms.float32)

    def construct(self, x):
        return self.fused(x, self.gamma, self.beta, self.epsilon_tensor)[0]


class FusedAttention(Attention):
    """Attention through the fused op, q, k and v from one MatMul over their weights side by side (the
    Parameters stay query/key/value/out); the scale is passed once per head. No attention dropout."""

    def __init__(self, spec: ViTSpec, fused, dropout: Callable[[float], nn.Cell]):
        super().__init__(spec, dropout)
        self.fused = fused
        self.head_scale = ms.Tensor(np.full(self.num_heads, self.scale, np.float32))

    def construct(self, x):
        b, t, d = x.shape
        weight = ops.concat((self.query.weight, self.key.weight, self.value.weight))
        bias = ops.concat((self.query.bias, self.key.bias, self.value.bias))
        qkv = self.query.matmul(x.reshape(-1, d), weight).reshape(b, t, 3 * d)
        return self.out_drop(self.out(self.fused(qkv, bias, self.head_scale)[0]))


class FusedMlp(Mlp):
    """Mlp with fc1's bias added inside the fused exact GELU."""

    def __init__(self, spec: ViTSpec, fused, dropout: Callable[[float], nn.Cell]):
        super().__init__(spec, dropout)
        self.fused = fused

    def construct(self, x):
        hidden = self.fc1.matmul(x.reshape(-1, x.shape[-1]), self.fc1.weight)
        out = self.fc2(self.drop1(self.fused(hidden, self.fc1.bias)))
        return self.drop2(out.reshape(x.shape[:-1] + (-1,)))


def fused_layers(ops_by_name: dict, stock: ViTLayers = ViTLayers()) -> ViTLayers:
    """The seam's layers on the fused ops: every LayerNorm; attention where it has no attention
    dropout and the MLP where its GELU is the exact one (the kernels compute neither alternative);
    the rest, and dropout and drop path, as in `stock`."""

    def attention(spec: ViTSpec, dropout: Callable[[float], nn.Cell]) -> nn.Cell:
        if spec.attention_dropout:
            return stock.attention(spec, dropout)
        return FusedAttention(spec, ops_by_name["attention"], dropout)

    def mlp(spec: ViTSpec, dropout: Callable[[float], nn.Cell]) -> nn.Cell:
        return stock.mlp(spec, dropout) if spec.gelu_approximate else FusedMlp(spec, ops_by_name["bias_gelu"], dropout)

    return replace(stock, norm=partial(FusedLayerNorm, fused=ops_by_name["layer_norm"]), attention=attention, mlp=mlp)


class StepSignal:
    """Lets the host thread sleep while a train step runs on the CPU backend. MindSpore's host thread
    otherwise spins in its runtime queue's wait for the whole step; even at idle priority
    (host.yield_cores_to_kernels) it takes over a core whenever a kernel thread yields it, until the
    next scheduler tick, several times a step. The step ends with `mark` (the StepDone op), and
    `paced` makes each call block, without using the CPU, until that op has run."""

    def __init__(self, library: Path, first_timeout_s: float = 60.0):  # the first step compiles the graph
        kernels = ctypes.CDLL(str(library))
        self._wait_steps = kernels.vit_dist_wait_steps
        self._wait_steps.argtypes = (ctypes.c_uint64, ctypes.c_double)
        self._wait_steps.restype = ctypes.c_int
        kernels.vit_dist_steps_done.restype = ctypes.c_uint64
        self.mark = ops.Custom(f"{library}:StepDone", out_shape=lambda x: x, out_dtype=lambda x: x, func_type="aot")
        self._launched = kernels.vit_dist_steps_done()  # the count is the process's, across signals
        self._timeout_s = first_timeout_s

    def paced(self, train_step: Callable) -> Callable:
        """train_step, returning once the step has run. Past a timeout (a step that failed, or a slow
        compile) it returns anyway: MindSpore's own wait then raises the failure or waits the rest."""

        def step(*inputs):
            outputs = train_step(*inputs)
            self._launched += 1
            started = time.perf_counter()
            self._wait_steps(self._launched, self._timeout_s)
            self._timeout_s = 5.0 + 3.0 * (time.perf_counter() - started)
            return outputs

        return step
