"""Memory and communication per device for a ViT layout (dp x mp), in closed form.

Pure Python (no MindSpore import), so `vit-dist plan` answers at once. The figures follow the layout
parallel/semi_auto.py sets: attention q/k/v/context, scores, softmax, MLP fc1 and GELU split over mp; the
residual stream (LayerNorm, out and fc2 results) whole on every model-parallel rank; embeddings,
norms and biases of row-parallel layers replicated. Master weights and gradients are float32 at
every amp level (MindSpore casts inside the ops). On the CPU backend the plan adds what MindSpore's
runtime holds besides the tensors, measured (docs/performance.md); on Ascend and GPU it is not known.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from vit_dist.host.config import AMP_LEVELS, Config
from vit_dist.host.errors import ConfigError
from vit_dist.host.placement import ParallelDims
from vit_dist.models.spec import ViTSpec

FLOAT32 = 4
# Float32 buffers of the parameters' size the optimizer keeps: AdamW's two moments and one more, in data mode
# FlatAdamW's work copy of the parameters, under semi_auto MindSpore's AdamW's amsgrad buffer (allocated with
# amsgrad off too).
OPTIMIZER_BUFFERS = 3
GIB = 1024 ** 3
MIB = 1024 ** 2
# Bytes per element of the layer results a block keeps for the backward pass: (matmul, LayerNorm/softmax,
# GELU) per amp level. O2 computes LayerNorm and softmax in float32 but hands their results on in the
# low-precision type (measured, tests/test_semi_auto.py); O1 casts the white-listed MatMul/BatchMatMul
# only (assumed: MindSpore's O1 does not run in PyNative, where the test measures).
ACTIVATION_BYTES = {"O0": (4, 4, 4), "O1": (2, 4, 4), "O2": (2, 2, 2), "O3": (2, 2, 2)}


def model_of(cfg: Config) -> ViTSpec:
    """The config's model; the planner reads no data, so the class count must be set."""
    if cfg.model.num_classes is None:
        raise ConfigError("vit-dist plan needs model.num_classes (it reads no data); set it with "
                          "--set model.num_classes=1000")
    return ViTSpec.of(cfg, cfg.model.num_classes)


def parameter_split(dims: ViTSpec, head_parallel: bool = False) -> tuple[int, int]:
    """(parameters split over mp, parameters every model-parallel rank holds whole); their sum is the
    model's trainable parameter count."""
    d, mlp = dims.embed_dim, dims.mlp_dim
    split_block = 3 * (d * d + d) + d * d + (d * mlp + mlp) + mlp * d  # q/k/v, out weight, fc1, fc2 weight
    whole_block = 2 * d + 2 * (2 * d)  # out and fc2 biases, two LayerNorms
    embed = dims.patch_size ** 2 * dims.in_channels * d + d + d + dims.tokens * d  # proj, cls, pos
    head = d * dims.num_classes + dims.num_classes
    split = dims.depth * split_block + (head if head_parallel else 0)
    whole = dims.depth * whole_block + embed + 2 * d + (0 if head_parallel else head)
    return split, whole


def count_parameters(dims: ViTSpec) -> int:
    return sum(parameter_split(dims))


def activation_elements(dims: ViTSpec, mp: int = 1) -> dict[str, int]:
    """Elements one sample leaves per block for the backward pass on one device, by kind: the results
    of norm1, q, k, v, context, out, norm2, fc2 (tokens x dim), scores and softmax (heads x tokens^2),
    fc1 and GELU (tokens x mlp). The split ones are divided by mp."""
    t, d, h, mlp = dims.tokens, dims.embed_dim, dims.num_heads, dims.mlp_dim
    return {
        "matmul": 4 * t * d // mp + 2 * t * d + h * t * t // mp + t * mlp // mp,  # q k v context | out fc2 | scores | fc1
        "norm_softmax": 2 * t * d + h * t * t // mp,  # norm1 norm2 | softmax
        "gelu": t * mlp // mp,
    }


