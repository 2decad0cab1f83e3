"""Semi-auto-parallel: strategies on the real model's primitives, layout validation, the planner's
figures against the real model, and the merge of per-rank slices with MindSpore's transform API.
(Semi-auto training itself needs Ascend/GPU: MindSpore 2.10 refuses it on the CPU backend.)"""
import json
import shutil

import numpy as np
import pytest

from conftest import PYTHON, ROOT, run, tiny_config, tool_env, vit_model
from vit_dist.host.checkpoint_files import sha256 as _sha256
from vit_dist.host.errors import CheckpointError
from vit_dist.host.config import ConfigError, load_config
from vit_dist.host.placement import ParallelDims
from vit_dist.host import planner

TINY = ["model.variant=ti", "model.patch_size=4", "data.image_size=16", "model.embed_dim=32", "model.depth=2",
        "model.num_heads=4", "model.mlp_dim=64", "model.drop_path_rate=0", "model.num_classes=8"]


def tiny_net(*overrides):

    cfg = load_config(None, TINY + list(overrides))
    return cfg, vit_model(cfg, cfg.model.num_classes)


@pytest.mark.parametrize("dp, mp, head", [(8, 1, "data"), (4, 2, "model"), (2, 4, "data"), (1, 8, "model")])
def test_strategies_attach_to_the_primitives(dp, mp, head):
    from vit_dist.models.vit import GELU
    from vit_dist.parallel.semi_auto import apply_strategies

    _, net = tiny_net()
    apply_strategies(net, dp, mp, head)
    heads = (dp, mp, 1, 1)
    for block in net.blocks:
        attn, mlp = block.attn, block.mlp
        for dense in (attn.query, attn.key, attn.value, mlp.fc1):  # column-parallel: weight (out, in) split on out
            assert dense.matmul.in_strategy == ((dp, 1), (mp, 1)) and dense.bias_add.in_strategy == ((dp, mp), (mp,))
        for dense in (attn.out, mlp.fc2):  # row-parallel: split on in, the contracted axis
            assert dense.matmul.in_strategy == ((dp, mp), (1, mp)) and dense.bias_add.in_strategy == ((dp, 1), (1,))
        assert attn.scores.in_strategy == attn.context.in_strategy == (heads, heads)
        assert attn.softmax.softmax.in_strategy == (heads,)
        # GELU takes fc1's (batch, tokens, hidden) output: 3-D strategies, hidden over mp.
        assert isinstance(mlp.act, GELU) and mlp.act.erf.in_strategy == ((dp, 1, mp),)
        assert mlp.act.mul.in_strategy == ((dp, 1, mp), (dp, 1, mp))
        assert block.norm1.layer_norm.in_strategy == block.norm2.layer_norm.in_strategy == ((dp, 1, 1), (1,), (1,))
        # Between the layers: the heads' transposes keep the heads over mp; the residual stream stays
        # (batch, tokens, dim) over dp, replicated over mp.
        assert attn.split_heads.in_strategy == ((dp, 1, mp, 1),) and attn.merge_heads.in_strategy == (heads,)
        assert attn.scale_query.in_strategy == ((dp, 1, mp), ())
        assert block.add_attention.in_strategy == block.add_mlp.in_strategy == ((dp, 1, 1), (dp, 1, 1))
        # The contracted axis is split alike on both sides of every matmul (transpose_b: the weight's last axis).
        for dense in (attn.query, attn.out, mlp.fc1, mlp.fc2):
            x, w = dense.matmul.in_strategy
            assert dense.matmul.transpose_b and x[1] == w[1]
    assert net.patch_embed.proj.matmul.in_strategy == ((dp, 1), (1, 1))
    assert net.norm.layer_norm.in_strategy == ((dp, 1, 1), (1,), (1,))
    assert net.head.matmul.in_strategy == (((dp, 1), (mp, 1)) if head == "model" else ((dp, 1), (1, 1)))


