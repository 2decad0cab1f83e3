"""Top-k predictions for image files, without a dataset: the eval transform, the model, a softmax.

Class names come from a classes.json next to the checkpoint (import-weights writes one when the
source names its classes), else from the run that wrote it (RUN_DIR/checkpoints/x -> RUN_DIR);
without one, classes are their indices.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Optional

import numpy as np

from vit_dist.host.atomic import write_atomic
from vit_dist.host.config import Config
from vit_dist.host.datascan import is_image
from vit_dist.host.errors import ConfigError, DataError
from vit_dist.host.image_check import check_in_children, printable
from vit_dist.host.placement import Placement
from vit_dist.host.run_record import CLASSES_FILE, say


def find_images(path: str | Path) -> list[Path]:
    """The image itself, or every image under a folder (recursively, sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError(f"--images {printable(path)} does not exist; pass an image file or a folder of images")
    images = sorted(p for p in path.rglob("*") if p.is_file() and is_image(p))
    if not images:
        raise ConfigError(f"--images {printable(path)} holds no .jpg/.jpeg/.png/.bmp/.tif images")
    return images


def check_images(paths: list[Path]) -> None:
    """Refuses, in one line, the first image the decoder would fail on, before MindSpore's decoder
    sees it: that decoder can crash the process on a damaged JPEG, so PIL decodes each one first,
    in child processes."""
    for path, reason in zip(paths, check_in_children(paths)):
        if reason:
            raise DataError(f"cannot decode image {printable(path)}: {reason}; remove it or pass other --images")


def class_names(checkpoint: str | Path, num_classes: int) -> list[str]:
    return known_class_names(checkpoint, num_classes) or [str(i) for i in range(num_classes)]


def known_class_names(checkpoint: str | Path, num_classes: int) -> Optional[list[str]]:
    """The names in classes.json beside the checkpoint or in its run directory, if they are num_classes."""
    for folder in (Path(checkpoint).parent, Path(checkpoint).parent.parent):
        path = folder / CLASSES_FILE
        if path.is_file():
            names = json.loads(path.read_text())
            if isinstance(names, list) and len(names) == num_classes:
                return [str(n) for n in names]
    return None


def preprocess(paths: list[Path], cfg: Config) -> np.ndarray:
    """(N, 3, H, W) float32 through the eval transform training used (decode, resize, crop, normalise)."""
    import mindspore.dataset.transforms as transforms

    from vit_dist.data.pipeline import eval_transforms

    pipeline = transforms.Compose(eval_transforms(cfg.data))
    batch = []
    for path in paths:
        try:
            batch.append(pipeline(np.fromfile(path, np.uint8)))
        except RuntimeError:
            raise DataError(f"cannot decode image {printable(path)}; remove it or pass other --images") from None
    return np.stack(batch)


def predict(net, paths: list[Path], cfg: Config, batch_size: int, names: list[str], topk: int) -> list[dict]:
    """[{"image": path, "topk": [{"class", "index", "prob"}, ...]}, ...] in the order of paths."""
    import mindspore as ms

    net.set_train(False)
    k = min(topk, len(names))
    results = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        images = preprocess(chunk, cfg)
        # Padded to the compiled batch shape, as in evaluation, so one graph serves every batch.
        padded = np.concatenate([images, np.zeros((batch_size - len(chunk), *images.shape[1:]), images.dtype)])
        logits = net(ms.Tensor(padded)).asnumpy()[:len(chunk)].astype(np.float64)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        for path, row in zip(chunk, probs):
            top = np.argsort(-row, kind="stable")[:k]
            results.append({"image": printable(path),
                            "topk": [{"class": names[i], "index": int(i), "prob": float(row[i])} for i in top]})
    return results


def format_prediction(prediction: dict) -> str:
    return f"{prediction['image']}: " + ", ".join(f"{t['class']} {t['prob']:.3f}" for t in prediction["topk"])


def write_predictions(predictions: list[dict], out: str | Path) -> None:
    """JSON (a list of predictions) for .json, else CSV with one row per image and rank."""
    out = Path(out)
    if out.suffix == ".json":
        text = json.dumps(predictions, indent=1) + "\n"
    else:
        rows = io.StringIO(newline="")
        writer = csv.writer(rows)
        writer.writerow(["image", "rank", "class", "index", "prob"])
        for prediction in predictions:
            for rank, top in enumerate(prediction["topk"], 1):
                writer.writerow([prediction["image"], rank, top["class"], top["index"], f"{top['prob']:.6g}"])
        text = rows.getvalue()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, text)
    except OSError as err:
        raise ConfigError(f"cannot write --out {out}: {err.strerror}; choose a writable path") from None


def run_inference(cfg: Config, checkpoint_path: str | Path, images: str | Path, topk: int,
                  out: Optional[str | Path], ema: bool = False) -> list[dict]:
    """The top-k predictions of the checkpoint's model (ema: with its EMA weights) for the images,
    written to `out` if given."""
    from vit_dist.host.checkpoint_files import head_classes
    from vit_dist.training.assemble import model_from_checkpoint

    if topk < 1:
        raise ConfigError(f"--topk must be at least 1, got {topk}")
    paths = find_images(images)
    check_images(paths)
    num_classes = cfg.model.num_classes or head_classes(checkpoint_path)
    net = model_from_checkpoint(cfg, checkpoint_path, Placement.single(), lambda line: say(line, True),
                                num_classes, ema=ema)
    predictions = predict(net, paths, cfg, min(cfg.train.eval_batch, len(paths)),
                          class_names(checkpoint_path, num_classes), topk)
    if out:
        write_predictions(predictions, out)
    return predictions
