"""What a `pip install` of vit-dist holds and needs: the shipped configs as package data, usable by
name from any folder; and every third-party module vit_dist imports declared in setup.cfg."""
from __future__ import annotations

import ast
import configparser
import dataclasses
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import PYTHON, ROOT, ok, run
from vit_dist.host.config import PrecisionConfig

CONFIGS = ROOT / "vit_dist" / "configs"
NAMES = {path.relative_to(CONFIGS).with_suffix("").as_posix(): path for path in sorted(CONFIGS.rglob("*.yaml"))}
UNKNOWN_DMEO = ("error: cannot read config dmeo: no such file, nor a shipped config of that name (did you mean "
                "'demo'?); pass a YAML file or a name from `vit-dist config list`")


def vit_dist_in(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """vit-dist run from `cwd`, away from the checkout: names must resolve to the package's files."""
    return run([PYTHON, "-m", "vit_dist", *args], cwd=cwd, timeout=timeout)


def test_the_shipped_configs_are_the_ones_the_docs_name():
    assert {"demo", "vit_s16_imagenet", "vit_b16_imagenet", "vit_l16_imagenet", "deit_ti16_imagenet",
            "bench/vit_32px", "bench/vit_ti16_224"} <= set(NAMES)
    assert (ROOT / "configs").resolve() == CONFIGS  # the checkout's configs/ is the package's, not a copy


def test_config_list_names_each_config_with_the_first_line_of_its_comment(tmp_path):
    lines = ok(vit_dist_in(tmp_path, "config", "list")).stdout.splitlines()
    listed = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in lines)
    assert list(listed) == list(NAMES)
    for name, path in NAMES.items():
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and listed[name] == first[2:], name  # every shipped config says what it is


def test_config_show_prints_the_file_and_with_set_the_resolved_config(tmp_path):
    assert ok(vit_dist_in(tmp_path, "config", "show", "demo")).stdout == NAMES["demo"].read_text()
    shown = yaml.safe_load(ok(vit_dist_in(tmp_path, "config", "show", "demo.yaml", "--set", "train.epochs=3")).stdout)
    demo = yaml.safe_load(NAMES["demo"].read_text())
    assert shown["train"]["epochs"] == 3 and shown["model"]["depth"] == demo["model"]["depth"]
    assert "precision" not in demo and shown["precision"] == dataclasses.asdict(PrecisionConfig())  # the defaults


def test_a_file_that_exists_wins_over_a_shipped_name_and_a_folder_does_not(tmp_path):
    (tmp_path / "demo").write_text("model:\n  depth: 2\n")
    assert ok(vit_dist_in(tmp_path, "config", "show", "demo")).stdout == "model:\n  depth: 2\n"
    (tmp_path / "bench").mkdir()
    (tmp_path / "vit_b16_imagenet").mkdir()  # a folder is no config: the shipped one of its name is meant
    shown = ok(vit_dist_in(tmp_path, "config", "show", "vit_b16_imagenet")).stdout
    assert shown == NAMES["vit_b16_imagenet"].read_text()
    other = vit_dist_in(tmp_path, "train", "bench")  # a folder that is no shipped name: what is wrong with it
    assert other.returncode == 2 and other.stderr.startswith("error: cannot read config bench: Is a directory")


def test_a_name_goes_where_a_path_goes(tmp_path):
    by_path = ok(vit_dist_in(tmp_path, "plan", str(NAMES["vit_b16_imagenet"]), "--world", "16", "--json")).stdout
    by_name = ok(vit_dist_in(tmp_path, "plan", "vit_b16_imagenet", "--world", "16", "--json")).stdout
    assert json.loads(by_name) == json.loads(by_path)
    info = json.loads(ok(vit_dist_in(tmp_path, "info", "bench/vit_32px", "--json")).stdout)
    assert info["params"] > 0


@pytest.mark.parametrize("command", [["train", "dmeo"], ["plan", "dmeo", "--world", "2"], ["config", "show", "dmeo"]])
def test_an_unknown_name_is_one_line_with_the_closest_name(tmp_path, command):
    result = vit_dist_in(tmp_path, *command)
    assert result.returncode == 2 and result.stderr.splitlines() == [UNKNOWN_DMEO]


def test_a_launcher_refuses_an_unknown_name_before_starting_anything(tmp_path):
    """(test_bench launches a shipped config by name on 2 ranks.)"""
    result = run(["bash", str(ROOT / "launch" / "msrun.sh"), "--ranks-per-node", "2", "dmeo"], cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.splitlines()[-1] == UNKNOWN_DMEO
    assert list(tmp_path.iterdir()) == []  # no run directory


def test_a_wheel_built_from_the_tree_holds_every_shipped_config(tmp_path):
    source = tmp_path / "src"  # a copy, so the build leaves no build/ or egg-info in the checkout
    shutil.copytree(ROOT / "vit_dist", source / "vit_dist", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    ok(run([PYTHON, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path / "wheel"), str(source)],
           timeout=600))
    [wheel] = (tmp_path / "wheel").glob("vit_dist-*.whl")
    members = set(zipfile.ZipFile(wheel).namelist())
    assert {f"vit_dist/configs/{name}.yaml" for name in NAMES} <= members
    assert "vit_dist/host/shipped_configs.py" in members


# --- declared dependencies -------------------------------------------------------------------

# Import names that differ from their distribution's name on PyPI.
DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn", "skimage": "scikit-image"}


def _requirement_names(text: str) -> set[str]:
    lines = (line.split("#")[0].strip() for line in text.splitlines())
    return {re.match(r"[A-Za-z0-9._-]+", line).group().lower() for line in lines if line}


def _declared() -> tuple[set[str], set[str]]:
    """(install_requires, every extra's requirements) of setup.cfg."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    extras = set().union(*map(_requirement_names, cfg["options.extras_require"].values()))
    return _requirement_names(cfg["options"]["install_requires"]), extras


def _is_stdlib(module: str) -> bool:
    if hasattr(sys, "stdlib_module_names"):  # Python 3.10+
        return module in sys.stdlib_module_names
    spec = importlib.util.find_spec(module)
    origin = (spec.origin or "") if spec else ""
    return origin in ("built-in", "frozen") or (origin.startswith(sysconfig.get_paths()["stdlib"])
                                                and "site-packages" not in origin)


def _third_party_imports() -> dict[str, dict[str, bool]]:
    """module -> {file: imported at module level} for every import of vit_dist that is not its own or stdlib."""
    found: dict[str, dict[str, bool]] = {}
    for path in sorted((ROOT / "vit_dist").rglob("*.py")):
        tree = ast.parse(path.read_text())
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in {name.split(".")[0] for name in modules} - {"vit_dist", "__future__"}:
                if not _is_stdlib(module):
                    where = found.setdefault(module, {})
                    rel = str(path.relative_to(ROOT))
                    where[rel] = where.get(rel, False) or id(node) in top_level
    return found


def test_every_third_party_import_is_declared():
    """An import at module level needs install_requires; one inside a function (a command's optional
    tool: plotting, the demo data, PyTorch files, mpirun) may come from an extra instead."""
    required, extras = _declared()
    imports = _third_party_imports()
    assert {"mindspore", "numpy", "yaml", "PIL", "safetensors"} <= set(imports)  # the walk sees them
    for module, files in imports.items():
        name = DISTRIBUTION.get(module, module).lower()
        eager = sorted(file for file, top in files.items() if top)
        assert name in required or not eager, f"{module} is imported at module level by {eager}: add {name} " \
                                              "to install_requires"
        assert name in required | extras, f"{module} (imported by {sorted(files)}) is in no requirement of setup.cfg"
