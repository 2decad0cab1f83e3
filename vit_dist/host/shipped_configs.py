"""The configs shipped inside the package (vit_dist/configs), found by name: `vit-dist train demo`
works from any folder of an installed vit-dist, not only from a checkout.

A config's name is its path under vit_dist/configs without `.yaml` (`demo`, `bench/vit_32px`); its
description is the first line of its leading comment. No MindSpore here: the launchers' pre-flight
resolves names too.
"""
from __future__ import annotations

from pathlib import Path

from vit_dist.host.errors import ConfigError, did_you_mean

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SUFFIX = ".yaml"


def shipped() -> dict[str, Path]:
    """Every shipped config, name -> file, sorted by name."""
    files = sorted(CONFIG_DIR.rglob(f"*{SUFFIX}"))
    return {path.relative_to(CONFIG_DIR).with_suffix("").as_posix(): path for path in files}


def describe(path: Path) -> str:
    """The first line of the file's leading comment ('' if it starts with no comment)."""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            return ""
        if line.strip("# "):
            return line.lstrip("#").strip()
    return ""


def config_path(given: str | Path) -> Path:
    """The config file `given` names: a file that exists wins; otherwise the shipped config of that
    name (`demo` or `demo.yaml`), even beside a folder of that name (data/ folders are often called
    so); otherwise `given` if it exists (load_config says what is wrong with it); otherwise a
    ConfigError naming the closest shipped name."""
    path = Path(given)
    if path.is_file():
        return path
    name = str(given)[:-len(SUFFIX)] if str(given).endswith(SUFFIX) else str(given)
    configs = shipped()
    if name in configs:
        return configs[name]
    if path.exists():
        return path
    hint = did_you_mean(name, configs) or did_you_mean(Path(name).name, configs)
    raise ConfigError(f"cannot read config {given}: no such file, nor a shipped config of that name{hint}; "
                      "pass a YAML file or a name from `vit-dist config list`")
