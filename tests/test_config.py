"""Config loading, strict keys, overrides and validation (no MindSpore needed)."""
from pathlib import Path

import pytest
import yaml

from vit_dist.host.config import (ConfigError, config_digest, dump_yaml, load_config, scaled_lr, validate,
                                     with_scaled_lr)

CONFIGS = Path(__file__).resolve().parents[1] / "vit_dist" / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda path: path.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.data.image_size % cfg.model.patch_size == 0


@pytest.mark.parametrize("variant, width", [("ti", 192), ("s", 384), ("b", 768)])
def test_the_deit_recipes_turn_on_every_part_of_deits_recipe(variant, width):
    cfg = load_config(CONFIGS / f"deit_{variant}16_imagenet.yaml")
    d, t = cfg.data, cfg.train
    assert cfg.model.embed_dim == width and cfg.model.drop_path_rate == 0.1 and t.epochs == 300
    assert (d.interpolation, d.rand_augment, d.random_erasing, d.mixup_alpha, d.cutmix_alpha,
            d.repeated_augmentation) == ("bicubic", "rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0, 3)
    assert (t.lr, t.lr_base_batch, t.weight_decay, t.label_smoothing, t.warmup_epochs) == (5e-4, 512, 0.05, 0.1, 5)


def test_variant_fills_widths_and_explicit_keys_win():
    cfg = load_config(CONFIGS / "vit_b16_imagenet.yaml")
    m = cfg.model
    assert (m.embed_dim, m.depth, m.num_heads, m.mlp_dim, m.num_classes) == (768, 12, 12, 3072, 1000)
    m = load_config(CONFIGS / "vit_b16_imagenet.yaml", ["model.depth=6"]).model
    assert (m.embed_dim, m.depth) == (768, 6)


def test_overrides_are_typed():
    cfg = load_config(CONFIGS / "demo.yaml", ["train.epochs=3", "train.lr=5e-4", "data.crop_scale=[0.3, 1]",
                                              "train.output_dir=runs/x", "model.num_classes=null"])
    assert cfg.train.epochs == 3 and cfg.train.lr == 5e-4 and cfg.data.crop_scale == (0.3, 1.0)
    assert cfg.train.output_dir == "runs/x" and cfg.model.num_classes is None


def test_unknown_key_names_key_file_and_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key 'train\.epoch' \(did you mean 'train\.epochs'\?\)"):
        load_config(path)


def test_unknown_section_and_override_key():
    with pytest.raises(ConfigError, match=r"unknown key 'trian' \(did you mean 'train'\?\)"):
        load_config(None, ["trian.epochs=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'model\.dept' \(did you mean 'model\.depth'\?\)"):
        load_config(None, ["model.dept=6"])


@pytest.mark.parametrize("override, message", [
    ("train.epochs=three", r"train\.epochs must be an integer, got 'three'"),
    ("train.epochs=2.5", r"train\.epochs must be an integer"),
    ("data.augment=1", r"data\.augment must be true or false"),
    ("train.lr=fast", r"train\.lr must be a number"),
    ("data.crop_scale=0.5", r"data\.crop_scale must be a list of 2 numbers"),
    ("model.variant=xl", r"model\.variant 'xl' is unknown; use one of ti, s, b, l, h"),
    ("data.interpolation=nearest", r"data\.interpolation 'nearest' is not supported; use one of bilinear, bicubic"),
    ("data.image_size=100", r"data\.image_size 100 is not divisible by model\.patch_size 16"),
    ("parallel.device_target=TPU",
     r"parallel\.device_target 'TPU' is not supported; use one of auto, Ascend, GPU, CPU"),
    ("model.num_heads=5", r"model\.embed_dim 768 is not divisible by model\.num_heads 5"),
    ("train.batch_size=0", r"train\.batch_size must be at least 1"),
    ("data.repeated_augmentation=0", r"data\.repeated_augmentation must be at least 1 \(1: off; DeiT uses 3\), got 0"),
    ("train.recompute=2", r"train\.recompute must be true or false, got 2"),
    # NaN and infinities (YAML's .nan, .inf) are numbers to the parser, never a usable value.
    ("train.lr=.nan", r"train\.lr must be a finite number, got nan"),
    ("train.weight_decay=.inf", r"train\.weight_decay must be a finite number, got inf"),
    ("train.warmup_epochs=-.inf", r"train\.warmup_epochs must be a finite number"),
    ("train.grad_clip_norm=.nan", r"train\.grad_clip_norm must be a finite number"),
    ("precision.loss_scale_value=.inf", r"precision\.loss_scale_value must be a finite number"),
    ("data.crop_scale=[0.1,.nan]", r"data\.crop_scale must be a finite number"),
    ("parallel.threads_per_rank=-3", r"parallel\.threads_per_rank must be >= 0"),
    ("train.adam_beta2=1.0", r"train\.adam_beta1 and adam_beta2 must be in \[0, 1\)"),
    # The recipe's augmentation keys.
    ("data.interpolation=nearest", r"data\.interpolation 'nearest' is not supported; use one of bilinear, bicubic"),
    ("data.color_jitter=-0.1", r"data\.color_jitter must be >= 0 \(0 turns it off\), got -0\.1"),
    ("data.random_erasing=1.5", r"data\.random_erasing is a probability: it must be in \[0, 1\], got 1\.5"),
    ("data.mixup_alpha=-1", r"data\.mixup_alpha must be >= 0"),
    ("data.cutmix_alpha=-0.5", r"data\.cutmix_alpha must be >= 0"),
    ("data.mixup_prob=2", r"data\.mixup_prob is a probability: it must be in \[0, 1\]"),
    ("data.mixup_switch_prob=-0.1", r"data\.mixup_switch_prob is a probability"),
    ("data.mixup_prob=yes", r"data\.mixup_prob must be a number"),
    ("data.rand_augment=augmix-m5", r"data\.rand_augment 'augmix-m5': it must start with 'rand'; use timm's form, "
                                    r"e\.g\. rand-m9-mstd0\.5-inc1"),
    ("data.rand_augment=rand-m11", r"'rand-m11': m must be an integer in \[0, 10\]"),
    ("data.rand_augment=rand-m9.5", r"'rand-m9\.5': 'm9\.5': m takes an integer"),
    ("data.rand_augment=rand-m9-n0", r"n must be at least 1"),
    ("data.rand_augment=rand-m9-p1.5", r"p must be in \[0, 1\]"),
    ("data.rand_augment=rand-m9-inc2", r"inc takes 0 or 1"),
    ("data.rand_augment=rand-m9-m7", r"'m' is given twice"),
    ("data.rand_augment=rand-m9-x3", r"'x3' is not one of m<int>, n<int>, p<float>, mstd<float>, mmax<int>, inc<0\|1>"),
    ("data.rand_augment=rand-m9-tweights", r"'tweights': timm's op sets cannot be chosen"),
    ("data.rand_augment=rand-m9-mstd", r"'mstd' is not one of"),
    ("train.ema_decay=1.0", r"train\.ema_decay must be in \[0, 1\) \(0: no EMA\), got 1\.0"),
    ("train.layer_decay=0", r"train\.layer_decay must be in \(0, 1\] \(1: no layer-wise decay\), got 0\.0"),
    ("train.layer_decay=1.5", r"train\.layer_decay must be in \(0, 1\]"),
    ("train.lr_base_batch=-1", r"train\.lr_base_batch must be >= 0 \(0: train\.lr as given\), got -1"),
    ("train.lr_base_batch=512.0", r"train\.lr_base_batch must be an integer"),
    ("train.tensorboard=yes please", r"train\.tensorboard must be true or false, got 'yes please'"),
    ("train.profile_steps=5", r"train\.profile_steps must be a list of 2 numbers, got 5"),
    ("train.profile_steps=[1.5,3]", r"train\.profile_steps must be an integer, got 1\.5"),
])
def test_bad_values_are_one_clear_line(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)


def test_the_device_checks_wait_for_auto_to_be_resolved():
    """auto is the default; what depends on the device is checked again once the bootstrap resolved it."""
    cfg = load_config(None, ["parallel.mode=semi_auto", "precision.amp_level=O2", "precision.dtype=bfloat16"])
    assert cfg.parallel.device_target == "auto"
    cfg.parallel.device_target = "CPU"
    with pytest.raises(ConfigError, match=r"precision\.dtype bfloat16 has no CPU kernels"):
        validate(cfg)
    cfg.precision.dtype = "float16"
    with pytest.raises(ConfigError, match=r"parallel\.mode semi_auto needs parallel\.device_target Ascend:"):
        validate(cfg)


def test_malformed_override_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["train.epochs"])
    path = tmp_path / "bad.yaml"
    path.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "demo.yaml", ["train.epochs=5"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text())["model"]["embed_dim"] == cfg.model.embed_dim


def test_the_command_line_takes_set_before_the_config_and_says_its_version():
    from conftest import ok, vit_dist

    config = str(CONFIGS / "demo.yaml")
    before = ok(vit_dist("plan", "--world", "2", "--set", "model.num_classes=10", "train.batch_size=8", config, "--json"))
    after = ok(vit_dist("plan", config, "--world", "2", "--json", "--set", "model.num_classes=10", "train.batch_size=8"))
    assert before.stdout == after.stdout and '"world": 2' in before.stdout
    missing = vit_dist("plan", "--world", "2", "--set", "model.num_classes=10")
    assert missing.returncode == 2 and "vit-dist plan needs a CONFIG" in missing.stderr
    from vit_dist import __version__
    assert ok(vit_dist("--version")).stdout.strip() == f"vit-dist {__version__}"


def test_lr_base_batch_scales_the_rate_to_the_global_batch_and_the_written_config_keeps_it(tmp_path):
    """DeiT's rule, lr x global batch / lr_base_batch, with the global batch of 2 ranks x 2 accumulated
    micro-batches of 64; min_lr as given. The run's config.yaml holds the resolved rate (and says how it
    was scaled), so loading it again trains at that rate at any world size, under the same digest."""
    from vit_dist.host.placement import ParallelDims
    from vit_dist.host.run_record import RunRecord

    cfg = load_config(None, ["train.lr=5e-4", "train.min_lr=1e-5", "train.lr_base_batch=512", "train.batch_size=64",
                             "parallel.grad_accumulation=2"])
    global_batch = ParallelDims.of(cfg, 2).global_batch
    resolved, note = with_scaled_lr(cfg, global_batch)
    assert global_batch == 256 and scaled_lr(cfg.train, global_batch) == resolved.train.lr == 2.5e-4
    assert (resolved.train.lr_base_batch, resolved.train.min_lr) == (0, 1e-5)
    assert note == "train.lr 0.00025 is 0.0005 x global batch 256 / train.lr_base_batch 512"
    RunRecord(tmp_path, True).write_config(resolved, note)
    assert (tmp_path / "config.yaml").read_text().startswith(f"# {note}\n")
    written = load_config(tmp_path / "config.yaml")
    assert written == resolved and with_scaled_lr(written, 1024) == (written, "")
    assert config_digest(written) == config_digest(with_scaled_lr(cfg, global_batch)[0])
    assert with_scaled_lr(load_config(None, ["train.lr=5e-4"]), 256)[0].train.lr == 5e-4  # 0: as given
    with pytest.raises(ConfigError, match=r"train\.lr 0\.0005 scaled to the global batch 64 \(train\.lr_base_batch "
                                          r"512\) is 6\.25e-05, below train\.min_lr 0\.0001; lower train\.min_lr"):
        scaled_lr(load_config(None, ["train.lr=5e-4", "train.min_lr=1e-4", "train.lr_base_batch=512"]).train, 64)
