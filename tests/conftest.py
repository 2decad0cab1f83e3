"""Shared fixtures: a tiny real-image ImageFolder, tiny configs, and process runners that always
clean up their process group (msrun spawns a scheduler and workers under the launcher)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


# tests/run.sh runs the suite on two xdist workers, a module to a worker (--dist loadfile: its
# module-scoped runs are made once). The modules that take longest start first, so that both workers
# finish at about the same time.
LONGEST_FIRST = ("test_precision", "test_launch", "test_train_e2e", "test_reliability", "test_bench",
                 "test_run_dirs", "test_resume", "test_bad_data", "test_semi_auto", "test_pretrained", "test_logs",
                 "test_rank_table")


def pytest_collection_modifyitems(items):
    order = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(item.path.stem, len(order)))


# OpenMPI refuses to run as root unless told to (test machines often are root).
MPI_AS_ROOT = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def tool_env(**extra: str) -> dict:
    """The environment of the test's own interpreter: its bin first on PATH, as msrun needs."""
    env = dict(os.environ, PYTHON=PYTHON, **extra)
    env["PATH"] = f"{Path(PYTHON).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MS_ROLE", None)
    return env


def run(cmd: list[str], timeout: float = 300, cwd: Path = ROOT,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs a command in its own session; on timeout the whole process group is killed."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or tool_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{cmd} timed out after {timeout}s\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    finally:
        try:  # workers left behind by a failed launcher
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def vit_dist(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run([PYTHON, "-m", "vit_dist", *args], timeout=timeout)


def msrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run(["bash", str(ROOT / "launch" / "msrun.sh"), *args], timeout=timeout)


def mpirun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run(["bash", str(ROOT / "launch" / "mpirun.sh"), *args], timeout=timeout, env=tool_env(**MPI_AS_ROOT))


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout[-4000:]}\n" \
                                   f"stderr:\n{result.stderr[-4000:]}"
    return result


def write_image_folder(root: Path, per_class: dict[str, dict[str, int]], size: int = 16) -> Path:
    """Real digit images (scikit-learn's), `per_class[split][class] = count`, as PNGs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for split, classes in per_class.items():
        for name, count in classes.items():
            label = int(name[-1])
            pixels = digits.images[digits.target == label]
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            offset = 0 if split == "train" else 100
            for i in range(count):
                image = Image.fromarray((pixels[offset + i] * 15.9).astype(np.uint8), mode="L")
                image.resize((size, size), Image.BICUBIC).save(folder / f"{split}_{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """48 train images (3 classes x 16) and 9 val images (3 x 3), 16 px."""
    root = tmp_path_factory.mktemp("tiny_data")
    classes = ("digit0", "digit1", "digit7")
    return write_image_folder(root, {"train": {c: 16 for c in classes}, "val": {c: 3 for c in classes}})


# Every option of the ImageNet recipe, sized for tiny_config (batch 8, 16 px): the resume and restart
# tests run with all of them on, so that each of their random draws must resume exactly.
RECIPE = {"data": {"interpolation": "bicubic", "rand_augment": "rand-m9-mstd0.5-inc1", "random_erasing": 0.25,
                   "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "repeated_augmentation": 2},
          "train": {"ema_decay": 0.9, "layer_decay": 0.75, "recompute": True}}


def with_recipe(**sections) -> dict:
    """`sections` (as tiny_config takes them) with RECIPE's keys added."""
    return {name: {**RECIPE.get(name, {}), **sections.get(name, {})} for name in {*RECIPE, *sections}}


def tiny_config(path: Path, data_root: Path, **sections) -> Path:
    """A ViT small enough to compile and step in seconds; `sections` override keys per section."""
    cfg = {
        "model": {"variant": "ti", "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2,
                  "drop_path_rate": 0.0},
        "data": {"root": str(data_root), "image_size": 16, "num_workers": 1},
        "train": {"epochs": 2, "batch_size": 8, "lr": 1.0e-3, "warmup_epochs": 0.5, "log_interval": 2,
                  "eval_every_epochs": 0, "seed": 7},
        "parallel": {"device_target": "CPU", "threads_per_rank": 1},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def load_params(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def last_checkpoint(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("step_*.safetensors"))[-1]


def worst_relative_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, str]:
    """The largest relative difference between the tensors of two checkpoints, and its name. The key
    bias adds one constant to every score of a query, which softmax cancels: its true gradient is
    zero, and Adam turns the float noise in it into full-size steps of either sign, so it is left out."""
    assert a.keys() == b.keys()
    return max((_relative_difference(a[k], b[k]), k) for k in b if "attn.key.bias" not in k)


def _relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-12))


def vit_model(cfg, num_classes: int, layers=None):
    """The config's ViT with MindSpore's stock layers (or the given seam layers), as built before any
    precision or backend choice."""
    from vit_dist.models.spec import ViTSpec
    from vit_dist.models.vit import ViTLayers, VisionTransformer

    return VisionTransformer(ViTSpec.of(cfg, num_classes), layers or ViTLayers())
