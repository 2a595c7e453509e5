"""How learnable the synthetic cohort is: reference AUCs that docs/synthetic-data.md reports.

    python -m common.synth.reference [--train 70] [--test 30] [--sites 3] [--seed 0] [--conspicuity 1]

Writes a cohort with the real generator, reads it back with the product's DICOM reader and preprocessing
at the demo's view size, and scores held-out test exams with three observers:

- ideal: the lesion appearance latent itself (every lesion feature seen exactly; the ceiling);
- lesion features: logistic regression on the drawn lesion's parameters (contrast, margin, irregularity,
  spicules) and the breast's glandular share, trained on the training exams;
- small CNN: a four-layer CNN (~60k weights) shared by the CC and MLO views, trained from scratch on the
  training exams' pixels for a fixed number of epochs on the CPU.

Prints a Markdown table: AUC with DeLong 95% CI and the time taken.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from common.dicom import read_view
from common.preprocess import preprocess_view
from common.stats.delong import auc_ci
from common.synth.cohort import ideal_observer
from common.synth.generate import CohortSpec, anatomy, generate, image_path, plan

VIEW_SIZE = (128, 96)
"""The demo's view size (configs/demo.toml)."""


def _read_exam(paths: tuple[Path, Path]) -> np.ndarray:
    return np.stack([preprocess_view(read_view(p).pixels, VIEW_SIZE) for p in paths])


def load_cohort(spec: CohortSpec, out: Path, workers: int) -> dict[str, np.ndarray]:
    """Each labelled exam's preprocessed CC and MLO, its label, split and lesion features."""
    cases = [(site, case) for site in plan(spec) for case in site.cases]
    paths = [tuple(image_path(out / site.name, spec.seed, case, case.laterality, v) for v in ("CC", "MLO"))
             for site, case in cases]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        views = np.stack(list(pool.map(_read_exam, paths, chunksize=8)))
    features = []
    for _, case in cases:
        _, breast, lesion, _ = anatomy(case, spec.seed, spec.conspicuity)
        features.append([lesion.contrast, lesion.contrast * breast.glandular_share,
                         lesion.margin / lesion.radius, sum(lesion.harmonics), lesion.spicules,
                         lesion.spicule_length / lesion.radius, breast.glandular_share])
    return {
        "views": views.astype(np.float32),
        "malignant": np.array([case.malignant for _, case in cases]),
        "train": np.array([case.split != "test" for _, case in cases]),
        "features": np.array(features),
    }


def feature_scores(data: dict[str, np.ndarray]) -> np.ndarray:
    train = data["train"]
    model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=1000))
    model.fit(data["features"][train], data["malignant"][train])
    return model.predict_proba(data["features"][~train])[:, 1]


def cnn_scores(data: dict[str, np.ndarray], epochs: int, seed: int) -> np.ndarray:
    torch.manual_seed(seed)

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.MaxPool2d(2))

    class SmallCNN(nn.Module):
        """Shared trunk per view; max- and mean-pooled features of both views into one logit."""

        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Sequential(block(1, 16), block(16, 32), block(32, 48), block(48, 64))
            self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(4 * 64, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, v, h, w = x.shape
            f = self.trunk(x.reshape(b * v, 1, h, w))
            f = torch.cat([f.amax(dim=(2, 3)), f.mean(dim=(2, 3))], dim=1).reshape(b, -1)
            return self.head(f).squeeze(1)

    train = data["train"]
    x = torch.from_numpy(data["views"][train])
    y = torch.from_numpy(data["malignant"][train]).float()
    model = SmallCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=(len(y) - y.sum()) / y.sum())
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y)).split(16):
            batch = x[idx]
            # Augmentation fit for mammograms: vertical flips, small shifts, brightness and contrast.
            if torch.rand(1) < 0.5:
                batch = batch.flip(2)
            batch = torch.roll(batch, shifts=int(torch.randint(-4, 5, (1,))), dims=2)
            gain, shift = 0.9 + 0.2 * torch.rand(len(idx), 1, 1, 1), 0.05 * torch.randn(len(idx), 1, 1, 1)
            batch = batch * gain + shift
            optimizer.zero_grad()
            loss_fn(model(batch), y[idx]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        return torch.sigmoid(model(torch.from_numpy(data["views"][~train]))).numpy()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--train", type=int, default=70, help="training exams per site")
    parser.add_argument("--test", type=int, default=30, help="test exams per site")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--conspicuity", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", help="keep the cohort here (default: a temporary folder)")
    args = parser.parse_args(argv)
    spec = CohortSpec(train=(args.train,) * args.sites, val=(0,) * args.sites, test=(args.test,) * args.sites,
                      seed=args.seed, conspicuity=args.conspicuity)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        start = time.perf_counter()
        generate(spec, out, workers=args.workers, progress=False)
        data = load_cohort(spec, out, args.workers)
        prepared = time.perf_counter() - start
    test = ~data["train"]
    y = data["malignant"][test]
    ideal = ideal_observer([case for site in plan(spec) for case in site.cases if case.split == "test"])
    rows = [("ideal (appearance latent)", (ideal["auc"], *ideal["auc_ci"]), 0.0),
            ("lesion features, logistic regression", auc_ci(y, feature_scores(data)), 0.0)]
    start = time.perf_counter()
    scores = cnn_scores(data, args.epochs, args.seed)
    rows.append((f"small CNN, {args.epochs} epochs, CPU", auc_ci(y, scores), time.perf_counter() - start))
    n_train = int(data["train"].sum())
    print(f"{args.sites} sites, {n_train} training exams ({int(data['malignant'][data['train']].sum())} "
          f"malignant), {int(test.sum())} test exams ({int(y.sum())} malignant), conspicuity "
          f"{args.conspicuity}; generated and read back in {prepared:.0f} s\n")
    print("| observer | test AUC [95% CI] | training time |")
    print("|---|---|---|")
    for name, (auc, low, high), seconds in rows:
        print(f"| {name} | {auc:.3f} [{low:.3f}, {high:.3f}] | {f'{seconds:.0f} s' if seconds else '–'} |")


if __name__ == "__main__":
    main()
