"""The dual-view DenseNet-121 (the real torchvision trunk, at 64×64), its ImageNet loading and its loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import densenet121

from common.config import ModelConfig
from common.model import (
    GRAY_MEAN,
    GRAY_STD,
    DualViewDenseNet,
    MultiTaskLoss,
    build_model,
    malignancy_score,
)

SIZE = 64



def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def imagenet_like() -> nn.Module:
    """torchvision's densenet121 with non-trivial norm parameters and statistics, standing in for the
    ImageNet weights (which cannot be downloaded here)."""
    torch.manual_seed(0)
    model = densenet121(weights=None)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.1, 0.1)
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def legacy_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as torchvision's published ImageNet file has them: "norm.1" for "norm1" and no
    num_batches_tracked."""
    renamed = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        for part in ("norm", "relu", "conv"):
            for i in ("1", "2"):
                key = key.replace(f".{part}{i}.", f".{part}.{i}.") if "denselayer" in key else key
        renamed[key] = value
    return renamed


@pytest.mark.parametrize("bilateral", [False, True])
@pytest.mark.parametrize("norm", ["batch", "group"])
def test_forward_shapes_and_backward(norm: str, bilateral: bool) -> None:
    torch.manual_seed(0)
    model = DualViewDenseNet(norm=norm, bilateral=bilateral)
    views = torch.rand(2, 4 if bilateral else 2, SIZE, SIZE)
    out = model(views)
    assert out["malignancy"].shape == (2,)
    assert out["birads"].shape == (2, 4)
    assert all(torch.isfinite(v).all() for v in out.values())
    (out["malignancy"].sum() + out["birads"].sum()).backward()
    assert model.features.conv0.weight.grad is not None and model.birads.weight.grad is not None


def test_parameter_counts_equal_across_norms() -> None:
    trunk = sum(p.numel() for p in densenet121(weights=None).features.parameters())
    gray_conv0 = trunk - 64 * 2 * 7 * 7  # 1 input channel instead of 3
    for bilateral, fused in ((False, 2048), (True, 4096)):
        counts = {n: n_params(DualViewDenseNet(norm=n, bilateral=bilateral)) for n in ("batch", "group")}
        assert counts["batch"] == counts["group"] == gray_conv0 + fused * 5 + 5


def test_group_norm_model_is_fit_for_opacus() -> None:
    model = DualViewDenseNet(norm="group")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, nn.ReLU) and m.inplace for m in model.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) == 121


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_group_norm_per_sample_gradients_with_opacus() -> None:
    """Opacus's per-sample gradients of the trunk shared by both views equal each exam's own gradient."""
    from opacus import GradSampleModule

    torch.manual_seed(0)
    model = DualViewDenseNet(norm="group", dropout=0.0)
    params = [model.features.conv0.weight, model.features.norm5.weight]
    views = torch.rand(3, 2, SIZE, SIZE)
    target = torch.tensor([0.0, 1.0, 1.0])
    # Exam 1's gradient, from the same batched arithmetic (a batch of one rounds differently, ~0.5%).
    loss = F.binary_cross_entropy_with_logits(model(views)["malignancy"][1], target[1], reduction="sum")
    reference = torch.autograd.grad(loss, params)

    wrapped = GradSampleModule(model, loss_reduction="sum")
    loss = F.binary_cross_entropy_with_logits(wrapped(views)["malignancy"], target, reduction="sum")
    loss.backward()
    for param, expected in zip(params, reference, strict=True):
        assert param.grad_sample.shape == (3, *param.shape)
        torch.testing.assert_close(param.grad_sample[1], expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(param.grad_sample.sum(0), param.grad, rtol=1e-4, atol=1e-6)


def test_forward_rejects_wrong_view_count() -> None:
    with pytest.raises(ValueError, match=r"expected views \(B, 4, H, W\)"):
        DualViewDenseNet(bilateral=True)(torch.rand(1, 2, SIZE, SIZE))


def test_unknown_norm_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"model\.norm"):
        DualViewDenseNet(norm="layer")


def test_bilateral_model_sees_the_contralateral_breast() -> None:
    torch.manual_seed(0)
    model = DualViewDenseNet(bilateral=True).eval()
    views = torch.rand(1, 4, SIZE, SIZE)
    swapped = views[:, [0, 1, 3, 2]]
    with torch.no_grad():
        assert not torch.allclose(model(views)["malignancy"], model(swapped)["malignancy"])