class _Recorder:
    """Stands in for a primitive on its Cell: records the shapes of the inputs it is called with (and
    that they are tensors), then calls the primitive."""

    def __init__(self, primitive, calls):
        self.primitive, self.calls = primitive, calls

    def __call__(self, *args):
        from mindspore import Tensor

        tensors = [t for a in args if not isinstance(a, tuple) or isinstance(a[0], Tensor)
                   for t in (a if isinstance(a, tuple) else (a,))]  # Concat takes a tuple; not a Transpose's perm
        self.calls.append(tuple(tuple(t.shape) for t in tensors))
        return self.primitive(*args)


def _strategies_and_input_shapes(net, x):
    """{cell path.attribute: (strategy, [input shapes of each call])} for every primitive of `net`'s
    cells (strategy None where it has none), from a real PyNative forward pass of `net` on `x`."""
    found = {}
    for path, cell in net.cells_and_names():
        for attr, primitive in list(cell._primitives.items()):
            calls = []
            found[f"{path}.{attr}"] = (getattr(primitive, "in_strategy", None), calls)
            object.__setattr__(cell, attr, _Recorder(primitive, calls))
    try:
        net(x)
    finally:
        for path, cell in net.cells_and_names():
            for attr, primitive in cell._primitives.items():
                object.__setattr__(cell, attr, primitive)
    return found


LAYOUTS = [(8, 1, "data"), (4, 2, "model"), (2, 4, "data"), (1, 8, "model")]


@pytest.mark.parametrize("gelu", ["exact", "tanh"])
@pytest.mark.parametrize("dp, mp, head", LAYOUTS)
def test_every_strategy_fits_the_shapes_its_primitive_receives(dp, mp, head, gelu):
    """MindSpore refuses a strategy with one entry per input unlike its primitive's, an entry whose
    length is not its input's rank, or a split that does not divide its axis (at the first compile,
    on Ascend/GPU only). Checked here against the inputs a real forward pass feeds each primitive, at
    a global batch of 2 samples per replica; 8 heads so that every mp here divides them."""
    import mindspore as ms

    from vit_dist.parallel.semi_auto import apply_strategies

    _, net = tiny_net("model.num_heads=8", "model.dropout=0.1", "model.attention_dropout=0.1",
                      "model.drop_path_rate=0.1", *(["model.gelu_approximate=true"] if gelu == "tanh" else []))
    net.set_train(True)  # every dropout and drop path runs
    apply_strategies(net, dp, mp, head)
    x = ms.Tensor(np.random.default_rng(0).standard_normal((2 * dp, 3, 16, 16)).astype(np.float32))
    found = _strategies_and_input_shapes(net, x)
    depth, linears = 2, 6  # per block: q, k, v, out, fc1, fc2
    # Per block: the linears' two ops, 2 norms, softmax, 2 bmms, scale, 2 transposes, 4 dropouts, 2
    # residual adds, drop path's mul and dropout, and the GELU's ops.
    per_block = linears * 2 + 2 + 1 + 2 + 3 + 4 + 2 + 2 + (5 if gelu == "exact" else 1)
    # The first block's drop path has rate 0 (no dropout); + the final norm; the patch embedding's transpose
    # and linear; the class token's concat, the position add and dropout; the head.
    assert len(found) == depth * per_block - 1 + 1 + 3 + 3 + 2
    for name, (strategy, calls) in found.items():
        assert strategy is not None, f"{name} has no shard strategy: MindSpore would give it a default one"
        assert calls or name == "blocks.0.drop_path.mul", f"{name} carries a strategy but never ran"  # rate 0: off
        for shapes in calls:
            assert len(strategy) == len(shapes), (name, strategy, shapes)
            for split, shape in zip(strategy, shapes):
                assert len(split) == len(shape), (name, strategy, shapes)
                assert all(n % k == 0 for n, k in zip(shape, split)), (name, strategy, shapes)
    if gelu == "exact":
        assert found["blocks.0.mlp.act.erf"][1][0] == ((2 * dp, 17, 64),)  # 16 patches + the class token
    else:
        assert found["blocks.0.mlp.act.gelu"][1][0] == ((2 * dp, 17, 64),)


