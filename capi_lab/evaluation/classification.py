"""Classification of frozen features: temperature-weighted k-NN (as in DINO) and logistic regression."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor


@torch.no_grad()
def knn_predict(
    train: Float[Tensor, "n d"],
    train_labels: Int[Tensor, " n"],
    test: Float[Tensor, "m d"],
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 2048,
    device: str | torch.device | None = None,
) -> Int[Tensor, " m"]:
    """Labels of ``test`` by a vote of the ``k`` most cosine-similar ``train`` features, each vote
    weighted by ``exp(similarity / temperature)``. Computed on ``device`` (default: where ``train`` is) in chunks of
    ``chunk`` queries; the labels come back on the CPU."""
    device = torch.device(device) if device is not None else train.device
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, train.shape[0])
    train_n = F.normalize(train.to(device).float(), dim=1)
    labels = train_labels.to(device)
    preds = []
    for start in range(0, test.shape[0], chunk):
        sims = F.normalize(test[start : start + chunk].to(device).float(), dim=1) @ train_n.T
        top, idx = sims.topk(k, dim=1)
        votes = torch.zeros(sims.shape[0], num_classes, dtype=top.dtype, device=device)
        votes.scatter_add_(1, labels[idx], torch.exp(top / temperature))
        preds.append(votes.argmax(dim=1).cpu())
    return torch.cat(preds)


def knn_accuracy(
    train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor, k: int = 20, temperature: float = 0.07,
    device: str | torch.device | None = None,
) -> float:  # fmt: skip
    """Top-1 accuracy of :func:`knn_predict` (on ``device``: the GPU when there is one, for a large bank)."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    pred = knn_predict(train, train_labels, test, k, temperature, num_classes, device=device)
    return float((pred == test_labels).float().mean())


def linear_accuracy(
    train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor, c: float = 1.0, max_iter: int = 1000
) -> float:
    """Top-1 accuracy of a multinomial logistic regression (scikit-learn, L2, standardized features)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    clf.fit(train.float().numpy(), train_labels.numpy())
    return float(np.mean(clf.predict(test.float().numpy()) == test_labels.numpy()))
