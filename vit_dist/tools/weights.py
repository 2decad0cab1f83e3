"""Pretrained ViT weights from timm, Hugging Face or MindCV, renamed to this project's parameters.

Each source's state dict is mapped name by name onto ours (timm's and MindCV's fused qkv split into
query/key/value), the position embedding is resampled when the image size changes, the head is
kept, re-initialised or dropped, and the architecture read from the weights (and the source's
config.json, where there is one) becomes the model section of a config. Files are read without
pickle: safetensors through numpy, PyTorch .bin/.pt only through torch.load(weights_only=True),
MindCV .ckpt through mindspore.load_checkpoint (protobuf).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from vit_dist.host.atomic import write_atomic
from vit_dist.host.errors import CheckpointError
from vit_dist.host.weights_only import safetensors_bytes
from vit_dist.models.spec import VIT_VARIANTS, standard_heads
from vit_dist.tools import source_preprocessing
from vit_dist.tools.source_preprocessing import Preprocessing

SOURCES = ("timm", "hf", "mindcv")
# Keys of ViT variants whose computation this project's model does not have: importing them
# without those parts would give a different network, so it is refused.
UNSUPPORTED = re.compile(r"(^|\.)(fc_norm|reg_token|dist_token|head_dist|ls1|ls2|q_norm|k_norm|norm_pre|attn_pool|"
                         r"q_bias|v_bias|lambda_1|lambda_2|pre_logits)\b|^head\.classifier\.0\.")
# Entries that are not parameters of the network: optimizer state and counters in training
# checkpoints, Hugging Face's ViTModel pooler (ViTForImageClassification does not use it) and mask token.
IGNORED = re.compile(r"^(pooler\.|embeddings\.mask_token|moments\.|adam_[mv]\.|accum\.|global_step|learning_rate|"
                     r"momentum|scale_sense|beta[12]_power|current_iterator_step|last_overflow_iterator_step|"
                     r"epoch_num|step_num)")
# (pattern, our name): a pattern matches a whole name or a prefix ending before a ".", whose rest
# (".weight", ".bias", ...) is kept.
HF_NAMES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection", "patch_embed.proj"),
    (r"encoder\.layer\.(\d+)\.layernorm_before", r"blocks.\1.norm1"),
    (r"encoder\.layer\.(\d+)\.layernorm_after", r"blocks.\1.norm2"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)", r"blocks.\1.attn.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense", r"blocks.\1.attn.out"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense", r"blocks.\1.mlp.fc1"),
    (r"encoder\.layer\.(\d+)\.output\.dense", r"blocks.\1.mlp.fc2"),
    (r"layernorm", "norm"),
    (r"classifier", "head"),
    # transformers 5's module names (its state_dict(); save_pretrained writes the names above)
    (r"layers\.(\d+)\.layernorm_before", r"blocks.\1.norm1"),
    (r"layers\.(\d+)\.layernorm_after", r"blocks.\1.norm2"),
    (r"layers\.(\d+)\.attention\.q_proj", r"blocks.\1.attn.query"),
    (r"layers\.(\d+)\.attention\.k_proj", r"blocks.\1.attn.key"),
    (r"layers\.(\d+)\.attention\.v_proj", r"blocks.\1.attn.value"),
    (r"layers\.(\d+)\.attention\.o_proj", r"blocks.\1.attn.out"),
    (r"layers\.(\d+)\.mlp\.(fc1|fc2)", r"blocks.\1.mlp.\2"),
]
TIMM_NAMES = [
    (r"(cls_token|pos_embed|patch_embed\.proj|norm|head)", r"\1"),
    (r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv)", r"blocks.\1.\2"),
    (r"blocks\.(\d+)\.attn\.proj", r"blocks.\1.attn.out"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)", r"blocks.\1.mlp.\2"),
]
# MindCV's ViT (mindcv/models/vit.py): a BaseClassifier of backbone ViT and DenseHead.
MINDCV_NAMES = [
    (r"(cls|cls_token)", "cls_token"),
    (r"(pos_embedding|pos_embed)", "pos_embed"),
    (r"patch_embedding\.conv", "patch_embed.proj"),
    (r"transformer\.layers\.(\d+)\.0\.cell\.0", r"blocks.\1.norm1"),
    (r"transformer\.layers\.(\d+)\.0\.cell\.1\.qkv", r"blocks.\1.attn.qkv"),
    (r"transformer\.layers\.(\d+)\.0\.cell\.1\.out", r"blocks.\1.attn.out"),
    (r"transformer\.layers\.(\d+)\.1\.cell\.0", r"blocks.\1.norm2"),
    (r"transformer\.layers\.(\d+)\.1\.cell\.1\.dense1", r"blocks.\1.mlp.fc1"),
    (r"transformer\.layers\.(\d+)\.1\.cell\.1\.dense2", r"blocks.\1.mlp.fc2"),
    (r"norm", "norm"),
    (r"head\.classifier", "head"),
]
# LayerNorm parameters are gamma/beta in MindSpore, weight/bias in PyTorch.
NORM_NAMES = {"weight": "gamma", "bias": "beta"}
NORM_PARAM = re.compile(r"^(blocks\.\d+\.norm[12]|norm)\.(weight|bias)$")
OUR_NORM_PARAM = re.compile(r"^(blocks\.\d+\.norm[12]|norm)\.(gamma|beta)$")


@dataclass
class Imported:
    """The converted parameters and the architecture they imply."""
    params: dict[str, np.ndarray]
    num_heads: int
    image_size: int
    layer_norm_eps: float
    gelu_approximate: bool = False
    preprocessing: Optional[Preprocessing] = None  # the source's eval protocol; None: it does not say
    classes: Optional[list[str]] = None
    notes: list[str] = field(default_factory=list)

    @property
    def embed_dim(self) -> int:
        return int(self.params["cls_token"].shape[-1])

    @property
    def patch_size(self) -> int:
        return int(self.params["patch_embed.proj.weight"].shape[-1])

    @property
    def depth(self) -> int:
        return len({name.split(".")[1] for name in self.params if name.startswith("blocks.")})

    @property
    def mlp_dim(self) -> int:
        return int(self.params["blocks.0.mlp.fc1.weight"].shape[0])

    @property
    def num_classes(self) -> Optional[int]:
        head = self.params.get("head.weight")
        return None if head is None else int(head.shape[0])


def import_weights(src: str | Path, source: str, num_heads: Optional[int] = None, image_size: Optional[int] = None,
                   num_classes: Optional[int] = None, drop_head: bool = False, seed: int = 0) -> Imported:
    """Reads SRC, converts it, then adapts it to image_size and num_classes (None: the source's)."""
    if source not in SOURCES:
        raise CheckpointError(f"--from {source!r} is not supported; use one of {', '.join(SOURCES)}")
    src = Path(src)
    if not src.exists():
        raise CheckpointError(f"{src} does not exist; pass a weights file (or a Hugging Face model folder)")
    reader = {"hf": _from_hf, "timm": _from_timm, "mindcv": _from_mindcv}[source]
    imported = reader(src, num_heads)
    _check_complete(imported.params, src)
    if image_size is not None and image_size != imported.image_size:
        resize_position_embedding(imported, image_size)
    if drop_head:
        imported.params.pop("head.weight", None)
        imported.params.pop("head.bias", None)
        imported.classes = None
        imported.notes.append("head dropped: fine-tuning initialises a new one for the class folders")
    elif num_classes is not None and num_classes != imported.num_classes:
        _new_head(imported, num_classes, seed)
    return imported


def _from_hf(src: Path, num_heads: Optional[int]) -> Imported:
    folder = src if src.is_dir() else src.parent
    if src.is_dir():
        candidates = [src / "model.safetensors", src / "pytorch_model.bin"]
        src = next((c for c in candidates if c.is_file()), None)
        if src is None:
            raise CheckpointError(f"{folder} holds neither model.safetensors nor pytorch_model.bin; pass the "
                                  "folder save_pretrained wrote, or the weights file")
    config = _read_json(folder / "config.json")
    if config is None:
        raise CheckpointError(f"{folder} has no config.json (heads, LayerNorm epsilon, activation); import a folder "
                              "written by save_pretrained, or put its config.json next to the weights")
    if config.get("model_type", "vit") != "vit":
        raise CheckpointError(f"{folder}/config.json is a {config['model_type']!r} model, not a Hugging Face ViT")
    act = config.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{folder}/config.json: hidden_act {act!r} is not GELU, which this project's ViT uses")
    state = _strip_prefix(_read_state(src), "vit.")
    params = _rename(state, HF_NAMES, src)
    if not config.get("qkv_bias", True):
        _zero_qkv_bias(params)
    processor_file = folder / "preprocessor_config.json"
    preprocessing, notes = source_preprocessing.from_hf(_read_json(processor_file), str(processor_file))
    labels = config.get("id2label") or {}
    names = [labels[str(i)] for i in range(len(labels))] if all(str(i) in labels for i in range(len(labels))) else []
    return Imported(params, num_heads or int(config["num_attention_heads"]), _grid_image_size(params),
                    float(config.get("layer_norm_eps", 1e-12)), act != "gelu", preprocessing,
                    None if all(n == f"LABEL_{i}" for i, n in enumerate(names)) else names, notes)


def _from_timm(src: Path, num_heads: Optional[int]) -> Imported:
    state = _strip_prefix(_read_state(src), "model.")
    params = _split_qkv(_rename(state, TIMM_NAMES, src))
    config = _read_json(src.parent / "config.json") or {}
    imported = Imported(params, 0, _grid_image_size(params), 1e-6, False, classes=config.get("label_names"))
    imported.preprocessing = _timm_preprocessing(config, src.parent / "config.json", imported.notes)
    imported.num_heads = (num_heads or (config.get("model_args") or {}).get("num_heads")
                          or _heads_from_name(config.get("architecture", "")) or _standard_heads(imported))
    return imported


def _timm_preprocessing(config: dict, where: Path, notes: list[str]) -> Optional[Preprocessing]:
    """The pretrained_cfg timm's hub files carry in config.json, else timm's own for the model name
    config.json gives (when timm is installed), else unknown (said in a note)."""
    pretrained, origin = config.get("pretrained_cfg"), str(where)
    architecture = config.get("architecture")
    if not isinstance(pretrained, dict) and isinstance(architecture, str):
        pretrained = source_preprocessing.from_timm_name(architecture)
        origin = f"timm's pretrained_cfg of {architecture}"
    if not isinstance(pretrained, dict):
        notes.append(f"the source's preprocessing is unknown: {where} gives no pretrained_cfg"
                     + (f" and timm (if installed) does not know {architecture!r}" if architecture else "")
                     + "; --config-out keeps data.interpolation, eval_crop_fraction, mean and std as they are")
        return None
    preprocessing, more = source_preprocessing.from_timm(pretrained, origin)
    notes.extend(more)
    return preprocessing


def _from_mindcv(src: Path, num_heads: Optional[int]) -> Imported:
    import mindspore as ms

    try:
        raw = ms.load_checkpoint(str(src))
    except Exception as err:  # MindSpore raises bare ValueError/RuntimeError for unreadable files
        raise CheckpointError(f"cannot read MindCV checkpoint {src}: {' '.join(str(err).split())[:200]}") from None
    state = _strip_prefix({name: value.asnumpy() for name, value in raw.items()}, "backbone.")
    legacy = any(name.startswith("transformer.layers.") for name in state)
    params = _split_qkv(_rename(state, MINDCV_NAMES if legacy else TIMM_NAMES, src))
    imported = Imported(params, 0, _grid_image_size(params),
                        # The legacy ViT uses nn.LayerNorm's epsilon (1e-7) and nn.GELU's default (tanh).
                        1e-7 if legacy else 1e-6, legacy, source_preprocessing.MINDCV)
    imported.num_heads = num_heads or _standard_heads(imported)
    return imported


def _read_state(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own SafetensorError, or TypeError for bfloat16
            raise CheckpointError(f"cannot read {path}: {err}") from None
    if path.suffix in (".bin", ".pt", ".pth"):
        return _read_torch(path)
    raise CheckpointError(f"{path}: unknown weights format; expected .safetensors, or a PyTorch .bin/.pt/.pth state dict")


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"reading {path} needs PyTorch (pip install torch), or convert it to .safetensors "
                              "first") from None
    if _release(torch.__version__) < (2, 6):
        raise CheckpointError(f"reading {path} needs torch >= 2.6, whose torch.load(weights_only=True) cannot be "
                              f"made to run code (this is {torch.__version__}); upgrade torch, or convert the file "
                              "to .safetensors first")
    try:
        # weights_only: tensors and containers only, never arbitrary pickled objects.
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read {path} as a weights-only PyTorch state dict: "
                              f"{' '.join(str(err).split())[:200]}") from None
    for key in ("state_dict", "model"):  # training checkpoints wrap the state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return {name: value.detach().float().numpy() for name, value in state.items() if torch.is_tensor(value)}


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as '2.13.0+cpu'."""
    major, minor = (re.match(r"(\d+)\.(\d+)", version) or re.match(r"(\d+)()", version)).groups()
    return int(major), int(minor or 0)


def _read_json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None


def _strip_prefix(state: dict, prefix: str) -> dict:
    return {name[len(prefix):] if name.startswith(prefix) else name: value for name, value in state.items()}


def _rename(state: dict[str, np.ndarray], table: list[tuple[str, str]], src: Path) -> dict[str, np.ndarray]:
    """Source names -> ours by the first matching pattern; a variant's extra parts are refused."""
    params = {}
    for name, value in state.items():
        if UNSUPPORTED.search(name):
            raise CheckpointError(f"{src} has {name!r}: a ViT variant (layer scale, register or distillation tokens, "
                                  "pooled head, ...) that this project's model does not compute")
        for pattern, target in table:
            match = re.match(pattern + r"(?=\.|$)", name)
            if match:
                ours = match.expand(target) + name[match.end():]
                params[NORM_PARAM.sub(lambda m: f"{m[1]}.{NORM_NAMES[m[2]]}", ours)] = \
                    np.asarray(value, np.float32)
                break
        else:
            if not IGNORED.match(name):
                raise CheckpointError(f"{src}: unexpected tensor {name!r}; is this a plain ViT classifier "
                                      "checkpoint of the --from library?")
    return params