def test_memory_efficient_mode_computes_the_same() -> None:
    torch.manual_seed(0)
    plain = DualViewDenseNet(dropout=0.0)
    efficient = DualViewDenseNet(memory_efficient=True, dropout=0.0)
    efficient.load_state_dict(plain.state_dict())
    views = torch.rand(2, 2, SIZE, SIZE)
    outs = [m(views)["malignancy"] for m in (plain, efficient)]
    torch.testing.assert_close(outs[0], outs[1])
    for out in outs:
        out.sum().backward()
    torch.testing.assert_close(plain.features.conv0.weight.grad, efficient.features.conv0.weight.grad)


@pytest.mark.parametrize("legacy", [False, True])
def test_pretrained_gray_conv_equals_replicated_gray_channel(imagenet_like, tmp_path, legacy) -> None:
    state = imagenet_like.state_dict()
    path = tmp_path / "densenet121.pth"
    torch.save(legacy_keys(state) if legacy else state, path)
    model = build_model(ModelConfig(pretrained=str(path)), bilateral=False).eval()
    gray_conv0 = state["features.conv0.weight"].sum(1, keepdim=True)
    torch.testing.assert_close(model.features.conv0.weight, gray_conv0)

    gray = torch.rand(2, SIZE, SIZE)
    rgb = ((gray.unsqueeze(1) - GRAY_MEAN) / GRAY_STD).expand(-1, 3, -1, -1)
    with torch.no_grad():
        expected = F.adaptive_avg_pool2d(F.relu(imagenet_like.features(rgb)), 1).flatten(1)
        torch.testing.assert_close(model.view_features(gray), expected, rtol=1e-4, atol=1e-4)


def test_pretrained_into_group_norm_takes_the_affine_parameters(imagenet_like, tmp_path) -> None:
    path = tmp_path / "densenet121.pth"
    torch.save(imagenet_like.state_dict(), path)
    model = DualViewDenseNet(norm="group", pretrained=path)
    torch.testing.assert_close(model.features.denseblock2.denselayer3.norm2.weight,
                               imagenet_like.features.denseblock2.denselayer3.norm2.weight)


def test_pretrained_file_missing_or_unfit(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth: pretrained weights not found"):
        DualViewDenseNet(pretrained=tmp_path / "nowhere.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match=r"garbage\.pth: cannot read"):
        DualViewDenseNet(pretrained=garbage)
    other = tmp_path / "other.pth"
    torch.save(nn.Sequential(nn.Conv2d(3, 64, 7)).state_dict(), other)
    with pytest.raises(ValueError, match=r"other\.pth: no 'features\.conv0\.weight'"):
        DualViewDenseNet(pretrained=other)
    truncated = tmp_path / "truncated.pth"
    state = densenet121(weights=None).state_dict()
    del state["features.denseblock4.denselayer16.conv2.weight"]
    torch.save(state, truncated)
    with pytest.raises(ValueError, match=r"truncated\.pth: does not fit torchvision's densenet121"):
        DualViewDenseNet(pretrained=truncated)


def test_malignancy_score_range() -> None:
    scores = malignancy_score(torch.tensor([-1e4, -2.0, 0.0, 2.0, 1e4]))
    assert scores[2] == 50.0 and scores[0] == 0.0 and scores[-1] == 100.0
    assert torch.all(scores.diff() > 0)


def test_multitask_loss_weights_its_parts() -> None:
    outputs = {"malignancy": torch.tensor([0.5, -1.0, 2.0]), "birads": torch.randn(3, 4)}
    malignant = torch.tensor([1.0, 0.0, 1.0])
    birads = torch.tensor([3, 0, 2])
    bce = F.binary_cross_entropy_with_logits(outputs["malignancy"], malignant, reduction="none")
    ce = F.cross_entropy(outputs["birads"], birads, reduction="none")
    per_exam = MultiTaskLoss(0.3, reduction="none")(outputs, malignant, birads)
    torch.testing.assert_close(per_exam, bce + 0.3 * ce)
    torch.testing.assert_close(MultiTaskLoss(0.3)(outputs, malignant, birads), (bce + 0.3 * ce).mean())
    weighted = MultiTaskLoss(0.0, pos_weight=4.0, reduction="none")(outputs, malignant, birads)
    torch.testing.assert_close(weighted, bce * torch.tensor([4.0, 1.0, 4.0]))