def recompute_elements(dims: ViTSpec) -> dict[str, int]:
    """Elements one sample keeps per block when the block's layers recompute in the backward pass
    (training.assemble.recompute_blocks): the inputs of the four recomputed layers, i.e. the residual
    stream before the attention and before the MLP (tokens x dim, counted as out and fc2 are) and the
    results of norm1 and norm2. All are whole on every model-parallel rank."""
    t, d = dims.tokens, dims.embed_dim
    return {"matmul": 2 * t * d, "norm_softmax": 2 * t * d, "gelu": 0}


def _bytes(elements: dict[str, int], amp_level: str) -> int:
    return sum(n * size for n, size in zip(elements.values(), ACTIVATION_BYTES[amp_level]))


def activation_bytes(dims: ViTSpec, micro_batch: int, amp_level: str, mp: int = 1, recompute: bool = False) -> int:
    """Bytes of block activations one device holds for a micro-batch (all blocks). With recompute, each
    block keeps recompute_elements, and one block at a time holds its full activations again while
    the backward pass recomputes it."""
    full = _bytes(activation_elements(dims, mp), amp_level)
    if not recompute:
        return dims.depth * micro_batch * full
    return micro_batch * (dims.depth * _bytes(recompute_elements(dims), amp_level) + full)


# The CPU backend's runtime besides the tensors (MindSpore 2.10, measured: docs/performance.md). The compiled
# train step holds about 95 MiB, plus per encoder block 20 MiB with the fused kernels' layers (True) or 32 with
# MindSpore's own (False), plus, when gradient accumulation unrolls k > 1 micro-batches, 57 MiB per block and
# micro-batch more.
CPU_COMPILE_MIB = 95
CPU_COMPILE_MIB_PER_BLOCK = {True: 20, False: 32}
CPU_COMPILE_MIB_PER_BLOCK_AND_MICRO_BATCH = 57
# The gradient of a bias added by Add (a broadcast reduction) keeps this many bytes per element of the
# layer's output inside its kernel, outside the memory pool, for the life of the graph.
CPU_BIAS_GRADIENT_BYTES = 16


def cpu_runtime_bytes(dims: ViTSpec, micro_batch: int, accumulation: int, fused: bool) -> int:
    """What MindSpore's CPU runtime holds for a train step besides its tensors: the compiled graph, and the
    bias gradients' kernel buffers of every micro-batch of the unrolled accumulation. Layers with a bias
    added by Add: out and fc2, and q, k, v and fc1 where no fused kernel adds them (the fused attention
    needs no attention dropout, the fused bias+GELU the exact GELU); the patch embedding; the head."""
    t, d = dims.tokens, dims.embed_dim
    fused_attention = fused and dims.attention_dropout == 0
    fused_mlp = fused and not dims.gelu_approximate
    per_block = 2 * t * d + (0 if fused_attention else 3 * t * d) + (0 if fused_mlp else t * dims.mlp_dim)
    bias_outputs = dims.depth * per_block + dims.num_patches * d + dims.num_classes
    unrolled = CPU_COMPILE_MIB_PER_BLOCK_AND_MICRO_BATCH * accumulation if accumulation > 1 else 0
    compiled = (CPU_COMPILE_MIB + dims.depth * (CPU_COMPILE_MIB_PER_BLOCK[fused] + unrolled)) * MIB
    return compiled + accumulation * micro_batch * bias_outputs * CPU_BIAS_GRADIENT_BYTES


def ring_all_reduce_bytes(nbytes: int, ranks: int) -> float:
    """What each rank sends in a ring all-reduce of nbytes (reduce-scatter + all-gather)."""
    return 2 * (ranks - 1) / ranks * nbytes


@dataclass(frozen=True)
class Estimate:
    world: int
    dp: int
    mp: int
    amp_level: str
    optimizer_shard: bool
    grad_accumulation: int
    micro_batch: int
    global_batch: int
    recompute: bool
    params_per_device: int
    parameter_gb: float
    gradient_gb: float
    optimizer_gb: float
    activation_gb: float
    runtime_gb: float  # the CPU backend's runtime besides the tensors (cpu_runtime_bytes); 0 elsewhere
    total_gb: float
    comm_gb_per_step: float  # what one device sends per optimizer step
    comm_kind: str
    fits: bool


