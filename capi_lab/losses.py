"""The two CAPI losses and the two halves of a training step as pure functions (capi-method.md §3-§4).

``teacher_step`` and ``student_step`` take modules and tensors and return tensors: no optimizer, no
Fabric, no state, so they can be ``torch.compile``d and unit-tested on toy inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from capi_lab.kernels import fused_clustering
from capi_lab.masking import MaskBatch
from capi_lab.model.capi import CAPIBackbone
from capi_lab.model.heads import ClusteringHead, StudentHead
from capi_lab.sinkhorn import check_impl, default_impl, row_chunks, teacher_targets


def soft_cross_entropy(
    logits: Float[Tensor, "*b k"], targets: Float[Tensor, "*b k"], temperature: float
) -> Float[Tensor, ""]:
    """``-sum(targets * log_softmax(logits / temperature))``, averaged over tokens."""
    k = logits.shape[-1]
    return F.cross_entropy((logits / temperature).reshape(-1, k).float(), targets.reshape(-1, k).float())


class TeacherOutput(NamedTuple):
    targets: Tensor
    """Sinkhorn-balanced soft assignments (no gradient): ``[b, n_pred, K]`` at the predicted positions, or
    ``[b, n, K]`` for every patch when no indices were given."""
    clustering_loss: Tensor
    """Cross-entropy of the clustering head's softmax against the assignments of every patch (gradient
    into the head only)."""
    assignments: Tensor
    """``[b, n]`` argmax prototype of every patch (for prototype-usage statistics)."""
    target_entropy: Tensor
    """Mean entropy of the assignments (a health signal; about 0.5 is healthy at K = 16384)."""


def teacher_step(
    teacher: CAPIBackbone,
    clustering_head: ClusteringHead,
    images: Float[Tensor, "b 3 H W"],
    predict_indices: Int[Tensor, " n_pred_total"] | None = None,
    target_temp: float = 0.06,
    student_temp: float = 0.12,
    sinkhorn_iters: int = 3,
    positionwise: bool = True,
    impl: str | None = None,
) -> TeacherOutput:
    """Teacher forward on the full images, clustering logits, Sinkhorn targets and clustering loss.

    Everything derived from the ``[b, n, K]`` assignments is reduced here (loss, entropy, argmax, rows at
    ``predict_indices``), so a compiled step never has to write the full assignment tensor out. ``impl`` is the
    Sinkhorn implementation (:data:`capi_lab.sinkhorn.IMPLS`; default :func:`capi_lab.sinkhorn.default_impl`):
    with ``fused`` it is done by Triton kernels that read the logits once per Sinkhorn half-iteration.
    """
    with torch.no_grad():
        feats = teacher.encode(images).tokens[:, teacher.num_registers :]  # (b, n, D), enc_norm applied
    logits = clustering_head(feats.detach())  # (b, n, K)
    return clustering_outputs(logits, predict_indices, target_temp, student_temp, sinkhorn_iters, positionwise, impl)


def clustering_outputs(
    logits: Float[Tensor, "b n k"],
    predict_indices: Int[Tensor, " n_pred_total"] | None = None,
    target_temp: float = 0.06,
    student_temp: float = 0.12,
    sinkhorn_iters: int = 3,
    positionwise: bool = True,
    impl: str | None = None,
) -> TeacherOutput:
    """Everything :func:`teacher_step` takes from the clustering logits: Sinkhorn targets (rows at
    ``predict_indices``), clustering loss (gradient into ``logits`` only), argmax and entropy. ``impl``: as in
    :func:`teacher_step`; ``eager`` and ``potentials`` pair the targets with the clustering loss written for
    that setting (a custom autograd function in blocks, or the plain form a compiler fuses)."""
    impl = check_impl(impl or default_impl(logits.device, torch.compiler.is_compiling()))
    if impl == "fused" and sinkhorn_iters == 0:  # unbalanced softmax targets: not what the kernels are for
        impl = "potentials" if torch.compiler.is_compiling() else "eager"
    if impl == "fused":
        return TeacherOutput(
            *fused_clustering.teacher_outputs(
                logits, predict_indices, target_temp, student_temp, sinkhorn_iters, positionwise
            )
        )
    compiled = impl == "potentials"
    with torch.no_grad():
        q = teacher_targets(logits.detach(), target_temp, sinkhorn_iters, positionwise, impl)
        if compiled:
            entropy = -torch.special.xlogy(q, q).sum(-1).mean()
        else:  # in blocks: no temporary the size of the logits (see capi_lab.sinkhorn)
            entropy = -sum(torch.special.xlogy(c, c).sum() for c in row_chunks(q)) / (q.numel() // q.shape[-1])
        assignments = q.argmax(-1)
        targets = q if predict_indices is None else q.flatten(0, 1)[predict_indices].view(q.shape[0], -1, q.shape[-1])
    if compiled:
        clustering_loss = -(q * F.log_softmax(logits.float() / student_temp, dim=-1)).sum(-1).mean()
    else:
        clustering_loss = _EagerClusteringLoss.apply(logits, q, student_temp)
    return TeacherOutput(targets, clustering_loss, assignments, entropy)


class _EagerClusteringLoss(torch.autograd.Function):
    """The clustering loss ``-mean_tokens sum_k q_k log softmax(x / t)_k`` for eager steps, written as
    ``mean(sum_k(q) * logsumexp(x / t)) - sum(q * x) / (t * tokens)`` and computed in blocks of rows, with
    the gradient ``(softmax(x / t) * sum_k(q) - q) / (t * tokens)`` built in place in one new tensor. The
    autograd form makes about eight tensors the size of the logits, and on a CPU each costs more to
    allocate than the arithmetic done on it. (A compiled step fuses the autograd form instead.)"""

    @staticmethod
    def forward(ctx, logits: Tensor, q: Tensor, temperature: float) -> Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.cat([torch.logsumexp(c.to(dtype) / temperature, dim=-1) for c in row_chunks(logits)])
        q_sum = q.reshape(lse.shape[0], -1).sum(-1, dtype=dtype)  # 1 up to rounding: Sinkhorn rows
        dot = sum(torch.dot(a.reshape(-1).to(dtype), b.reshape(-1).to(dtype))
                  for a, b in zip(row_chunks(logits), row_chunks(q), strict=True))  # fmt: skip
        ctx.save_for_backward(logits, q, lse, q_sum)
        ctx.temperature = temperature
        return ((q_sum * lse).sum() - dot / temperature) / lse.numel()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        logits, q, lse, q_sum = ctx.saved_tensors
        t, k = ctx.temperature, logits.shape[-1]
        g = logits.reshape(-1, k).to(lse.dtype) / t
        g.sub_(lse[:, None]).exp_().mul_(q_sum[:, None]).sub_(q.reshape(-1, k)).mul_(grad / (t * lse.numel()))
        return g.view(logits.shape).to(logits.dtype), None, None


def student_step(
    student: CAPIBackbone,
    head: StudentHead,
    images: Float[Tensor, "b 3 H W"],
    masks: MaskBatch,
    targets: Float[Tensor, "b n_pred k"],
    student_temp: float = 0.12,
) -> Float[Tensor, ""]:
    """CAPI loss: the student sees the visible patches, the predictor scores the ``predict_indices``
    positions, and the head's logits are matched to the teacher's assignments there (``targets``, as
    :func:`teacher_step` returns them for the same indices)."""
    context = student.encode(images, masks.visible_indices)
    logits = head(student.predict(context, masks.predict_indices))  # (b, n_pred, K)
    return soft_cross_entropy(logits, targets.detach(), student_temp)