def _split_qkv(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A fused qkv projection's rows are [query; key; value] (timm, MindCV)."""
    out = {}
    for name, value in params.items():
        match = re.match(r"(blocks\.\d+\.attn)\.qkv\.(weight|bias)$", name)
        if match:
            for part, chunk in zip(("query", "key", "value"), np.split(value, 3, axis=0)):
                out[f"{match[1]}.{part}.{match[2]}"] = np.ascontiguousarray(chunk)
        else:
            out[name] = value
    if any(name.endswith("attn.query.weight") for name in out) and not any(n.endswith("attn.query.bias") for n in out):
        _zero_qkv_bias(out)
    return out


def to_source(params: dict[str, np.ndarray], table: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    """Our names -> a source's: the inverse of _rename by the same table (its first entry that can
    produce a name wins, as on import), LayerNorm gamma/beta back to weight/bias. Fused qkv and a
    model prefix are the caller's."""
    torch_names = {v: k for k, v in NORM_NAMES.items()}
    inverse = [entry for entry in map(_inverse_entry, table) if entry is not None]
    out = {}
    for name, value in params.items():
        name = OUR_NORM_PARAM.sub(lambda m: f"{m[1]}.{torch_names[m[2]]}", name)
        for ours, theirs in inverse:
            match = re.match(ours + r"(?=\.|$)", name)
            if match:
                out[match.expand(theirs) + name[match.end():]] = value
                break
        else:
            raise CheckpointError(f"no source name for {name!r}")  # every parameter of the model has one
    return out


def _inverse_entry(entry: tuple[str, str]) -> Optional[tuple[str, str]]:
    """(pattern, target) of an import table as (a pattern of our names, a template of the source's):
    the pattern's groups move into the target where it refers to them, the literal parts swap sides.
    None for an entry whose source name the target does not determine (an alternative outside a group)."""
    pattern, target = entry
    groups = re.findall(r"\(([^()]*)\)", pattern)
    if set(re.findall(r"\\(\d)", target)) != {str(i) for i in range(1, len(groups) + 1)}:
        return None
    ours = "".join(f"({groups[int(part[1:]) - 1]})" if re.fullmatch(r"\\\d", part) else re.escape(part)
                   for part in re.split(r"(\\\d)", target) if part)
    theirs = pattern
    for index, group in enumerate(groups, 1):
        theirs = theirs.replace(f"({group})", f"\\{index}", 1)
    if re.search(r"[|()\[\]*+?]", theirs.replace("\\.", "")):
        return None
    # Our pattern's groups are numbered by their place in the target; the source's template by the
    # pattern's: renumber the template to the target's order.
    order = [int(ref) for ref in re.findall(r"\\(\d)", target)]
    theirs = re.sub(r"\\(\d)", lambda m: f"\\{order.index(int(m[1])) + 1}", theirs)
    return ours, theirs.replace("\\.", ".")


def fuse_qkv(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of _split_qkv: each block's query, key and value rows stacked into one qkv."""
    out = {}
    for name, value in params.items():
        match = re.match(r"(blocks\.\d+\.attn)\.query\.(weight|bias)$", name)
        if match:
            parts = [params[f"{match[1]}.{part}.{match[2]}"] for part in ("query", "key", "value")]
            out[f"{match[1]}.qkv.{match[2]}"] = np.concatenate(parts, axis=0)
        elif not re.match(r"blocks\.\d+\.attn\.(key|value)\.", name):
            out[name] = value
    return out


def _zero_qkv_bias(params: dict[str, np.ndarray]) -> None:
    """A source without q/k/v biases equals ours with zero biases."""
    for name in [n for n in params if re.search(r"attn\.(query|key|value)\.weight$", n)]:
        params.setdefault(name[:-len("weight")] + "bias", np.zeros(params[name].shape[0], np.float32))


def _check_complete(params: dict[str, np.ndarray], src: Path) -> None:
    required = ["cls_token", "pos_embed", "patch_embed.proj.weight", "norm.gamma", "blocks.0.mlp.fc1.weight"]
    missing = [name for name in required if name not in params]
    if missing:
        raise CheckpointError(f"{src} lacks {missing} after conversion: not a ViT with a class token of the "
                              "--from library (check --from)")


def _grid_image_size(params: dict[str, np.ndarray]) -> int:
    tokens = params["pos_embed"].shape[1] - 1
    grid = int(round(tokens ** 0.5))
    if grid * grid != tokens:
        raise CheckpointError(f"position embedding of {tokens + 1} tokens is not a class token plus a square grid")
    return grid * int(params["patch_embed.proj.weight"].shape[-1])


def _heads_from_name(architecture: str) -> Optional[int]:
    """timm names: vit_{tiny,small,base,large,huge}_patch16_224..."""
    sizes = {"tiny": 3, "small": 6, "base": 12, "large": 16, "huge": 16}
    match = re.match(r"vit_(tiny|small|base|large|huge)_", architecture)
    return sizes[match[1]] if match else None


def _standard_heads(imported: Imported) -> int:
    heads = standard_heads(imported.embed_dim)
    if heads is None:
        raise CheckpointError(f"width {imported.embed_dim} is not a standard ViT size and the file does not record "
                              "the number of heads; pass --num-heads")
    imported.notes.append(f"{heads} heads assumed for width {imported.embed_dim} (the standard ViT's; "
                          "--num-heads overrides)")
    return heads


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) weights of PyTorch's bicubic resize (align_corners=False, A=-0.75,
    border samples repeated), so that resampling agrees with timm's and Hugging Face's."""
    a = -0.75

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    matrix = np.zeros((size_out, size_in))
    for i in range(size_out):
        real = (i + 0.5) * size_in / size_out - 0.5
        base = int(np.floor(real))
        t = real - base
        for offset, weight in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
            matrix[i, min(max(base + offset, 0), size_in - 1)] += weight
    return matrix


def resize_position_embedding(imported: Imported, image_size: int) -> None:
    """Bicubic resampling of the patch grid's embeddings; the class token's is kept."""
    patch = imported.patch_size
    if image_size % patch:
        raise CheckpointError(f"--image-size {image_size} is not a multiple of the patch size {patch}")
    pos = imported.params["pos_embed"]
    old, new = imported.image_size // patch, image_size // patch
    grid = pos[0, 1:].reshape(old, old, -1).astype(np.float64)
    resize = bicubic_matrix(old, new)
    resized = np.einsum("ij,jkd,lk->ild", resize, grid, resize).reshape(1, new * new, -1)
    imported.params["pos_embed"] = np.concatenate([pos[:, :1], resized.astype(np.float32)], axis=1)
    imported.notes.append(f"position embedding resampled from a {old}x{old} to a {new}x{new} patch grid (bicubic)")
    imported.image_size = image_size


def _new_head(imported: Imported, num_classes: int, seed: int) -> None:
    """A fresh head as the model initialises one: truncated normal (std 0.02, cut at 2 std), zero bias."""
    if num_classes < 2:
        raise CheckpointError(f"--num-classes must be at least 2, got {num_classes}")
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((num_classes, imported.embed_dim))
    while (outside := np.abs(weight) > 2).any():
        weight[outside] = rng.standard_normal(outside.sum())
    imported.params["head.weight"] = (0.02 * weight).astype(np.float32)
    imported.params["head.bias"] = np.zeros(num_classes, np.float32)
    imported.classes = None
    imported.notes.append(f"head re-initialised for {num_classes} classes")


def save_imported(imported: Imported, out: str | Path, source: str) -> Path:
    """Writes the parameters as safetensors (what checkpoint.load_weights and model.pretrained read),
    via a temporary file and a rename (host.weights_only.safetensors_bytes: a full disk raises)."""
    out = Path(out)
    data = safetensors_bytes(imported.params, {"format": "pt", "converted_from": source})
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, data, durable=True)
    except OSError as err:
        raise CheckpointError(f"cannot write {out}: {err.strerror}; choose a writable path") from None
    return out


def apply_to_config(cfg, imported: Imported, weights: Path) -> None:
    """The model section, image size and eval preprocessing that reproduce the source, fine-tuning from weights."""
    m = cfg.model
    widths = (imported.embed_dim, imported.depth, imported.num_heads)
    m.variant = next((name for name, w in VIT_VARIANTS.items() if w == widths), m.variant)
    m.patch_size, m.embed_dim, m.depth, m.num_heads = imported.patch_size, *widths
    m.mlp_dim, m.num_classes = imported.mlp_dim, imported.num_classes
    m.layer_norm_eps, m.gelu_approximate = imported.layer_norm_eps, imported.gelu_approximate
    m.pretrained = str(weights.resolve())
    cfg.data.image_size = imported.image_size
    if imported.preprocessing is not None:
        imported.preprocessing.apply(cfg.data)


def describe(imported: Imported) -> str:
    heads = "no head" if imported.num_classes is None else f"{imported.num_classes} classes"
    return (f"ViT/{imported.patch_size} at {imported.image_size}px: dim {imported.embed_dim}, depth {imported.depth}, "
            f"heads {imported.num_heads}, mlp {imported.mlp_dim}, {heads}, LayerNorm eps {imported.layer_norm_eps:g}"
            + (", tanh GELU" if imported.gelu_approximate else ""))


def report(imported: Imported, say: Callable[[str], None]) -> None:
    for note in imported.notes:
        say(f"note: {note}")
