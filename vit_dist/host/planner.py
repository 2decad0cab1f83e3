"""Memory and communication per device for a ViT layout (dp x mp), in closed form.

Pure Python (no MindSpore import), so `vit-dist plan` answers at once. The figures follow the layout
parallel/semi_auto.py sets: attention q/k/v/context, scores, softmax, MLP fc1 and GELU split over mp; the
residual stream (LayerNorm, out and fc2 results) whole on every model-parallel rank; embeddings,
norms and biases of row-parallel layers replicated. Master weights and gradients are float32 at
every amp level (MindSpore casts inside the ops), AdamW keeps two float32 moments.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from vit_dist.host.config import AMP_LEVELS, Config
from vit_dist.host.errors import ConfigError
from vit_dist.host.placement import ParallelDims
from vit_dist.models.spec import ViTSpec

FLOAT32 = 4
ADAM_MOMENTS = 2
GIB = 1024 ** 3
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


def activation_bytes(dims: ViTSpec, micro_batch: int, amp_level: str, mp: int = 1) -> int:
    """Bytes of block activations one device holds for a micro-batch (all blocks)."""
    sizes = ACTIVATION_BYTES[amp_level]
    elements = activation_elements(dims, mp)
    per_sample = sum(n * size for n, size in zip(elements.values(), sizes))
    return dims.depth * micro_batch * per_sample


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
    params_per_device: int
    parameter_gb: float
    gradient_gb: float
    optimizer_gb: float
    activation_gb: float
    total_gb: float
    comm_gb_per_step: float  # what one device sends per optimizer step
    comm_kind: str
    fits: bool


def estimate(dims: ViTSpec, layout: ParallelDims, amp_level: str, optimizer_shard: bool, budget_gb: float,
             head_parallel: bool = False) -> Estimate:
    mp, dp, k = layout.mp, layout.dp, layout.accumulation
    split, whole = parameter_split(dims, head_parallel and mp > 1)
    params = split // mp + whole
    weight_share = dp if optimizer_shard else 1  # MindSpore's level1 shards weights and optimizer state
    parameter = params * FLOAT32 / weight_share
    gradient = params * FLOAT32
    optimizer = params * FLOAT32 * ADAM_MOMENTS / weight_share
    activation = activation_bytes(dims, layout.micro_batch, amp_level, mp)
    grad_sync = ring_all_reduce_bytes(params * FLOAT32, dp)  # reduce-scatter + all-gather with the shard too
    if mp == 1:
        comm, kind = grad_sync, "data-parallel gradient all-reduce"
    else:
        # Per block and micro-batch: the out and fc2 partial sums all-reduced in the forward pass, the
        # gradients of the q/k/v and fc1 inputs in the backward pass, each micro_batch x tokens x dim.
        act_size = ACTIVATION_BYTES[amp_level][0]
        per_block = 4 * ring_all_reduce_bytes(layout.micro_batch * dims.tokens * dims.embed_dim * act_size, mp)
        comm, kind = grad_sync + k * dims.depth * per_block, "per-layer model-parallel all-reduces + dp gradient sync"
    total = parameter + gradient + optimizer + activation
    return Estimate(layout.world, dp, mp, amp_level, optimizer_shard, k, layout.micro_batch, layout.global_batch,
                    params, parameter / GIB, gradient / GIB, optimizer / GIB,
                    activation / GIB, total / GIB, comm / GIB, kind, total / GIB <= budget_gb)


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
        """mp m with k micro-batches per step, at the config's per-replica batch."""
        return ParallelDims.split(world, m, cfg.train.batch_size * p.grad_accumulation // k, k, semi_auto=True)

    own = [estimate(dims, layout(m, p.grad_accumulation), cfg.precision.amp_level, p.optimizer_shard, budget_gb,
                    head_parallel) for m in candidates]
    recommended = next((e.mp for e in own if e.fits), None)
    chosen = mp or recommended or candidates[-1]
    per_replica = cfg.train.batch_size * p.grad_accumulation
    accumulations = sorted({k for k in (1, p.grad_accumulation, 4) if per_replica % k == 0})
    rows = [estimate(dims, layout(chosen, k), amp, shard, budget_gb, head_parallel)
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
    lines.append(f"at mp {result['mp']} (GiB per device; comm = bytes one device sends per step):")
    lines.append("  amp shard accum micro  params  grads  optim  activ   total    comm")
    for e in result["layouts"]:
        lines.append(f"  {e['amp_level']:>3} {'yes' if e['optimizer_shard'] else 'no':>5} {e['grad_accumulation']:>5} "
                     f"{e['micro_batch']:>5} {e['parameter_gb']:7.2f} {e['gradient_gb']:6.2f} {e['optimizer_gb']:6.2f} "
                     f"{e['activation_gb']:6.2f} {e['total_gb']:7.2f} {e['comm_gb_per_step']:7.3f}"
                     f"{'' if e['fits'] else '  OVER BUDGET'}")
    return "\n".join(lines)
