"""The training loss, chosen in one place: label-smoothed cross entropy on int labels, or with mixup
(data.mixes) soft-target cross entropy on the pipeline's soft targets, which carry the smoothing."""
from __future__ import annotations

from mindspore import nn, ops


class SoftTargetCrossEntropy(nn.Cell):
    """timm's SoftTargetCrossEntropy: sum over classes of -target * log_softmax(logits), mean over the batch."""

    def construct(self, logits, targets):
        return ops.sum(-targets * ops.log_softmax(logits, -1), -1).mean()


def train_loss(label_smoothing: float, soft_targets: bool) -> nn.Cell:
    """loss(logits, labels): labels int [batch] with label_smoothing, or soft targets float [batch, classes]."""
    if soft_targets:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