def estimate(dims: ViTSpec, layout: ParallelDims, amp_level: str, optimizer_shard: bool, budget_gb: float,
             head_parallel: bool = False, recompute: bool = False, cpu_fused: bool | None = None) -> Estimate:
    """One layout's memory and communication per device. cpu_fused: None off the CPU backend; on it,
    whether the fused kernels' layers run (their runtime differs from MindSpore's own layers')."""
    mp, dp, k = layout.mp, layout.dp, layout.accumulation
    split, whole = parameter_split(dims, head_parallel and mp > 1)
    params = split // mp + whole
    weight_share = dp if optimizer_shard else 1  # MindSpore's level1 shards weights and optimizer state
    parameter = params * FLOAT32 / weight_share
    # Data mode on the CPU packs the gradients into FlatAdamW's flat buffers: both copies are alive while it
    # packs. On Ascend and GPU (and under semi_auto) the per-parameter AdamW takes them as they are.
    flat = cpu_fused is not None and not layout.semi_auto
    gradient = params * FLOAT32 * (2 if flat else 1)
    optimizer = params * FLOAT32 * OPTIMIZER_BUFFERS / weight_share
    activation = activation_bytes(dims, layout.micro_batch, amp_level, mp, recompute)
    runtime = 0 if cpu_fused is None else cpu_runtime_bytes(dims, layout.micro_batch, k, cpu_fused)
    grad_sync = ring_all_reduce_bytes(params * FLOAT32, dp)  # reduce-scatter + all-gather with the shard too
    if mp == 1:
        comm, kind = grad_sync, "data-parallel gradient all-reduce"
    else:
        # Per block and micro-batch: the out and fc2 partial sums all-reduced in the forward pass, the
        # gradients of the q/k/v and fc1 inputs in the backward pass, each micro_batch x tokens x dim.
        act_size = ACTIVATION_BYTES[amp_level][0]
        per_block = 4 * ring_all_reduce_bytes(layout.micro_batch * dims.tokens * dims.embed_dim * act_size, mp)
        comm, kind = grad_sync + k * dims.depth * per_block, "per-layer model-parallel all-reduces + dp gradient sync"
    total = parameter + gradient + optimizer + activation + runtime
    return Estimate(layout.world, dp, mp, amp_level, optimizer_shard, k, layout.micro_batch, layout.global_batch,
                    recompute, params, parameter / GIB, gradient / GIB, optimizer / GIB, activation / GIB,
                    runtime / GIB, total / GIB, comm / GIB, kind, total / GIB <= budget_gb)


def cpu_fused(cfg: Config, amp_level: str) -> bool | None:
    """estimate's cpu_fused for the config at an amp level: None off the CPU backend; on it, whether the
    fused kernels are asked for (they run in float32 only, and need g++, which the plan does not check)."""
    if cfg.parallel.device_target != "CPU":
        return None
    return cfg.parallel.fused_cpu_kernels and amp_level == "O0"


def step_estimate(cfg: Config, world: int, fused: bool | None = None) -> Estimate:
    """The config's own layout on `world` ranks, as vit-dist bench runs it; fused: whether the fused CPU
    kernels do run (the backend knows), else as the config asks."""
    dims = model_of(cfg)
    amp = cfg.precision.amp_level
    cpu = cpu_fused(cfg, amp)
    if cpu is not None and fused is not None:
        cpu = fused
    return estimate(dims, ParallelDims.of(cfg, world), amp, cfg.parallel.optimizer_shard, math.inf,
                    cfg.parallel.head == "model", cfg.train.recompute, cpu)


def valid_mps(dims: ViTSpec, world: int) -> list[int]:
    """Model-parallel degrees the layout admits: powers of two up to 64 dividing heads, widths and world."""
    return [mp for mp in (1, 2, 4, 8, 16, 32, 64)
            if world % mp == 0 and not (dims.num_heads % mp or dims.embed_dim % mp or dims.mlp_dim % mp)]


