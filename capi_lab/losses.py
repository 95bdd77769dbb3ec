"""The two CAPI losses and the two halves of a training step as pure functions (capi-method.md §3-§4).

``teacher_step`` and ``student_step`` take modules and tensors and return tensors: no optimizer, no
Fabric, no state, so they can be ``torch.compile``d and unit-tested on toy inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from capi_lab.masking import MaskBatch
from capi_lab.model.capi import CAPIBackbone
from capi_lab.model.heads import ClusteringHead, StudentHead
from capi_lab.sinkhorn import teacher_targets


def soft_cross_entropy(
    logits: Float[Tensor, "*b k"], targets: Float[Tensor, "*b k"], temperature: float
) -> Float[Tensor, ""]:
    """``-sum(targets * log_softmax(logits / temperature))``, averaged over tokens."""
    k = logits.shape[-1]
    return F.cross_entropy((logits / temperature).reshape(-1, k).float(), targets.reshape(-1, k).float())


class TeacherOutput(NamedTuple):
    targets: Tensor
    """Sinkhorn-balanced soft assignments ``[b, n, K]`` of every patch (no gradient)."""
    clustering_loss: Tensor
    """Cross-entropy of the clustering head's softmax against ``targets`` (gradient into the head only)."""


def teacher_step(
    teacher: CAPIBackbone,
    clustering_head: ClusteringHead,
    images: Float[Tensor, "b 3 H W"],
    target_temp: float = 0.06,
    student_temp: float = 0.12,
    sinkhorn_iters: int = 3,
    positionwise: bool = True,
) -> TeacherOutput:
    """Teacher forward on the full images, clustering logits, Sinkhorn targets and clustering loss."""
    with torch.no_grad():
        feats = teacher.encode(images).tokens[:, teacher.num_registers :]  # (b, n, D), enc_norm applied
    logits = clustering_head(feats.detach())
    targets = teacher_targets(logits.detach(), target_temp, sinkhorn_iters, positionwise)
    return TeacherOutput(targets, soft_cross_entropy(logits, targets, student_temp))


def student_step(
    student: CAPIBackbone,
    head: StudentHead,
    images: Float[Tensor, "b 3 H W"],
    masks: MaskBatch,
    targets: Float[Tensor, "b n k"],
    student_temp: float = 0.12,
) -> Float[Tensor, ""]:
    """CAPI loss: the student sees the visible patches, the predictor scores the ``predict_indices``
    positions, and the head's logits are matched to the teacher's assignments there."""
    context = student.encode(images, masks.visible_indices)
    logits = head(student.predict(context, masks.predict_indices))  # (b, n_pred, K)
    t = targets.flatten(0, 1)[masks.predict_indices].view_as(logits)
    return soft_cross_entropy(logits, t.detach(), student_temp)
