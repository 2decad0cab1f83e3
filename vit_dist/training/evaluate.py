"""Exact distributed top-1/top-5 and val loss: every val image counted once, whatever the world size."""
from __future__ import annotations

import numpy as np

from vit_dist.parallel.data_parallel import all_reduce_sum
from vit_dist.host.placement import Placement
from vit_dist.host.progress import Progress


def real_mask(batch_index: int, batch_size: int, count: int, placement: Placement, num_images: int) -> np.ndarray:
    """Which samples of a batch are real: ImageFolderDataset deals image i*world+rank to rank r as
    its i-th sample and pads the shard by wrapping around past the end of the dataset."""
    local = batch_index * batch_size + np.arange(count)
    return local * placement.world_size + placement.rank < num_images


def topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return (top == labels[:, None]).any(axis=1)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each sample's cross-entropy (no label smoothing) in float64: logsumexp minus the label's logit."""
    logits = logits.astype(np.float64)
    top = logits.max(axis=1)
    logsumexp = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
    return logsumexp - logits[np.arange(len(labels)), labels]


def evaluate(net, dataset, batch_size: int, placement: Placement, num_images: int,
             show_progress: bool = False) -> dict:
    """Runs the model over this rank's shard, masks the padding, sums the counts and losses over ranks:
    top1, top5 and val_loss (the mean cross-entropy) over exactly the real images. With show_progress,
    rank 0 shows its batches' progress on stderr."""
    import mindspore as ms

    net.set_train(False)
    counts = np.zeros(4)  # top-1 hits, top-5 hits, images, summed cross-entropy
    batches = dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)
    if show_progress and placement.is_main:
        batches = Progress(dataset.get_dataset_size(), "evaluating", "batches").iterate(batches)
    for batch_index, (images, labels) in enumerate(batches):
        count = len(labels)
        # A short last batch is padded to the compiled shape rather than compiling a second graph.
        padded = np.concatenate([images, np.zeros((batch_size - count, *images.shape[1:]), images.dtype)])
        logits = net(ms.Tensor(padded)).asnumpy()[:count].astype(np.float32)
        real = real_mask(batch_index, batch_size, count, placement, num_images)
        k = min(5, logits.shape[1])
        counts += [(topk_hits(logits, labels, 1) & real).sum(), (topk_hits(logits, labels, k) & real).sum(), real.sum(),
                   cross_entropy(logits, labels)[real].sum()]
    net.set_train(True)
    top1, top5, images, loss = all_reduce_sum(counts, placement)
    if int(images) != num_images:
        raise RuntimeError(f"evaluation saw {int(images)} of {num_images} images: the shard layout is not the one "
                           "real_mask assumes")
    return {"top1": float(top1) / float(images), "top5": float(top5) / float(images), "images": int(images),
            "val_loss": float(loss) / float(images)}


def evaluate_checkpoint(cfg, path, placement: Placement, scan, say, ema: bool = False) -> dict:
    """`vit-dist eval`: the checkpoint's model (ema: with its EMA weights, and "weights": "ema" in the
    result), built as training builds it, on every rank's val shard."""
    from vit_dist.data.pipeline import eval_dataset
    from vit_dist.training.assemble import model_from_checkpoint

    net = model_from_checkpoint(cfg, path, placement, say, cfg.model.num_classes or len(scan.classes), ema=ema)
    dataset = eval_dataset(cfg, scan.val, scan.classes, placement.rank, placement.world_size, cfg.train.eval_batch)
    result = evaluate(net, dataset, cfg.train.eval_batch, placement, scan.val.num_images, show_progress=True)
    return {**result, "weights": "ema"} if ema else result
