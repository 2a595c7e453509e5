"""The dual-view DenseNet-121 multi-task model, its factory and its loss.

One torchvision DenseNet-121 feature trunk is shared by every view of an exam (CC, MLO and, when
`bilateral`, the contralateral CC and MLO). Each view's pooled features are fused and fed to two heads: a
malignancy logit (score = 100·sigmoid) and BI-RADS 2/3/4/5 logits.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import densenet121

from common.config import NORMS, Config, ModelConfig
from common.labels import BIRADS_TARGETS
from common.runtime import seed_everything

BIRADS_CLASSES = BIRADS_TARGETS
"""BI-RADS category of each output of the BI-RADS head."""
IGNORE = -100
"""BI-RADS class of an exam without a 2–5 read: no BI-RADS loss (torch's cross-entropy ignore index)."""
GRAY_MEAN = 0.449
"""ImageNet's mean over its RGB means (0.485, 0.456, 0.406): the gray input is normalised once."""
GRAY_STD = 0.226
"""ImageNet's mean over its RGB standard deviations (0.229, 0.224, 0.225)."""
TRUNK_FEATURES = 1024
"""Channels of DenseNet-121's last feature map."""
_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")

# torchvision's own ImageNet files name dense-layer modules the old way ("norm.1"); this is the pattern
# torchvision's `_load_state_dict` uses to rename them (it is private and takes a download, not a file).
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _group_norm_trunk(module: nn.Module) -> None:
    """Swap every BatchNorm for GroupNorm(32) and make every ReLU out-of-place, as DP-SGD (Opacus) needs:
    BatchNorm mixes samples, and in-place ReLU breaks its per-sample hooks. GroupNorm has the same affine
    parameters, so the parameter count is unchanged and ImageNet weights still load."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(min(32, child.num_features), child.num_features))
        elif isinstance(child, nn.ReLU):
            setattr(module, name, nn.ReLU(inplace=False))
        else:
            _group_norm_trunk(child)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pretrained weights not found (sites are offline: copy the file)")
    try:
        if path.suffix == ".safetensors":
            state = safetensors.torch.load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read pretrained weights: {exc}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors (expected torchvision's densenet121 format)")
    return dict(state)


def load_imagenet_trunk(trunk: nn.Sequential, path: str | Path) -> None:
    """Load torchvision's ImageNet `densenet121` state dict from a local file into a 1-channel trunk.

    conv0's RGB weights are summed over the colour channels: on a gray image that equals replicating the
    gray channel three times, at a third of the cost. With GroupNorm the BatchNorm running statistics are
    dropped (GroupNorm has none); its scale and shift come from BatchNorm's.
    """
    path = Path(path)
    state = _read_state_dict(path)
    features = {}
    for key, value in state.items():
        if not key.startswith("features."):
            continue  # the ImageNet classifier is not used
        key = key.removeprefix("features.")
        legacy = _LEGACY_KEY.match(key)
        features[legacy.group(1) + legacy.group(2) if legacy else key] = value
    if "conv0.weight" not in features:
        raise ValueError(f"{path}: no 'features.conv0.weight': not torchvision's densenet121 state dict")
    conv0 = features["conv0.weight"]
    if conv0.ndim != 4 or conv0.shape[1] not in (1, 3):
        raise ValueError(f"{path}: features.conv0.weight has shape {tuple(conv0.shape)}, not (64, 3, 7, 7)")
    features["conv0.weight"] = conv0.sum(dim=1, keepdim=True)
    if not any(isinstance(m, nn.BatchNorm2d) for m in trunk.modules()):
        features = {k: v for k, v in features.items() if not k.endswith(_BN_STATS)}
    try:
        trunk.load_state_dict(features)
    except RuntimeError as exc:
        raise ValueError(f"{path}: does not fit torchvision's densenet121: {exc}") from exc


class DualViewDenseNet(nn.Module):
    """Views (B, V, H, W) in [0, 1] → `{"malignancy": (B,) logits, "birads": (B, 4) logits}`.

    V is 2 (CC, MLO) or, when `bilateral`, 4 (CC, MLO, contralateral CC, contralateral MLO). The fused
    vector is [CC, MLO] features, and when bilateral also [CC − contra CC, MLO − contra MLO]: the
    left–right differences are what an asymmetry is, and a linear head on [ipsi, ipsi − contra] can
    express any linear function of [ipsi, contra].
    """

    def __init__(
        self,
        *,
        bilateral: bool = False,
        norm: str = "batch",
        memory_efficient: bool = False,
        dropout: float = 0.2,
        pretrained: str | Path | None = None,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"model.norm must be one of {', '.join(NORMS)}; got {norm!r}")
        self.bilateral = bilateral
        self.num_views = 4 if bilateral else 2
        self.features = densenet121(weights=None, memory_efficient=memory_efficient).features
        self.features.conv0 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.features.conv0.weight)  # torchvision's init for its convs
        if norm == "group":
            _group_norm_trunk(self.features)
        if pretrained is not None:
            load_imagenet_trunk(self.features, pretrained)
        fused = self.num_views * TRUNK_FEATURES  # [CC, MLO] or [CC, MLO, CC − contra, MLO − contra]
        self.dropout = nn.Dropout(dropout)
        self.malignancy = nn.Linear(fused, 1)
        self.birads = nn.Linear(fused, len(BIRADS_CLASSES))

    def view_features(self, view: Tensor) -> Tensor:
        """One view (B, H, W) → pooled trunk features (B, 1024)."""
        x = (view.unsqueeze(1) - GRAY_MEAN) / GRAY_STD
        # Not torchvision's DenseNet.forward: its in-place F.relu breaks Opacus's per-sample hooks.
        return F.adaptive_avg_pool2d(F.relu(self.features(x)), 1).flatten(1)

    def forward(self, views: Tensor) -> dict[str, Tensor]:
        if views.ndim != 4 or views.shape[1] != self.num_views:
            raise ValueError(f"expected views (B, {self.num_views}, H, W); got {tuple(views.shape)}")
        # One trunk call per view, each over the exam batch, so per-sample gradients (DP-SGD) see B samples.
        feats = [self.view_features(views[:, v]) for v in range(self.num_views)]
        fused = feats[:2]
        if self.bilateral:
            fused += [feats[0] - feats[2], feats[1] - feats[3]]
        fused = self.dropout(torch.cat(fused, dim=1))
        return {"malignancy": self.malignancy(fused).squeeze(1), "birads": self.birads(fused)}


def build_model(config: ModelConfig, bilateral: bool) -> DualViewDenseNet:
    return DualViewDenseNet(
        bilateral=bilateral,
        norm=config.norm,
        memory_efficient=config.memory_efficient,
        dropout=config.dropout,
        pretrained=config.pretrained,
    )


def unused_entries(model: nn.Module) -> set[str]:
    """State-dict entries that never change what `model` computes: BatchNorm's step counters where the layer
    has a momentum (torch reads `num_batches_tracked` only for a cumulative average, momentum None)."""
    return {f"{name}.num_batches_tracked" for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is not None
            and module.track_running_stats}


def malignancy_score(logits: Tensor) -> Tensor:
    """Malignancy logits → score 0–100."""
    return 100.0 * torch.sigmoid(logits.float())


class MultiTaskLoss(nn.Module):
    """Malignancy BCE (positives weighted by `pos_weight` against class imbalance) plus
    `birads_weight` × BI-RADS cross-entropy. Targets: malignant (B,) float 0/1 or NaN (no pathology: no
    BCE), BI-RADS class index (B,) 0–3 or `IGNORE` (no cross-entropy). An exam's loss is the sum of the
    terms it has, and the mean is over every exam of the batch, so each exam weighs the same whatever it
    carries. `reduction='none'` gives per-exam losses (Opacus's ghost clipping asks for them)."""

    def __init__(self, birads_weight: float = 0.3, pos_weight: float | None = None, reduction: str = "mean"):
        super().__init__()
        self.birads_weight = birads_weight
        self.reduction = reduction
        self.register_buffer("pos_weight", None if pos_weight is None else torch.tensor(float(pos_weight)))

    def forward(self, outputs: Mapping[str, Tensor], malignant: Tensor, birads_class: Tensor) -> Tensor:
        known = ~torch.isnan(malignant)
        bce = F.binary_cross_entropy_with_logits(
            outputs["malignancy"].float(), torch.where(known, malignant.float(), 0.0),
            pos_weight=self.pos_weight, reduction="none",
        ) * known
        ce = F.cross_entropy(outputs["birads"].float(), birads_class, reduction="none", ignore_index=IGNORE)
        loss = bce + self.birads_weight * ce
        if self.reduction == "none":
            return loss
        return loss.mean() if self.reduction == "mean" else loss.sum()


def initial_model(config: Config) -> nn.Module:
    """The run's starting model, the same at the server and at every site (local-only baselines)."""
    seed_everything(config.train.seed)
    return build_model(config.model, config.data.bilateral)