@pytest.mark.parametrize("soft_targets", [False, True])
def test_each_rank_reads_the_batch_block_mindspore_assigns_it(soft_targets):
    """MindSpore's own host-side placement of a rank's batch under a dataset strategy
    (parallel._utils._to_full_tensor, which places rank r's data at block r % strategy along each axis)
    must put rank r's samples where the harness's replica says: the mp ranks of one replica must hold
    the same samples, or each computes with different data. Mixup's soft targets [batch, classes] too."""
    import mindspore as ms
    from mindspore.parallel._utils import _to_full_tensor

    from vit_dist.parallel.semi_auto import dataset_strategy

    for dp, mp in [(4, 2), (2, 4), (2, 2), (8, 1), (1, 8)]:
        dims = ParallelDims.split(dp * mp, mp, 3, 1, True)
        ms.set_auto_parallel_context(dataset_strategy=dataset_strategy(dp, soft_targets))
        try:
            for rank in range(dp * mp):
                images = np.full((3, 3, 4, 4), rank + 1, np.float32)
                labels = np.full((3, 5) if soft_targets else (3,), rank + 1, np.float32 if soft_targets else np.int32)
                full_images, full_labels = _to_full_tensor((images, labels), dp * mp, rank)
                assert full_images.shape == (3 * dp, 3, 4, 4)
                blocks = [b for b in range(dp) if (full_labels.asnumpy()[3 * b:3 * b + 3] == rank + 1).all()]
                assert blocks == [dims.replica(rank)], (dp, mp, rank, blocks)
                assert (full_images.asnumpy()[3 * blocks[0]:3 * blocks[0] + 3] == rank + 1).all()
        finally:
            ms.reset_auto_parallel_context()
        readers = [[r for r in range(dp * mp) if dims.replica(r) == b] for b in range(dp)]
        assert all(len(ranks) == mp for ranks in readers)


