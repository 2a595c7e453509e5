"""Scoring exams with the model, and how good those scores are: the one place train, predict and the
federated client get predictions and metrics from."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from client.data import ExamSet, chunks, loader_workers, stream
from client.device import Runtime, resolve_runtime
from common.config import Config
from common.model import BIRADS_CLASSES, IGNORE, MultiTaskLoss, malignancy_score
from common.stats import StatsInputError, auc_ci, binary_metrics


@dataclass
class Predictions:
    exam_ids: list[str]
    malignancy_logit: np.ndarray
    """(N,) float32."""
    birads_logits: np.ndarray
    """(N, 4) float32, one column per `BIRADS_CLASSES`."""

    @property
    def score(self) -> np.ndarray:
        """Malignancy score 0–100."""
        return malignancy_score(torch.from_numpy(self.malignancy_logit)).numpy().astype(np.float64)

    @property
    def birads_probabilities(self) -> np.ndarray:
        return torch.softmax(torch.from_numpy(self.birads_logits), dim=1).numpy()

    @property
    def birads(self) -> np.ndarray:
        """Most probable BI-RADS category, 2–5."""
        return np.asarray(BIRADS_CLASSES)[self.birads_logits.argmax(axis=1)]

    def records(self) -> list[dict[str, Any]]:
        """One JSON-ready row per exam."""
        return [
            {
                "exam_id": exam,
                "malignancy_score": float(score),
                "birads": int(birads),
                "birads_probabilities": dict(zip(map(str, BIRADS_CLASSES), map(float, probs), strict=True)),
            }
            for exam, score, birads, probs in zip(
                self.exam_ids, self.score, self.birads, self.birads_probabilities, strict=True
            )
        ]


@dataclass
class Metrics:
    """Each measured where its truth exists: the malignancy figures on the exams with a pathology, the
    BI-RADS accuracy on those with a 2–5 read."""

    n: int
    """Exams scored."""
    n_pathology: int
    n_malignant: int
    n_birads: int
    loss: float
    """Malignancy BCE (unweighted) + birads_loss_weight × BI-RADS cross-entropy, each where its target is."""
    auc: float | None
    """None when a split lacks two exams of either class (no DeLong CI then)."""
    auc_low: float | None
    auc_high: float | None
    threshold: float
    sensitivity: float | None
    specificity: float | None
    birads_accuracy: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        auc = "AUC n/a"
        if self.auc is not None:
            auc = f"AUC {self.auc:.3f} (95% CI {self.auc_low:.3f}–{self.auc_high:.3f})"
        sens = "n/a" if self.sensitivity is None else f"{self.sensitivity:.2f}"
        spec = "n/a" if self.specificity is None else f"{self.specificity:.2f}"
        unknown = self.n - self.n_pathology
        return (f"{auc}, sensitivity {sens} / specificity {spec} at score ≥ {self.threshold:g}, "
                f"loss {self.loss:.4f}, n={self.n} ({self.n_malignant} malignant"
                + (f", {unknown} without pathology" if unknown else "") + ")")


def predict(
    model: nn.Module, data: ExamSet, config: Config, runtime: Runtime | None = None
) -> Predictions:
    """Score every exam of `data` in eval mode (the model is put on the runtime's device)."""
    runtime = runtime or resolve_runtime(config.train)
    # placed outside inference mode: tensors made there could never train, and `client.app` lends the model
    # to the next message
    runtime.place(model)
    was_training = model.training
    model.eval()
    logits, birads = [], []
    plan = chunks(torch.arange(len(data)), config.train.batch_size)
    try:
        with torch.inference_mode():
            for batch in stream(data, plan, runtime.device,
                                workers=loader_workers(config.data, runtime.device)):
                with runtime.autocast():
                    out = model(batch.views)
                logits.append(out["malignancy"].float().cpu())
                birads.append(out["birads"].float().cpu())
    finally:
        model.train(was_training)
    if not logits:
        raise ValueError("no exams to predict")
    return Predictions(list(data.exam_ids), torch.cat(logits).numpy(), torch.cat(birads).numpy())


def metrics(predictions: Predictions, data: ExamSet, config: Config) -> Metrics:
    """Metrics of `predictions` against the labels in `data` (same exams, same order, at least one)."""
    if predictions.exam_ids != data.exam_ids or not data.exam_ids:
        raise ValueError("metrics need the predictions of the same, non-empty list of exams")
    known = data.has_pathology.numpy()
    truth = data.malignant.numpy()[known].astype(bool)
    loss = MultiTaskLoss(config.model.birads_loss_weight)(
        {"malignancy": torch.from_numpy(predictions.malignancy_logit),
         "birads": torch.from_numpy(predictions.birads_logits)},
        data.malignant, data.birads_class,
    )
    score = predictions.score[known]
    try:
        auc, low, high = auc_ci(truth, score)
    except StatsInputError:
        auc = low = high = None
    called = binary_metrics(truth, score >= config.train.threshold)
    sens, spec = called["sensitivity"].value, called["specificity"].value
    read = data.birads_class.numpy() != IGNORE
    predicted_class = np.searchsorted(BIRADS_CLASSES, predictions.birads)[read]
    return Metrics(
        n=len(data),
        n_pathology=len(truth),
        n_malignant=int(truth.sum()),
        n_birads=int(read.sum()),
        loss=float(loss),
        auc=auc,
        auc_low=low,
        auc_high=high,
        threshold=config.train.threshold,
        sensitivity=None if np.isnan(sens) else sens,
        specificity=None if np.isnan(spec) else spec,
        birads_accuracy=float(np.mean(predicted_class == data.birads_class.numpy()[read]))
        if read.any() else None,
    )


def evaluate(
    model: nn.Module, data: ExamSet, config: Config, runtime: Runtime | None = None
) -> tuple[Metrics, Predictions]:
    """Predict `data` and measure the predictions against its labels."""
    predictions = predict(model, data, config, runtime)
    return metrics(predictions, data, config), predictions