def plan(cfg: Config, world: int, mp: int | None, budget_gb: float) -> dict:
    """Every amp level x optimizer shard x accumulation for the config's global batch at one mp (the
    given one, or the recommended one), and the recommendation: the smallest mp whose layout at the
    config's own amp level, shard and accumulation fits the budget."""
    dims = model_of(cfg)
    p = cfg.parallel
    head_parallel = p.head == "model"
    candidates = valid_mps(dims, world)
    if mp is not None and mp not in candidates:
        raise ConfigError(f"--mp {mp} does not divide world {world}, num_heads {dims.num_heads}, embed_dim "
                          f"{dims.embed_dim} and mlp_dim {dims.mlp_dim}; valid: {candidates}")

    def layout(m: int, k: int) -> ParallelDims:
        """mp m with k micro-batches per step at the config's per-replica batch (data mode: mp 1, data config)."""
        return ParallelDims.split(world, m, cfg.train.batch_size * p.grad_accumulation // k, k,
                                  semi_auto=m > 1 or p.mode == "semi_auto")

    def layout_estimate(m: int, k: int, amp: str, shard: bool) -> Estimate:
        return estimate(dims, layout(m, k), amp, shard, budget_gb, head_parallel, cfg.train.recompute,
                        cpu_fused(cfg, amp))

    own = [layout_estimate(m, p.grad_accumulation, cfg.precision.amp_level, p.optimizer_shard) for m in candidates]
    recommended = next((e.mp for e in own if e.fits), None)
    chosen = mp or recommended or candidates[-1]
    per_replica = cfg.train.batch_size * p.grad_accumulation
    accumulations = sorted({k for k in (1, p.grad_accumulation, 4) if per_replica % k == 0})
    rows = [layout_estimate(chosen, k, amp, shard)
            for amp in AMP_LEVELS for shard in (False, True) for k in accumulations]
    return {"model": asdict(dims), "params": count_parameters(dims), "world": world, "budget_gb": budget_gb,
            "mp": chosen, "recommended_mp": recommended, "by_mp": [asdict(e) for e in own],
            "layouts": [asdict(e) for e in rows]}


def format_plan(result: dict) -> str:
    m = result["model"]
    lines = [f"ViT dim {m['embed_dim']} depth {m['depth']} heads {m['num_heads']} mlp {m['mlp_dim']} "
             f"patch {m['patch_size']} at {m['image_size']} px: {result['params']:,} parameters; "
             f"{result['world']} devices, budget {result['budget_gb']:g} GiB per device",
             "config's amp/shard/accumulation by mp:"]
    lines += [f"  mp {e['mp']:>2} dp {e['dp']:>5}: {e['total_gb']:8.2f} GiB  comm {e['comm_gb_per_step']:8.3f} GiB/step"
              f"{'' if e['fits'] else '  OVER BUDGET'}" for e in result["by_mp"]]
    rec = result["recommended_mp"]
    lines.append(f"recommended mp: {rec}" if rec else "recommended mp: none fits; lower train.batch_size, "
                                                       "raise parallel.grad_accumulation or shard the optimizer")
    recompute = " (activations with train.recompute)" if result["layouts"][0]["recompute"] else ""
    lines.append(f"at mp {result['mp']} (GiB per device; comm = bytes one device sends per step; runtime = the CPU "
                 f"backend's compiled graph and kernel buffers){recompute}:")
    lines.append("  amp shard accum micro  params  grads  optim  activ runtime   total    comm")
    for e in result["layouts"]:
        lines.append(f"  {e['amp_level']:>3} {'yes' if e['optimizer_shard'] else 'no':>5} {e['grad_accumulation']:>5} "
                     f"{e['micro_batch']:>5} {e['parameter_gb']:7.2f} {e['gradient_gb']:6.2f} {e['optimizer_gb']:6.2f} "
                     f"{e['activation_gb']:6.2f} {e['runtime_gb']:7.2f} {e['total_gb']:7.2f} "
                     f"{e['comm_gb_per_step']:7.3f}"
                     f"{'' if e['fits'] else '  OVER BUDGET'}")
    return "\n".join(lines)