def test_clipping_norm_and_overflow_decision_across_two_real_ranks(tmp_path):
    """Two msrun ranks (CPU, graph mode, real collectives) run tests/two_rank_reductions.py: the
    clipping norm from gradients sliced as mp = 2 slices them equals numpy's norm of the whole
    gradients, and an inf in rank 1's batch only, with no gradient reduction (semi_auto's: each rank
    keeps its own), makes both ranks skip the step with equal parameters, EMAs and loss scales; the
    next step moves the EMA as numpy does. And data mode's per-parameter layout (Ascend and GPU: MindSpore's
    AdamW with DistributedGradReducer) trains as the CPU's flat one, the two ranks on different batches."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run([PYTHON, "-m", "mindspore.parallel.cluster.run", "--worker_num", "2", "--local_worker_num", "2",
                  "--master_addr", "127.0.0.1", "--master_port", str(port), "--log_dir", str(tmp_path / "logs"),
                  "--join", "True", str(ROOT / "tests" / "two_rank_reductions.py"), str(tmp_path)],
                 timeout=400, cwd=tmp_path, env=tool_env(PYTHONPATH=str(ROOT)))
    logs = "".join(p.read_text()[-3000:] for p in sorted((tmp_path / "logs").glob("worker_*.log")))
    assert result.returncode == 0, logs
    ranks = [dict(np.load(tmp_path / f"rank_{r}.npz")) for r in (0, 1)]
    for r in ranks:
        assert r["sliced"] > 0 and r["local_norm"] < 0.95 * r["full_norm"]  # the slices alone fall short
        assert r["norm"] == pytest.approx(r["full_norm"], rel=1e-5)
        assert r["clip_error"] < 1e-6
        assert not r["overflow_finite"] and not r["overflow_changed"] and r["overflow_scale"] == 2.0 ** 9
        assert r["next_finite"] and r["next_changed"]
        assert not r["overflow_ema_changed"] and r["next_ema_error"] < 1e-6
    assert np.array_equal(ranks[0]["overflow_params"], ranks[1]["overflow_params"])
    # Data mode: the accelerators' per-parameter AdamW with DistributedGradReducer trains as the CPU's flat
    # AdamW with its flat all-reduces, and both keep the ranks equal though each rank read its own batch.
    for r in ranks:
        flat, per_parameter = r["data_flat"] - r["data_before"], r["data_per_parameter"] - r["data_before"]
        assert np.abs(flat).max() > 0
        np.testing.assert_allclose(per_parameter, flat, rtol=1e-4, atol=1e-4 * np.abs(flat).max())
    np.testing.assert_allclose(ranks[0]["data_per_parameter"], ranks[1]["data_per_parameter"], rtol=1e-6, atol=1e-8)
    assert np.array_equal(ranks[0]["data_flat"], ranks[1]["data_flat"])


def test_strategies_keep_the_model_and_its_numbers():
    import mindspore as ms

    from vit_dist.parallel.semi_auto import apply_strategies

    _, net = tiny_net()
    net.set_train(False)
    names = [p.name for p in net.get_parameters()]
    x = ms.Tensor(np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32))
    before = net(x).asnumpy()
    apply_strategies(net, 2, 4)
    assert [p.name for p in net.get_parameters()] == names
    np.testing.assert_allclose(net(x).asnumpy(), before, rtol=1e-5, atol=1e-6)


SEMI = ["parallel.mode=semi_auto", "parallel.device_target=Ascend"]


@pytest.mark.parametrize("overrides, message", [
    (["parallel.mode=semi_auto", "parallel.device_target=CPU"],
     r"parallel\.mode semi_auto needs parallel\.device_target Ascend: MindSpore 2\.10 supports"),
    (["parallel.mode=semi_auto", "parallel.device_target=GPU"],
     r"parallel\.mode semi_auto needs parallel\.device_target Ascend: .* not on GPU; use parallel\.mode=data there$"),
    (SEMI + ["parallel.model_parallel=4", "model.variant=s"],
     r"model\.num_heads 6 is not divisible by parallel\.model_parallel 4"),
    (SEMI + ["parallel.model_parallel=4", "model.mlp_dim=1001"],
     r"model\.mlp_dim 1001 is not divisible by parallel\.model_parallel 4"),
    (SEMI + ["parallel.model_parallel=4", "parallel.head=model", "model.num_classes=1001"],
     r"parallel\.head=model splits model\.num_classes 1001"),
    (["parallel.model_parallel=2"], r"need parallel\.mode=semi_auto"),
    (["parallel.optimizer_shard=true"], r"need parallel\.mode=semi_auto"),
    (SEMI + ["parallel.optimizer_shard=true"], r"set train\.grad_clip_norm=0 with it"),
    (SEMI + ["train.compile_cache=/tmp/cache"], r"skips writing the strategy file .*; set train\.compile_cache=null$"),
    (["parallel.grad_accumulation=0"], r"parallel\.model_parallel and parallel\.grad_accumulation must be at least 1"),
    (["parallel.mode=tensor"], r"parallel\.mode 'tensor' is not supported; use one of data, semi_auto"),
])
def test_layout_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_world_size_must_be_a_multiple_of_mp():
    cfg = load_config(None, SEMI + ["parallel.model_parallel=4", "parallel.grad_accumulation=2"])
    dims = ParallelDims.of(cfg, 16)
    assert (dims.dp, dims.mp, dims.global_batch) == (4, 4, 4 * cfg.train.batch_size * 2)
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by parallel\.model_parallel 4"):
        ParallelDims.of(cfg, 6)


def test_semi_auto_on_cpu_fails_before_anything_compiles(tiny_data, tmp_path):
    config = tiny_config(tmp_path / "c.yaml", tiny_data, parallel={"mode": "semi_auto", "model_parallel": 2},
                         train={"output_dir": str(tmp_path / "run")})
    result = run([PYTHON, "-m", "vit_dist", "train", str(config)], timeout=120, env=tool_env())
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: parallel.mode semi_auto needs parallel.device_target Ascend:")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides", [[], ["model.mlp_dim=96", "model.num_classes=5", "model.depth=1"]])
def test_planner_parameters_match_the_real_model(overrides):
    from vit_dist.models.vit import count_parameters

    cfg, net = tiny_net(*overrides)
    assert planner.count_parameters(planner.model_of(cfg)) == count_parameters(net)
    # ViT-B/16, the reference count (test_model checks the real model gives it too).
    b16 = load_config(ROOT / "vit_dist" / "configs" / "vit_b16_imagenet.yaml")
    assert planner.count_parameters(planner.model_of(b16)) == 86_567_656


def test_planner_activations_match_the_tensors_the_model_produces():
    """Forward hooks on the real model (PyNative) record what each block keeps; the planner's
    per-kind element counts must equal them, and its bytes the measured dtypes' sizes (O1 cannot run
    in PyNative)."""
    import mindspore as ms

    from vit_dist.training.precision import apply_mixed_precision

    cfg, net = tiny_net()
    batch = 3
    x = ms.Tensor(np.random.default_rng(1).standard_normal((batch, 3, 16, 16)).astype(np.float32))
    dims = planner.model_of(cfg)
    for amp in ("O0", "O2", "O3"):
        cfg.precision.amp_level = amp
        _, fresh = tiny_net()
        model = apply_mixed_precision(fresh, cfg.precision)
        model.set_train(False)
        measured = {"matmul": [0, 0], "norm_softmax": [0, 0], "gelu": [0, 0]}

        def keep(kind, tensor):
            measured[kind][0] += tensor.size
            measured[kind][1] += tensor.size * tensor.itemsize

        handles = []
        for block in fresh.blocks:
            a, m = block.attn, block.mlp
            for cell, kind in [(block.norm1, "norm_softmax"), (block.norm2, "norm_softmax"), (a.softmax, "norm_softmax"),
                               (a.query, "matmul"), (a.key, "matmul"), (a.value, "matmul"), (a.out, "matmul"),
                               (m.fc1, "matmul"), (m.fc2, "matmul"), (m.act, "gelu")]:
                handles.append(cell.register_forward_hook(lambda c, i, o, kind=kind: keep(kind, o)))
            # The scores (softmax's input) and the context (out's input) come from BatchMatMul primitives.
            handles.append(a.softmax.register_forward_pre_hook(lambda c, i: keep("matmul", i[0])))
            handles.append(a.out.register_forward_pre_hook(lambda c, i: keep("matmul", i[0])))
        model(x)
        for handle in handles:
            handle.remove()
        expected = planner.activation_elements(dims)
        assert {k: v[0] for k, v in measured.items()} == {k: n * batch * dims.depth for k, n in expected.items()}
        assert sum(v[1] for v in measured.values()) == planner.activation_bytes(dims, batch, amp)


def test_planner_flags_over_budget_and_recommends_an_mp():
    # ViT-G-style widths (Zhai et al. 2022) at 224 px on 64 devices, 24 GiB each, O2, optimizer shard.
    overrides = SEMI + ["model.embed_dim=1664", "model.depth=48", "model.num_heads=16", "model.mlp_dim=8192",
                        "model.patch_size=14", "train.batch_size=32", "parallel.optimizer_shard=true",
                        "train.grad_clip_norm=0", "precision.amp_level=O2", "parallel.model_parallel=8"]
    cfg = load_config(ROOT / "vit_dist" / "configs" / "vit_b16_imagenet.yaml", overrides)
    result = planner.plan(cfg, 64, None, 24.0)
    by_mp = {e["mp"]: e for e in result["by_mp"]}
    assert not by_mp[1]["fits"] and by_mp[2]["fits"] and result["recommended_mp"] == 2
    # Data parallel sends the ring all-reduce of all fp32 gradients; model parallel adds 4 all-reduces of
    # (micro-batch x tokens x dim) fp16 activations per block over mp, and syncs only its gradient shard.
    params, tokens, gib = result["params"], 257, 1024 ** 3
    assert by_mp[1]["comm_gb_per_step"] == pytest.approx(2 * 63 / 64 * params * 4 / gib)
    e8 = by_mp[8]
    layer_comm = 48 * 4 * 2 * 7 / 8 * 32 * tokens * 1664 * 2
    assert e8["comm_gb_per_step"] == pytest.approx((2 * 7 / 8 * e8["params_per_device"] * 4 + layer_comm) / gib)
    o2 = {(e["optimizer_shard"], e["grad_accumulation"]): e for e in result["layouts"] if e["amp_level"] == "O2"}
    assert o2[(True, 1)]["optimizer_gb"] == pytest.approx(o2[(False, 1)]["optimizer_gb"] / o2[(True, 1)]["dp"])
    assert o2[(False, 4)]["activation_gb"] == pytest.approx(o2[(False, 1)]["activation_gb"] / 4)
    b16 = ROOT / "vit_dist" / "configs" / "vit_b16_imagenet.yaml"
    out = run([PYTHON, "-m", "vit_dist", "plan", str(b16), "--world", "64", "--device-memory-gb", "24", "--json",
               "--set", *overrides], timeout=60)
    assert out.returncode == 0 and json.loads(out.stdout) == json.loads(json.dumps(result))
    with pytest.raises(ConfigError, match=r"--mp 3 does not divide world 64, num_heads 16"):
        planner.plan(cfg, 64, 3, 24.0)


def test_the_plan_counts_recompute_the_optimizers_buffers_and_the_cpu_runtime():
    """ViT-B/16 at batch 4, float32, one CPU rank (data mode), as vit-dist bench plans it."""
    b16 = ROOT / "vit_dist" / "configs" / "vit_b16_imagenet.yaml"
    cpu = ["parallel.device_target=CPU", "precision.amp_level=O0", "precision.loss_scale=none", "train.batch_size=4"]
    plain = planner.step_estimate(load_config(b16, cpu), 1)
    recomputed = planner.step_estimate(load_config(b16, cpu + ["train.recompute=true"]), 1)
    params, tokens, dim, depth, batch, gib, mib = 86_567_656, 197, 768, 12, 4, 1024 ** 3, 1024 ** 2
    # Recompute keeps per block and image the residual stream before the attention and the MLP and both norms'
    # results (4 float32 tokens x dim), and holds one block's activations (tested above) again while recomputing it.
    block = planner.activation_bytes(planner.model_of(load_config(b16, cpu)), batch, "O0") / depth
    kept = depth * batch * 4 * tokens * dim * 4
    assert (plain.activation_gb - recomputed.activation_gb) * gib == pytest.approx(depth * block - kept - block)
    assert recomputed.total_gb - recomputed.activation_gb == pytest.approx(plain.total_gb - plain.activation_gb)
    # Data mode: the gradients per parameter and packed into FlatAdamW's buffers; its two moments and work copy.
    assert (plain.parameter_gb, plain.gradient_gb, plain.optimizer_gb) == pytest.approx(
        (params * 4 / gib, 2 * params * 4 / gib, 3 * params * 4 / gib))
    # The CPU runtime: the compiled graph (95 MiB + 20 per block with the fused kernels) and 16 bytes per
    # element of every output whose bias Add adds: out and fc2 per block, the patch embedding, the head.
    bias_outputs = depth * 2 * tokens * dim + 196 * dim + 1000
    assert plain.runtime_gb * gib == pytest.approx((95 + 20 * depth) * mib + 16 * batch * bias_outputs)
    stock = planner.step_estimate(load_config(b16, cpu + ["parallel.fused_cpu_kernels=false"]), 1)
    assert (stock.runtime_gb - plain.runtime_gb) * gib == pytest.approx(
        12 * depth * mib + 16 * batch * depth * tokens * (3 * dim + 4 * dim))  # and q, k, v and fc1
    # semi_auto on Ascend, and data mode there (per-parameter AdamW): the gradients once, no runtime figure.
    semi = planner.step_estimate(load_config(b16, SEMI + ["parallel.model_parallel=2"]), 8)
    assert semi.gradient_gb == pytest.approx(semi.params_per_device * 4 / gib) and semi.runtime_gb == 0
    data = planner.step_estimate(load_config(b16, ["parallel.device_target=Ascend"]), 8)
    assert data.gradient_gb == pytest.approx(params * 4 / gib) and data.optimizer_gb == plain.optimizer_gb


def _strategy_and_slices(run_dir, net, mp):
    """A strategy file and per-rank slices written by our own known layout (dp 1 x mp): column-parallel
    weights split on out, row-parallel on in, the rest whole; the format MindSpore's parallel compile writes."""
    import mindspore as ms
    import mindspore.train.node_strategy_pb2 as pb

    def tensor_map(name, ndim):  # MindSpore's tensor maps count device axes from the right: mp is 0
        if any(f".{layer}." in name for layer in ("query", "key", "value", "fc1")):
            return [0] + [-1] * (ndim - 1)
        if name.endswith(("out.weight", "fc2.weight")):
            return [-1, 0]
        return [-1] * ndim

    full = {p.name: p.asnumpy() for p in net.get_parameters()}
    layouts = pb.ParallelStrategyMap(current_stage=0)
    for name, value in full.items():
        layout = layouts.parallel_layout_item.add(param_name=name).parallel_layouts
        layout.dev_matrix.add().dim.extend([1, mp])
        layout.tensor_map.add().dim.extend(tensor_map(name, value.ndim))
        layout.param_split_shape.add()
        layout.indices_offset.add()
        layout.field, layout.opt_weight_shard_step, layout.opt_weight_shard_size = 0, 0, 0
    (run_dir / "strategy").mkdir(parents=True)
    (run_dir / "strategy" / "rank_0.ckpt").write_bytes(layouts.SerializeToString())
    for rank in range(mp):
        folder = run_dir / "checkpoints" / f"rank_{rank}"
        folder.mkdir(parents=True)
        sliced = []
        for name, value in full.items():
            axes = tensor_map(name, value.ndim)
            if 0 in axes:
                value = np.split(value, mp, axis=axes.index(0))[rank]
            sliced.append({"name": name, "data": ms.Tensor(value)})
        path = folder / "step_00000004.safetensors"
        # As checkpoint.save writes them: the step and epoch ride along, outside the strategy map.
        ms.save_checkpoint(sliced, str(path), append_dict={"step": 4, "epoch": 1}, format="safetensors")
        (folder / "step_00000004.json").write_text(json.dumps({"step": 4, "epoch": 1, "sha256": _sha256(path),
                                                               "world_size": mp}))
    return full


