"""timm's RandAugment string (`rand-m9-mstd0.5-inc1`), parsed when the config loads, and what of it
MindSpore's `vision.RandAugment` honours. No MindSpore here: the launchers validate configs before it starts."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

from vit_dist.host.errors import ConfigError

# timm's magnitude scale (_LEVEL_DENOM): magnitude m is m/10 of each op's range.
LEVELS = 10
EXAMPLE = "rand-m9-mstd0.5-inc1"


@dataclass(frozen=True)
class RandAugmentSpec:
    """The parts of a timm RandAugment string; a part left out takes timm's default."""
    text: str
    num_ops: int = 2  # n: ops drawn (with replacement) per image
    magnitude: int = LEVELS  # m, of LEVELS
    prob: float = 0.5  # p: the chance that each drawn op is applied
    magnitude_std: float = 0.0  # mstd: timm's per-op normal noise on m (inf: uniform in [0, m])
    magnitude_max: Optional[int] = None  # mmax: timm's upper clip of the noisy magnitude
    increasing: bool = False  # inc: timm's op variants whose strength grows with m

    def not_honoured(self) -> list[str]:
        """The parts MindSpore's op cannot follow, each with what it does instead."""
        parts = []
        if math.isinf(self.magnitude_std):
            parts.append("mstd above 100 (timm's per-op magnitude uniform in [0, m]; every op uses m exactly)")
        elif self.magnitude_std > 0:
            parts.append(f"mstd{self.magnitude_std:g} (timm's per-op magnitude noise; every op uses m exactly)")
        if self.magnitude_max is not None:
            parts.append(f"mmax{self.magnitude_max} (magnitudes stay within each op's range)")
        if not self.increasing:
            parts.append("inc0 (timm's ops that weaken as m grows; MindSpore's all grow with m, like inc1)")
        return parts


def parse_rand_augment(text: str) -> RandAugmentSpec:
    """Reads timm's form: `rand` then dash-separated parts m<int>, n<int>, p<float>, mstd<float>,
    mmax<int>, inc<0|1>, in any order. timm's op-set part (t...) and values MindSpore's op cannot take
    are refused."""
    sections = text.split("-")
    if sections[0] != "rand":
        raise _bad(text, "it must start with 'rand'")
    values: dict = {}
    for section in sections[1:]:
        letters, name, value = _split(text, section)
        if name in values:
            raise _bad(text, f"'{letters}' is given twice")
        values[name] = value
    spec = RandAugmentSpec(text, **values)
    if not 0 <= spec.magnitude <= LEVELS:
        raise _bad(text, f"m must be an integer in [0, {LEVELS}] (MindSpore's op cannot exceed an op's range)")
    if spec.num_ops < 1:
        raise _bad(text, "n must be at least 1 (for no RandAugment leave data.rand_augment null)")
    if not 0.0 <= spec.prob <= 1.0:
        raise _bad(text, "p must be in [0, 1]")
    if spec.magnitude_std < 0:
        raise _bad(text, "mstd must be >= 0")
    return spec


# The numeric parts: timm's letters, then (after the first digit) the value, as int or float.
_PARTS = {"mstd": ("magnitude_std", float), "mmax": ("magnitude_max", int), "inc": ("increasing", int),
          "m": ("magnitude", int), "n": ("num_ops", int), "p": ("prob", float)}


def _split(text: str, section: str) -> tuple[str, str, object]:
    """A section as (its letters, the spec's field, the value)."""
    if section.startswith("t"):
        raise _bad(text, f"'{section}': timm's op sets cannot be chosen (MindSpore's op has its own)")
    found = re.fullmatch(r"([a-z]+)(\d.*)", section)
    if not found or found.group(1) not in _PARTS:
        raise _bad(text, f"'{section}' is not one of m<int>, n<int>, p<float>, mstd<float>, mmax<int>, inc<0|1>")
    letters, raw = found.groups()
    name, kind = _PARTS[letters]
    try:
        value = kind(raw)
    except ValueError:
        raise _bad(text, f"'{section}': {letters} takes {'an integer' if kind is int else 'a number'}") from None
    if name == "increasing":
        if value not in (0, 1):
            raise _bad(text, "inc takes 0 or 1")
        return letters, name, bool(value)
    if name == "magnitude_std":  # timm: above 100 means uniform sampling in [0, m]
        return letters, name, math.inf if value > 100 else value
    return letters, name, value


def _bad(text: str, why: str) -> ConfigError:
    return ConfigError(f"data.rand_augment {text!r}: {why}; use timm's form, e.g. {EXAMPLE}")


def start_note(spec: RandAugmentSpec, color_jitter: float) -> str:
    """The one line a run says when it starts with RandAugment on: what MindSpore's op honours and what not."""
    honoured = f"n={spec.num_ops} ops at magnitude m={spec.magnitude}/{LEVELS}, each applied with probability {spec.prob:g}"
    missing = spec.not_honoured() + ["timm's op set (MindSpore's is torchvision's)"]
    jitter = f"; data.color_jitter {color_jitter:g} is off with it, as in timm" if color_jitter > 0 else ""
    return (f"data.rand_augment {spec.text}: MindSpore's RandAugment honours {honoured}; not honoured: "
            f"{'; '.join(missing)}{jitter} (docs/configuration.md)")
