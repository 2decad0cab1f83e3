"""`vit-dist SUBCOMMAND ...`: argument parsing, then one function call per subcommand.

User errors (host.errors.UserError) become one line on stderr and exit status 2, whatever the
subcommand. Subcommands that start MindSpore do so through bootstrap.start, after every check that
needs none of it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from vit_dist import __version__, bootstrap
from vit_dist.host.checkpoint_files import evaluation_checkpoint, missing_checkpoint, require_ema
from vit_dist.host.config import AUTO_DEVICE, Config, compile_cache_dir, dump_yaml, load_config, validate
from vit_dist.host.errors import EXIT_USER_ERROR, ConfigError, UserError
from vit_dist.host.placement import Placement
from vit_dist.host.preflight import preflight, prepare_run_dir, resolve_run_dir
from vit_dist.host.private import private_folder
from vit_dist.host.progress import Progress
from vit_dist.host.run_record import CLASSES_FILE, CONFIG_FILE, RunRecord, remove_unstarted_run_dir, say
from vit_dist.host.shipped_configs import config_path, describe, shipped

CONFIG_HELP = "YAML config file, or a shipped config's name (vit-dist config list)"


@contextmanager
def _started(cfg: Config, job: str):
    """Checks the inputs, then brings up the backend (with MindSpore's data-parallel context unless the
    job lays itself out, as semi_auto training does); yields (placement, run directory, data scan) for
    the job. A run directory this process made is removed again when the command ends on a user error
    before its run got going (run_record.remove_unstarted_run_dir): a command that failed before it
    started leaves none behind."""
    placement = bootstrap.detect_placement(os.environ)
    _resolve_device(cfg, placement)
    # Ranks started without a run directory (plain msrun) each name one; rank 0's wins once they can talk.
    told = cfg.train.output_dir is not None or not placement.distributed
    run_dir = resolve_run_dir(cfg)
    made = run_dir if placement.is_main and not run_dir.exists() else None  # preflight makes it on rank 0
    try:
        run_dir, scan = preflight(cfg, placement.world_size, placement.is_main, True, _cache(),
                                  training=job == "train")
        if told:
            _announce(run_dir, placement)
        placement = bootstrap.init_backend(cfg.parallel.device_target, cfg.parallel.threads_per_rank, placement,
                                           data_parallel=cfg.parallel.mode == "data",
                                           compile_cache=_compile_cache(cfg, job, placement.world_size))
        if not told:
            run_dir = bootstrap.rank_0s_run_dir(run_dir, placement)
            cfg.train.output_dir = str(run_dir)
            if made is not None and made.resolve() != run_dir:  # a provisional rank 0 (msrun across nodes)
                remove_unstarted_run_dir(made)
                made = None
            _announce(run_dir, placement)
        yield placement, run_dir.resolve(), scan
    except UserError:
        if made is not None:
            remove_unstarted_run_dir(made)
        raise


def _resolve_device(cfg: Config, placement: Placement) -> None:
    """parallel.device_target made concrete (auto: the backend MindSpore finds), and the checks that
    depend on it run: the rest of the run, its config.yaml included, sees the concrete target."""
    requested = cfg.parallel.device_target
    cfg.parallel.device_target = bootstrap.resolve_device_target(requested, placement)
    validate(cfg)
    say(f"device target {cfg.parallel.device_target} (parallel.device_target auto)",
        requested == AUTO_DEVICE and placement.is_main)


def _announce(run_dir: Path, placement: Placement) -> None:
    """A rank of a job says where it is, in the run directory (for its launcher) and on stderr."""
    if placement.distributed:
        bootstrap.announce_worker(run_dir, placement)
        say(f"rank {placement.rank} of {placement.world_size} ({placement.launcher}), pid {os.getpid()}", True)


def _cache() -> Path:
    return bootstrap.user_cache_dir(os.environ)


def _compile_cache(cfg: Config, job: str, world_size: int) -> str | None:
    """The job's folder in train.compile_cache, which must be the user's own (MindSpore runs what it loads)."""
    if cfg.train.compile_cache is not None:
        private_folder(cfg.train.compile_cache, "train.compile_cache")
    return compile_cache_dir(cfg, job, world_size)


def cmd_train(args) -> int:
    cfg = load_config(args.config, args.set)
    with _started(cfg, "train") as (placement, run_dir, scan):
        from vit_dist.training.loop import train  # imports MindSpore: after bootstrap (the mpirun join)

        result = train(cfg, placement, run_dir, scan)
    if placement.is_main and "top1" not in result:  # semi_auto: evaluate the merged checkpoint with vit-dist eval
        print(f"merged checkpoint {result['checkpoint']}")
        print(json.dumps(result), flush=True)
    elif placement.is_main:
        ema = (f" (EMA top-1 {100 * result['ema_top1']:.2f}% top-5 {100 * result['ema_top5']:.2f}%)"
               if "ema_top1" in result else "")
        print(f"val top-1 {100 * result['top1']:.2f}% top-5 {100 * result['top5']:.2f}%{ema} "
              f"on {result['images']} images; checkpoint {result['checkpoint']}")
        print(json.dumps(result), flush=True)
    return 0


def _check_ema(args) -> None:
    """--ema on a checkpoint without EMA weights is one line before anything starts."""
    if args.ema and args.ckpt:
        require_ema(args.ckpt)


def cmd_eval(args) -> int:
    """`eval CONFIG --ckpt C` evaluates into a run directory of its own (eval.json, config.yaml);
    `eval RUN_DIR` evaluates a run with its config.yaml and its best checkpoint (else its newest
    verified one, or --ckpt), writing the result into that run as eval_<checkpoint name>.json."""
    finished = Path(args.config) if Path(args.config).is_dir() else None
    if finished is not None and not (finished / CONFIG_FILE).is_file():
        raise ConfigError(f"{finished} holds no {CONFIG_FILE}, so it is no run directory; give vit-dist eval a "
                          "run directory, or CONFIG --ckpt CHECKPOINT")
    cfg = load_config(finished / CONFIG_FILE if finished else args.config, args.set)
    if finished is not None:
        cfg.train.output_dir = str(finished)  # where it ran: config.yaml may name it relative to another folder
    ckpt = Path(args.ckpt) if args.ckpt else evaluation_checkpoint(finished) if finished else None
    if ckpt is None:
        raise ConfigError(f"vit-dist eval {args.config} needs --ckpt CHECKPOINT (or give it a run directory: "
                          "vit-dist eval RUN_DIR)")
    if not ckpt.is_file():  # one line before anything starts
        raise missing_checkpoint(ckpt)
    if args.ema:
        require_ema(ckpt)
    with _started(cfg, "eval") as (placement, run_dir, scan):
        from vit_dist.training.evaluate import evaluate_checkpoint  # imports MindSpore: after bootstrap

        record = RunRecord(run_dir, placement.is_main)
        result = evaluate_checkpoint(cfg, ckpt, placement, scan, record.say, args.ema)
        if finished is None:
            record.write_config(cfg)
            record.write_eval(result)
        else:  # the run's own config.yaml and eval.json stay as training left them
            record.write_eval(result, f"eval_{ckpt.stem}.json")
            record.say(f"wrote {run_dir / f'eval_{ckpt.stem}.json'}")
    if placement.is_main:
        print(json.dumps(result), flush=True)
    return 0


def _start_single(cfg: Config) -> None:
    """Inference and export run in this one process, on the configured device."""
    _resolve_device(cfg, Placement.single())
    bootstrap.init_backend(cfg.parallel.device_target, cfg.parallel.threads_per_rank, Placement.single())


def cmd_infer(args) -> int:
    cfg = load_config(args.config, args.set)
    from vit_dist.tools.infer import find_images, format_prediction, run_inference

    find_images(args.images)  # a wrong path is one line before the backend starts
    _check_ema(args)
    _start_single(cfg)
    for prediction in run_inference(cfg, args.ckpt, args.images, args.topk, args.out, args.ema):
        print(format_prediction(prediction))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def cmd_export(args) -> int:
    cfg = load_config(args.config, args.set)
    from vit_dist.tools.export import export_model

    _check_ema(args)
    _start_single(cfg)
    out = export_model(cfg, args.ckpt, args.format, args.out, args.batch_size, args.ema)
    print(f"wrote {out} (input {args.batch_size}x3x{cfg.data.image_size}x{cfg.data.image_size} float32, "
          f"normalised as data.mean/std)")
    return 0


def cmd_plot(args) -> int:
    from vit_dist.tools.plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0


def cmd_info(args) -> int:
    from vit_dist.host.datascan import scan_dataset
    from vit_dist.host.planner import count_parameters
    from vit_dist.models.spec import ViTSpec, forward_flops

    cfg = load_config(args.config, args.set)
    num_classes = cfg.model.num_classes or len(scan_dataset(cfg.data)[2])
    spec = ViTSpec.of(cfg, num_classes)
    info = {"params": count_parameters(spec), "forward_gflops": forward_flops(spec) / 1e9}
    if args.json:
        print(json.dumps(info))
    else:
        m = cfg.model
        print(f"ViT-{m.variant}/{m.patch_size} at {cfg.data.image_size}px: dim {m.embed_dim}, depth {m.depth}, "
              f"heads {m.num_heads}, mlp {m.mlp_dim}, {num_classes} classes")
        print(f"parameters {info['params']:,}; forward {info['forward_gflops']:.3f} GFLOPs per image")
    return 0


def cmd_bench(args) -> int:
    if args.config is None and not args.peak:
        raise ConfigError("vit-dist bench needs a CONFIG (e.g. bench/vit_32px, a shipped config), or --peak")
    if args.steps < 1 or args.warmup < 0:
        raise ConfigError(f"bench needs --steps >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    cfg = load_config(args.config, args.set)  # --peak without a config measures the device auto finds
    placement = bootstrap.detect_placement(os.environ)
    _resolve_device(cfg, placement)
    if args.data:
        preflight(cfg, placement.world_size, placement.is_main, False, _cache())  # before MindSpore starts
    elif not args.peak and cfg.model.num_classes is None:
        raise ConfigError("vit-dist bench trains on synthetic batches and needs model.num_classes; "
                          "set it in the config or with --set model.num_classes=N")
    # The train step's cache: bench compiles the very graph training runs, so either fills it for the other.
    placement = bootstrap.init_backend(cfg.parallel.device_target, cfg.parallel.threads_per_rank, placement,
                                       data_parallel=cfg.parallel.mode == "data",
                                       compile_cache=_compile_cache(cfg, "train", placement.world_size))
    from vit_dist.tools import bench  # imports MindSpore: after bootstrap (the mpirun join)

    if args.peak:
        result = {"peak_gflops": bench.matmul_peak_gflops()}
        text = f"fp32 MatMul peak {result['peak_gflops']:.1f} GFLOP/s (2048^3, median of 10)"
    elif args.data:
        result = bench.bench_data(cfg, placement, args.steps)
        text = bench.format_data(result)
    else:
        result = bench.bench_train(cfg, placement, args.steps, args.warmup, args.peak_gflops)
        text = bench.format_train(result)
    if placement.is_main:
        print(text)
        if args.json:
            print(json.dumps(result), flush=True)
    return 0


def cmd_preflight(args) -> int:
    if Path(args.config).is_dir():  # a launcher's job writes its logs into its run directory, not into a run's
        raise ConfigError(f"the launchers take CONFIG, not a run directory: evaluate {args.config} on one device with "
                          f"vit-dist eval {args.config}, or launch eval {Path(args.config) / CONFIG_FILE} --ckpt C")
    cfg = load_config(args.config, args.set)
    if args.nodes > 1 and cfg.train.output_dir is None:
        raise ConfigError(f"a job across {args.nodes} nodes needs train.output_dir: each node's launcher would "
                          "make a run directory of its own; set it to a directory every node shares")
    if args.ckpt and not Path(args.ckpt).is_file():
        raise missing_checkpoint(Path(args.ckpt))
    _resolve_device(cfg, Placement.single())  # the launcher's workers are given the concrete target
    _check_ema(args)
    if args.bench and not args.data:  # synthetic batches: no data to check
        run_dir = resolve_run_dir(cfg)
        prepare_run_dir(run_dir)
    else:  # eval is the job with a --ckpt
        run_dir, _ = preflight(cfg, args.world, True, False, _cache(),
                               training=not args.bench and args.ckpt is None)
    print(run_dir.resolve())
    print(cfg.parallel.device_target)
    return 0


def cmd_check_data(args) -> int:
    """Every data problem under ROOT at once; exit 1 if any would stop or change training."""
    from vit_dist.host.datascan import survey
    from vit_dist.host.image_check import printable

    found = survey(Path(args.root), _cache())
    for line in found.notes + found.problems:
        print(line)
    others = len(found.problems) - found.bad
    print(f"{found.bad} bad of {found.checked} image files under {printable(args.root)}"
          + (f"; {others} other problem(s) above" if others else ""))
    return 1 if found.problems else 0


def cmd_plan(args) -> int:
    from vit_dist.host.planner import format_plan, plan

    cfg = load_config(args.config, args.set)
    if args.world < 1 or args.device_memory_gb <= 0:
        raise ConfigError("--world must be at least 1 and --device-memory-gb above 0")
    result = plan(cfg, args.world, args.mp, args.device_memory_gb)
    if not args.compile:
        print(json.dumps(result) if args.json else format_plan(result))
        return 0
    from vit_dist.host.planner import step_estimate
    from vit_dist.tools.dry_run import format_dry_run, simulate

    # The fused CPU kernels' step signal waits for kernels that a DryRun never runs.
    overrides = [*args.set, "parallel.fused_cpu_kernels=false"]
    if args.world > 1:  # MindSpore 2.10 refuses a distributed DryRun on the CPU
        if "Ascend" not in bootstrap.available_devices():
            raise ConfigError(f"plan --compile --world {args.world} runs MindSpore's DryRun, which compiles a job of "
                              "several ranks for Ascend only, and this MindSpore cannot load Ascend; run it where "
                              "MindSpore's Ascend build and CANN are installed (no cards needed), or leave out --compile")
        overrides.append("parallel.device_target=Ascend")
    planned = step_estimate(cfg, args.world).total_gb
    dry_run = simulate(str(args.config), overrides, args.world, args.rank,
                       bootstrap.dry_run_env(os.environ, device_memory=args.world > 1))
    print(json.dumps({**result, "dry_run": dry_run}) if args.json else
          f"{format_plan(result)}\n{format_dry_run(dry_run, planned)}")
    return 0 if dry_run["compiled"] else 1


def cmd_merge_checkpoint(args) -> int:
    from vit_dist.parallel.checkpoint_merge import merge

    print(merge(Path(args.run_dir), Path(args.strategy) if args.strategy else None))
    return 0


def cmd_demo_data(args) -> int:
    if args.photos is not None:
        if args.image_size is not None:
            raise ConfigError("--image-size sizes the digits; --photos writes ImageNet-size 500x375 photos")
        from vit_dist.tools.photo_data import write_photo_data

        counts = write_photo_data(args.out, args.photos)
        print(f"wrote {counts['train']} train and {counts['val']} val photos (500x375 JPEG) to {args.out}")
        return 0
    from vit_dist.tools.demo_data import write_demo_data

    counts = write_demo_data(args.out, args.image_size or 32)
    print(f"wrote {counts['train']} train and {counts['val']} val images to {args.out}")
    return 0


def cmd_rank_table(args) -> int:
    from vit_dist.host.rank_table import main as rank_table_main

    return rank_table_main(args.args)


def cmd_config_list(args) -> int:
    configs = shipped()
    width = max(map(len, configs))
    for name, path in configs.items():
        print(f"{name:<{width}}  {describe(path)}")
    return 0


def cmd_config_show(args) -> int:
    """The file as shipped, comments and all; with --set, the resolved config (every key) instead."""
    path = config_path(args.name)
    print(dump_yaml(load_config(path, args.set)) if args.set else path.read_text(), end="")
    return 0


def add_bench_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=20, help="bench: timed steps (with --data: timed batches)")
    p.add_argument("--warmup", type=int, default=3, help="bench: untimed steps after the first (compiling) one")
    p.add_argument("--peak-gflops", type=float, help="bench: MFU against this peak instead of measuring it")
    p.add_argument("--data", action="store_true", help="bench: time the input pipeline on data.root/train")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line, last")


def add_ema_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ema", action="store_true",
                   help="the checkpoint's EMA of the weights (ema.* tensors, trained with train.ema_decay > 0)")


def cmd_import_weights(args) -> int:
    from vit_dist.host.atomic import write_atomic
    from vit_dist.tools import weights

    if Path(args.out).suffix != ".safetensors":  # a .ckpt would hold bytes MindSpore's .ckpt reader cannot read
        raise ConfigError(f"{args.out}: import-weights writes safetensors; name the output .safetensors (read it "
                          "with mindspore.load_checkpoint(path, format='safetensors'))")
    if (args.base or args.set) and not args.config_out:
        raise ConfigError("--base and --set shape the --config-out file; add --config-out F.yaml")
    # Steps (read and convert, write): each is one library call on the whole file.
    with Progress(2, f"importing {args.src}", "steps") as progress:
        imported = weights.import_weights(args.src, args.source, num_heads=args.num_heads,
                                          image_size=args.image_size, num_classes=args.num_classes,
                                          drop_head=args.drop_head, seed=args.seed)
        progress.advance()
        if args.config_out:  # built and validated before anything is written
            cfg = load_config(args.base, args.set)
            weights.apply_to_config(cfg, imported, Path(args.out))
            validate(cfg)
            text = dump_yaml(cfg)
        out = weights.save_imported(imported, args.out, args.source)
        progress.advance()
    weights.report(imported, lambda line: print(line, file=sys.stderr))
    print(f"{weights.describe(imported)}; wrote {len(imported.params)} tensors to {out}")
    if imported.classes:  # where infer looks first
        write_atomic(out.parent / CLASSES_FILE, json.dumps(imported.classes) + "\n")
        print(f"wrote the source's {len(imported.classes)} class names to {out.parent / CLASSES_FILE}")
    if args.config_out:
        write_atomic(args.config_out, text)
        print(f"wrote {args.config_out}")
    return 0


def cmd_export_weights(args) -> int:
    from vit_dist.tools.export_weights import export_weights

    out, card = export_weights(args.src, args.to, args.out, args.last, args.ema, args.train_config)
    print(f"{card.describe()}; wrote {out} for {'transformers' if args.to == 'hf' else 'timm'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vit-dist", description="Distributed ViT training with MindSpore")
    parser.add_argument("--version", action="version", version=f"vit-dist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", nargs="?", help=CONFIG_HELP)  # or after --set: see parse_args
        p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                       help="override config keys, e.g. --set train.epochs=3 model.depth=6 (repeatable)")
        return p

    with_config("train", "train (one device, or one worker of a launcher's job)").set_defaults(func=cmd_train)
    p = with_config("eval", "evaluate a checkpoint on data.root/val; CONFIG may be a run directory: its "
                            "config.yaml and best checkpoint, the result written into it")
    p.add_argument("--ckpt", help="checkpoint file (.safetensors); required with a CONFIG file")
    add_ema_option(p)
    p.set_defaults(func=cmd_eval)
    p = with_config("infer", "top-k classes of image files (no dataset needed)")
    p.add_argument("--ckpt", required=True, help="checkpoint file (.safetensors)")
    p.add_argument("--images", required=True, help="an image file or a folder of images (searched recursively)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--out", help="write the predictions: .json (a list) or .csv (image, rank, class, index, prob)")
    add_ema_option(p)
    p.set_defaults(func=cmd_infer)
    p = with_config("export", "write a checkpoint as a MindIR (or ONNX) graph for inference")
    p.add_argument("--ckpt", required=True, help="checkpoint file (.safetensors)")
    p.add_argument("--format", default="mindir", choices=("mindir", "onnx"))
    p.add_argument("--out", help="output file (default: the checkpoint's name with .mindir/.onnx)")
    p.add_argument("--batch-size", type=int, default=1, help="the exported graph's fixed batch size")
    add_ema_option(p)
    p.set_defaults(func=cmd_export)
    p = with_config("info", "parameter count and forward FLOPs per image")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("bench", help="training images/s, compile time, MFU on synthetic batches; "
                                     "--data: the input pipeline alone; --peak: the fp32 MatMul peak")
    p.add_argument("config", nargs="?", help=f"{CONFIG_HELP} (the shipped bench/*)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set train.batch_size=32")
    p.add_argument("--peak", action="store_true", help="measure MindSpore's fp32 MatMul GFLOP/s only")
    add_bench_options(p)
    p.set_defaults(func=cmd_bench)
    p = with_config("preflight", "check config and data for a job of --world ranks; "
                                 "print the run directory and the device target")
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--nodes", type=int, default=1,
                   help="launchers (one per node) starting the job; each resolves the run directory itself")
    p.add_argument("--ckpt", help="checkpoint the job will load: checked to exist")
    add_ema_option(p)
    p.add_argument("--bench", action="store_true",
                   help="the job is `vit-dist bench`: the data is checked only with --data")
    add_bench_options(p)
    p.set_defaults(func=cmd_preflight)
    p = sub.add_parser("check-data", help="list every data problem under ROOT (image files the decoder would fail "
                                          "on, with reasons; class folders in one split only; empty or all-bad "
                                          "splits; names MindSpore cannot take) and what is ignored; exit status 1 "
                                          "if any problem would stop or change training")
    p.add_argument("root", help="the data.root folder, holding train/ and val/")
    p.set_defaults(func=cmd_check_data)
    p = with_config("plan", "memory and communication per device of data/semi-auto layouts, and an mp")
    p.add_argument("--world", type=int, required=True, help="devices in the job")
    p.add_argument("--mp", type=int, help="model-parallel degree to detail (default: the recommended one)")
    p.add_argument("--device-memory-gb", type=float, default=64.0, help="memory budget per device, GiB")
    p.add_argument("--json", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="also compile the train step as one rank of --world would, with MindSpore's DryRun (devices "
                        "mocked; several ranks need MindSpore's Ascend build and CANN, not the cards)")
    p.add_argument("--rank", type=int, default=0, help="with --compile: the rank to compile as (default 0)")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("merge-checkpoint", help="merge a semi_auto run's per-rank slices into one checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--strategy", help="strategy file (default: RUN_DIR/strategy/rank_0.ckpt)")
    p.set_defaults(func=cmd_merge_checkpoint)
    p = sub.add_parser("plot", help="PNG of a run's loss, val top-1, lr, loss scale and images/s against step")
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG file (default: RUN_DIR/curves.png)")
    p.set_defaults(func=cmd_plot)
    p = sub.add_parser("demo-data", help="write the demo digits ImageFolder (or, with --photos, ImageNet-size "
                                         "JPEG photos for vit-dist bench --data)")
    p.add_argument("out")
    p.add_argument("--image-size", type=int, help="the digits' size in pixels (default 32)")
    p.add_argument("--photos", type=int, metavar="N",
                   help="write N JPEG photos of about ImageNet's size cut from scikit-image's (the bench extra)")
    p.set_defaults(func=cmd_demo_data)
    p = sub.add_parser("import-weights", help="convert a timm, Hugging Face or MindCV ViT to this project's "
                                              "parameters (safetensors)")
    p.add_argument("src", help="weights file (.safetensors, .bin/.pt/.pth state dict, MindCV .ckpt) "
                               "or a Hugging Face save_pretrained folder")
    p.add_argument("out", help="output weights file (.safetensors)")
    p.add_argument("--from", dest="source", required=True, choices=("timm", "hf", "mindcv"))
    p.add_argument("--image-size", type=int, help="resample the position embedding for this image size")
    head = p.add_mutually_exclusive_group()
    head.add_argument("--num-classes", type=int, help="re-initialise the head for this many classes")
    head.add_argument("--drop-head", action="store_true", help="leave the head out (fine-tuning makes a new one)")
    p.add_argument("--num-heads", type=int, help="attention heads, where the source does not record them")
    p.add_argument("--seed", type=int, default=0, help="seed of a re-initialised head")
    p.add_argument("--config-out", help="write a config whose model section matches the weights")
    p.add_argument("--base", help="config the --config-out file starts from (default: the defaults)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="overrides for the --config-out file, e.g. --set data.root=data/x parallel.device_target=CPU")
    p.set_defaults(func=cmd_import_weights)
    p = sub.add_parser("export-weights", help="write a run's weights as a folder transformers "
                                              "(ViTForImageClassification.from_pretrained) or timm "
                                              "(create_model('local-dir:OUT', pretrained=True)) loads")
    p.add_argument("src", help="a run directory (its weights/best.safetensors), a weights-only file, or a full "
                               "checkpoint (with --config, unless it sits in RUN_DIR/checkpoints)")
    p.add_argument("--to", required=True, choices=("hf", "timm"))
    p.add_argument("--out", required=True, help="the folder to write (must not exist)")
    p.add_argument("--last", action="store_true", help="a run directory's last weights instead of its best")
    add_ema_option(p)
    # dest: `config` is the positional CONFIG other subcommands must have (parse_args checks it)
    p.add_argument("--config", dest="train_config", metavar="CONFIG",
                   help="the config a checkpoint without metadata was trained with")
    p.set_defaults(func=cmd_export_weights)
    p = sub.add_parser("config", help="the configs shipped with vit-dist, usable by name wherever a CONFIG goes")
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="each shipped config's name and what it is").set_defaults(func=cmd_config_list)
    p = actions.add_parser("show", help="print a shipped config; with --set, the resolved config with every key")
    p.add_argument("name", help="a shipped config's name (vit-dist config list) or a YAML file")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="overrides to apply, e.g. --set train.epochs=3")
    p.set_defaults(func=cmd_config_show)
    p = sub.add_parser("rank-table", help="generate, merge or validate HCCL rank tables", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER, help="vit-dist rank-table --help lists them")
    p.set_defaults(func=cmd_rank_table)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line; `--set k=v CONFIG` works too: --set takes every word after it, so a word
    there without '=' is the config (no override lacks one)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = getattr(args, "set", [])
    stray = [word for word in overrides if "=" not in word]
    if stray and getattr(args, "config", "") is None and len(stray) == 1:
        args.config, args.set = stray[0], [word for word in overrides if word != stray[0]]
    if getattr(args, "config", "") is None and args.func is not cmd_bench:
        parser.error(f"vit-dist {args.command} needs a CONFIG (a YAML file, or a shipped config's name, e.g. demo)")
    return args


def main(argv: list[str] | None = None) -> int:
    if bootstrap.is_scheduler(os.environ):  # msrun and the mpirun bootstrap start this script as the scheduler too
        bootstrap.serve_scheduler(os.environ)
        return 0
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