def test_merge_checkpoint_rebuilds_the_full_parameters_and_eval_loads_them(tmp_path):
    from safetensors.numpy import load_file

    from vit_dist.training.checkpoint import load_weights

    _, net = tiny_net()
    full = _strategy_and_slices(tmp_path, net, 4)
    out = run([PYTHON, "-m", "vit_dist", "merge-checkpoint", str(tmp_path)], timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    merged = tmp_path / "checkpoints" / "merged_step_00000004.safetensors"
    assert out.stdout.strip() == str(merged)
    params = load_file(str(merged))
    assert params.keys() == full.keys() | {"step", "epoch"} and int(params["step"]) == 4
    assert all(np.array_equal(params[k], full[k]) for k in full)
    _, fresh = tiny_net()
    load_weights(fresh, merged)  # what single-device `vit-dist eval --ckpt` does
    assert np.array_equal(fresh.blocks[0].attn.query.weight.asnumpy(), full["blocks.0.attn.query.weight"])
    # The last rank's slices missing (not copied from its node): the world size saved says so.
    shutil.move(tmp_path / "checkpoints" / "rank_3", tmp_path / "rank_3")
    out = run([PYTHON, "-m", "vit_dist", "merge-checkpoint", str(tmp_path)], timeout=120)
    assert out.returncode == 2 and "lacks the slices of ranks [3] of the 4 that saved" in out.stderr
    shutil.move(tmp_path / "rank_3", tmp_path / "checkpoints" / "rank_3")
    # A rank that stopped early: its newest slice is from another step. One line, exit status 2.
    folder = tmp_path / "checkpoints" / "rank_2"
    for suffix in (".safetensors", ".json"):
        (folder / f"step_00000004{suffix}").rename(folder / f"step_00000002{suffix}")
    out = run([PYTHON, "-m", "vit_dist", "merge-checkpoint", str(tmp_path)], timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith(
        "error: the ranks' newest slices are from different steps (step_00000002.safetensors, step_00000004")


@pytest.mark.parametrize("layout, message", [
    ([], "has no rank_N/ folders"),
    (["rank_0", "rank_2"], r"lacks the slices of ranks \[1\]"),
    (["rank_0"], r"rank_0 holds no verified checkpoint"),
])
def test_merge_checkpoint_errors(tmp_path, layout, message):
    from vit_dist.parallel.checkpoint_merge import merge

    for name in layout:
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    with pytest.raises(CheckpointError, match=message):
        merge(tmp_path)
