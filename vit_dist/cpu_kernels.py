"""Fused float32 CPU kernels for the two ops MindSpore's CPU backend runs slowest in a ViT step:
LayerNorm (its LayerNormGrad takes about 11 ns per element on one thread) and the exact GELU
(scalar erf and exp, and a Pow in its autodiff backward). `cpu_kernels.cc` is compiled once with
the system's C++ compiler into MindSpore AOT custom ops and applied to a built model from outside,
as mixed precision and shard strategies are: the model file stays pure. Same mathematics: outputs
and gradients equal MindSpore's own ops within float32 rounding (tested).

Without a compiler, or with one that fails, training keeps MindSpore's ops and says so once."""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Optional

import mindspore as ms
from mindspore import nn, ops

from vit_dist.config import Config
from vit_dist.models.vit import GELU
from vit_dist.runtime import cpu_threads

SOURCE = Path(__file__).with_suffix(".cc")
# -ffast-math lets GCC call glibc's vectorised erff/expf (libmvec, glibc 2.35+); --no-undefined turns
# a glibc without them into a link error, and the plain build is tried next.
BUILDS = (
    ["-O3", "-march=native", "-ffast-math", "-Wl,--no-undefined", "-lmvec"],
    ["-O3", "-march=native", "-Wl,--no-undefined"],
)
COMMON_FLAGS = ["-std=c++17", "-shared", "-fPIC", "-pthread"]


def build_library(compiler: str = "g++", cache_dir: Optional[Path] = None) -> Optional[Path]:
    """Compiles cpu_kernels.cc once per source, compiler and host (-march=native) into cache_dir (a
    per-user folder under the temporary directory by default) and returns the library, or None if
    no build succeeds or the folder is not private to this user. Concurrent ranks each write a
    temporary file and rename it into place."""
    key = hashlib.sha256(SOURCE.read_bytes() + f"{compiler} {BUILDS} {platform.node()}".encode()).hexdigest()[:16]
    folder = cache_dir or Path(tempfile.gettempdir()) / f"vit-dist-kernels-{os.getuid()}"
    library = folder / f"cpu_kernels-{key}.so"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not _private(folder) or (library.exists() and not _private(library)):
        return None
    if library.is_file():
        return library
    tmp = library.with_suffix(f".{os.getpid()}.tmp")
    for flags in BUILDS:
        try:
            built = subprocess.run([compiler, *COMMON_FLAGS, "-o", str(tmp), str(SOURCE), *flags, "-lm"],
                                   capture_output=True, timeout=120).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            built = False
        if built:
            tmp.chmod(0o700)
            os.replace(tmp, library)
            return library
    tmp.unlink(missing_ok=True)
    return None


def _private(path: Path) -> bool:
    """Ours and writable by no one else: a library loaded into the process must not be replaceable
    by another user (the temporary directory is shared)."""
    info = path.stat()
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def custom_ops(library: Path, threads: int) -> dict:
    """The AOT custom ops (forward ops carry their backward as bprop), on `threads` threads each."""
    ctypes.CDLL(str(library)).vit_dist_set_threads(threads)
    f32 = ms.float32

    def aot(name: str, out_shape: Callable, outputs: int, bprop=None):
        dtype = (lambda *_: (f32,) * outputs) if outputs > 1 else (lambda *_: f32)
        return ops.Custom(f"{library}:{name}", out_shape=out_shape, out_dtype=dtype, func_type="aot", bprop=bprop)

    layer_norm_backward = aot("LayerNormBackward", lambda dy, x, gamma, mean, rstd: (x, gamma, gamma), 3)
    gelu_backward = aot("GeluBackward", lambda x, dy: x, 1)

    def layer_norm_bprop(x, gamma, beta, epsilon, out, dout):
        dx, dgamma, dbeta = layer_norm_backward(dout[0], x, gamma, out[1], out[2])
        return dx, dgamma, dbeta, ops.zeros_like(epsilon)

    def gelu_bprop(x, out, dout):
        return (gelu_backward(x, dout),)

    return {
        # (y, mean, rstd): the statistics are kept for the backward.
        "layer_norm": aot("LayerNormForward", lambda x, gamma, beta, epsilon: (x, x[:-1], x[:-1]), 3,
                          layer_norm_bprop),
        "gelu": aot("GeluForward", lambda x: x, 1, gelu_bprop),
    }


class FusedLayerNorm(nn.LayerNorm):
    """nn.LayerNorm through the fused op: fuse() sets `fused` and `epsilon_tensor` on an existing cell."""

    def construct(self, x):
        return self.fused(x, self.gamma, self.beta, self.epsilon_tensor)[0]


class FusedGELU(nn.Cell):
    def __init__(self, op):
        super().__init__()
        self.fused = op

    def construct(self, x):
        return self.fused(x)


def fuse(net, ops_by_name: dict) -> int:
    """Runs every nn.LayerNorm over the last axis and every exact GELU of a built ViT through the
    fused ops; returns how many cells now do. A LayerNorm changes class in place, keeping its
    Parameters and their names (and its place in amp's lists); a GELU, which has none, is replaced."""
    fused = 0
    for _, cell in list(net.cells_and_names()):
        if isinstance(cell, nn.LayerNorm) and len(cell.normalized_shape) == 1:
            cell.__class__ = FusedLayerNorm
            cell.fused = ops_by_name["layer_norm"]
            cell.epsilon_tensor = ms.Tensor([cell.epsilon], ms.float32)
            fused += 1
        for name, child in list(cell.name_cells().items()):
            if isinstance(child, GELU):
                setattr(cell, name, FusedGELU(ops_by_name["gelu"]))
                fused += 1
    return fused


def apply_fused_cpu_kernels(net, cfg: Config, local_world_size: int, say: Callable[[str], None]) -> bool:
    """Fuses the net's LayerNorms and GELUs when training in float32 on the CPU backend with
    parallel.fused_cpu_kernels on (the default), on the kernel threads MindSpore gets; says why not
    if the library cannot be built. Returns whether the net now runs the fused ops."""
    if not (cfg.parallel.fused_cpu_kernels and cfg.parallel.device_target == "CPU" and cfg.precision.amp_level == "O0"):
        return False
    library = build_library()
    if library is None:
        say("note: no C++ compiler built vit_dist/cpu_kernels.cc (g++ with C++17): LayerNorm and GELU run on "
            "MindSpore's slower CPU kernels; install g++, or set parallel.fused_cpu_kernels=false to silence this")
        return False
    fuse(net, custom_ops(library, cpu_threads(cfg.parallel.threads_per_rank, local_world_size)))
    return True
