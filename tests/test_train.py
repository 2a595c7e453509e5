"""Batches, augmentation, class balance and the training loop, on the real model at 64×64."""

from __future__ import annotations

import dataclasses
import os
import tracemalloc

import numpy as np
import pytest
import torch

from client.data import augment, chunks, epoch_order, exam_set, loader_workers, pos_weight, stream
from client.device import resolve_runtime
from client.evaluate import evaluate, predict
from client.prepare import PreparedSite, site_from_arrays
from client.train import scheduled_lr, step_plan, train_epochs
from common.config import Config
from common.labels import ExamLabel
from common.model import IGNORE, DualViewDenseNet, MultiTaskLoss
from common.runtime import seed_everything

SIZE = 64



def make_site(
    name: str = "site",
    splits: dict[str, tuple[int, int]] | None = None,
    size: int = SIZE,
    views: int = 2,
    seed: int = 0,
) -> PreparedSite:
    """A site from arrays: a breast-like half disc against the left edge, with a bright blob in both views
    of malignant exams. `splits` maps a split to its (benign, malignant) counts."""
    splits = splits or {"train": (4, 4), "val": (2, 2), "test": (2, 2)}
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    breast = ((xx**2 + (yy - 0.5) ** 2) < 0.6**2) * 0.4
    labels, arrays = [], []
    for split, (benign, malignant) in splits.items():
        for i in range(benign + malignant):
            bad = i >= benign
            study = f"1.2.826.0.1.{seed}.{split}.{i}"
            birads = 5 if bad else 2 + i % 3
            labels.append(ExamLabel(f"p{split}{i}", study, "L", bad, birads, "c", False, split))
            exam = []
            for _ in range(views):
                image = breast + rng.normal(0, 0.05, (size, size))
                if bad:
                    cy, cx = rng.uniform(0.35, 0.65, 2)
                    image += 0.5 * np.exp(-((yy - cy) ** 2 + (xx - cx * 0.5) ** 2) / 0.004)
                exam.append(image)
            arrays.append(exam)
    return site_from_arrays(name, np.clip(arrays, 0, 1).astype(np.float16), labels)


def tiny_config(**train: object) -> Config:
    config = Config()
    config.data.image_size = (SIZE, SIZE)
    config.train.batch_size = 8
    config.train.num_threads = 0
    for key, value in train.items():
        setattr(config.train, key, value)
    return config


def test_exam_set_pool_sites_and_splits() -> None:
    a = make_site("a", {"train": (3, 1), "test": (1, 1)}, seed=1)
    b = make_site("b", {"train": (2, 2), "val": (1, 1)}, seed=2)
    train = exam_set([a, b], "train")
    assert len(train) == 8
    assert train.exam_ids[:4] == a.split("train").exam_ids
    assert len(train.views) == 8 and train.shape == (2, SIZE, SIZE)
    assert train.__getitems__([0, 1]).views.dtype == torch.float16
    assert train.malignant.tolist() == [0, 0, 0, 1, 0, 0, 1, 1]
    assert train.birads_class.tolist() == [0, 1, 2, 3, 0, 1, 3, 3]  # BI-RADS 2, 3, 4, 5
    assert len(exam_set([a, b], "all")) == 12
    assert len(exam_set([a, b], "val")) == 2
    with pytest.raises(ValueError, match="unknown split"):
        exam_set([a], "holdout")
    with pytest.raises(ValueError, match="different view shapes"):
        exam_set([a, make_site("c", size=32)], "train")


def test_class_balance() -> None:
    data = exam_set([make_site(splits={"train": (12, 3)})], "train")
    assert pos_weight(data, "pos_weight") == 4.0
    assert pos_weight(data, "sampler") is None and pos_weight(data, "none") is None
    generator = torch.Generator().manual_seed(0)
    drawn = torch.cat([epoch_order(data, "sampler", generator) for _ in range(200)])
    assert abs(float(data.malignant[drawn].mean()) - 0.5) < 0.03
    order = epoch_order(data, "pos_weight", generator)
    assert sorted(order.tolist()) == list(range(15))


def _without_targets(site: PreparedSite, pathology: slice, birads: slice) -> PreparedSite:
    """`site` with the pathology of the exams in `pathology` and the BI-RADS read of those in `birads`
    removed (a dataset without them: VinDr has no pathology, RSNA's reads are 0–2)."""
    labels = list(site.labels)
    for i in range(len(labels))[pathology]:
        labels[i] = dataclasses.replace(labels[i], malignant=None)
    for i in range(len(labels))[birads]:
        labels[i] = dataclasses.replace(labels[i], birads=[0, 1, 6, None][i % 4])
    return dataclasses.replace(site, labels=labels)


def test_each_target_counts_only_where_the_exam_has_it() -> None:
    site = _without_targets(make_site(splits={"train": (8, 4)}), pathology=slice(0, 4), birads=slice(4, 8))
    data = exam_set([site], "train")
    assert torch.isnan(data.malignant[:4]).all() and data.has_pathology.sum() == 8
    assert (data.birads_class[4:8] == IGNORE).all() and (data.birads_class[8:] >= 0).all()
    assert pos_weight(data, "pos_weight") == 1.0  # 4 benign with a pathology, 4 malignant
    generator = torch.Generator().manual_seed(0)
    drawn = torch.cat([epoch_order(data, "sampler", generator) for _ in range(300)])
    share = np.bincount(drawn.numpy(), minlength=12) / len(drawn)
    assert abs(share[:4].sum() - 4 / 12) < 0.02  # exams without a pathology keep their share
    assert abs(share[8:].sum() - share[4:8].sum()) < 0.02  # the others are balanced by class

    outputs = {"malignancy": torch.randn(12), "birads": torch.randn(12, 4)}
    per_exam = MultiTaskLoss(0.3, reduction="none")(outputs, data.malignant, data.birads_class)
    assert torch.isfinite(per_exam).all()
    changed = {"malignancy": outputs["malignancy"].clone(), "birads": outputs["birads"].clone()}
    changed["malignancy"][:4] += 5  # no pathology: the malignancy output does not count
    changed["birads"][4:8] += torch.tensor([5.0, -5, 0, 0])  # no 2–5 read: nor does the BI-RADS one
    again = MultiTaskLoss(0.3, reduction="none")(changed, data.malignant, data.birads_class)
    assert torch.equal(per_exam, again)

    config = tiny_config()
    model = DualViewDenseNet(pretrained=None)
    metrics, _ = evaluate(model, data, config)
    assert (metrics.n, metrics.n_pathology, metrics.n_malignant, metrics.n_birads) == (12, 8, 4, 8)
    assert "4 without pathology" in metrics.summary()


def test_augment_keeps_range_orientation_and_is_seeded() -> None:
    views = torch.zeros(4, 2, SIZE, 48)
    views[..., :, :12] = 0.8  # the chest-wall side of the breast, at the left edge
    out = augment(views, torch.Generator().manual_seed(1))
    again = augment(views, torch.Generator().manual_seed(1))
    assert out.shape == views.shape and torch.equal(out, again)
    assert out.min() >= 0 and out.max() <= 1
    # Scaled and rotated about the chest-wall midpoint, never flipped: the tissue stays on the left.
    assert (out[..., SIZE // 4 : -SIZE // 4, :4].mean((-1, -2)) > 0.5).all()
    assert (out[..., :, -12:].mean((-1, -2)) < 0.15).all()
    assert not torch.allclose(out[:, 0], out[:, 1])  # each view has its own geometric jitter


def test_augment_without_jitter_is_the_identity() -> None:
    views = torch.rand(2, 2, SIZE, 48)
    out = augment(views, torch.Generator().manual_seed(0), rotation_deg=0, scale=0, shift=(0, 0), gamma=1,
                  contrast=0, brightness=0, noise=0)
    torch.testing.assert_close(out, views, atol=1e-5, rtol=0)


def test_batches_cover_the_order_on_the_device() -> None:
    data = exam_set([make_site()], "train")
    order = torch.tensor([7, 0, 3, 5, 1])
    got = list(stream(data, chunks(order, 2), torch.device("cpu")))
    assert [len(b.views) for b in got] == [2, 2, 1]
    assert got[0].views.dtype == torch.float32
    expected = np.stack([np.load(file) for file in data.views[7]])
    torch.testing.assert_close(got[0].views[0], torch.from_numpy(expected).float())
    assert torch.equal(torch.cat([b.malignant for b in got]), data.malignant[order])


def test_train_epochs_learns_a_tiny_problem() -> None:
    """Group norm and no dropout, so the eval-mode loss before and after is the trained objective."""
    config = tiny_config(augment=False)
    data = exam_set([make_site()], "train")
    seed_everything(0)
    model = DualViewDenseNet(norm="group", dropout=0.0)
    before, _ = evaluate(model, data, config)
    stats = train_epochs(model, data, config, epochs=6, progress=False)
    after, predictions = evaluate(model, data, config)
    assert stats.steps == 6 and stats.exams == 48
    assert after.loss < 0.6 * before.loss
    assert after.auc == 1.0 and after.sensitivity == after.specificity == 1.0
    scores = predictions.score
    assert ((scores >= 0) & (scores <= 100)).all() and set(predictions.birads) <= {2, 3, 4, 5}


def test_train_epochs_steps_seed_and_fedprox() -> None:
    config = tiny_config(lr=1e-3, batch_size=4)
    config.data.image_size = (32, 32)  # the smallest the trunk takes: this test trains four times
    data = exam_set([make_site(size=32)], "train")

    def trained(mu: float = 0.0, seed: int = 0) -> dict[str, torch.Tensor]:
        torch.manual_seed(123)
        model = DualViewDenseNet(norm="group")
        start = {k: v.detach().clone() for k, v in model.named_parameters()}
        stats = train_epochs(model, data, config, steps=3, generator=torch.Generator().manual_seed(seed),
                             global_weights=start, mu=mu, progress=False)
        assert stats.steps == 3 and stats.exams == 3 * 4  # steps go on past an epoch of 2 batches
        return {k: v.detach() - start[k] for k, v in model.named_parameters()}

    def distance(moved: dict[str, torch.Tensor]) -> float:
        return float(sum(d.pow(2).sum() for d in moved.values()))

    plain = trained()
    assert all(torch.equal(a, b) for a, b in zip(plain.values(), trained().values(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(plain.values(), trained(seed=1).values(), strict=True))
    assert distance(trained(mu=1e4)) < 0.5 * distance(plain)
    with pytest.raises(ValueError, match="needs the global weights"):
        train_epochs(DualViewDenseNet(), data, config, steps=1, mu=0.1)


def test_cosine_schedule_sets_each_epochs_rate_from_its_place_in_the_whole_run() -> None:
    config = tiny_config(lr=1e-3, lr_schedule="cosine", batch_size=8)
    config.data.image_size = (32, 32)
    data = exam_set([make_site(size=32)], "train")  # 8 exams: one batch an epoch
    model = DualViewDenseNet(norm="group")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    rates: list[float] = []
    step = optimizer.step
    optimizer.step = lambda *a, **k: (rates.append(optimizer.param_groups[0]["lr"]), step(*a, **k))[1]
    train_epochs(model, data, config, epochs=2, optimizer=optimizer, progress=False)  # the whole run
    train_epochs(model, data, config, epochs=2, optimizer=optimizer, progress=False, position=(4, 8))
    expected = [1e-3, 0.5e-3, 0.5e-3 * (1 + np.cos(np.pi * 4 / 8)), 0.5e-3 * (1 + np.cos(np.pi * 5 / 8))]
    assert rates == pytest.approx(expected)
    assert scheduled_lr(tiny_config(lr=1e-3).train, 0.9) == 1e-3  # constant by default


def test_predict_in_eval_mode_keeps_training_mode_and_order() -> None:
    config = tiny_config()
    data = exam_set([make_site(views=4)], "test")
    model = DualViewDenseNet(bilateral=True)
    predictions = predict(model, data, config, resolve_runtime(config.train))
    assert model.training
    assert predictions.exam_ids == data.exam_ids
    records = predictions.records()
    assert all(0 <= r["malignancy_score"] <= 100 and r["birads"] in (2, 3, 4, 5) for r in records)
    assert all(abs(sum(r["birads_probabilities"].values()) - 1) < 1e-5 for r in records)


def test_a_model_scored_in_one_layout_trains_in_another() -> None:
    """`client.app` lends one model to an evaluation, then to training. Scoring on a GPU puts the convolution
    weights in channels_last (here forced on the CPU); training's runtime (DP-SGD's: never channels_last)
    must get them back in its own layout, and as tensors that can train: not made in inference mode."""
    config = tiny_config(batch_size=4)
    config.data.image_size = (32, 32)
    model = DualViewDenseNet(norm="group")
    predict(model, exam_set([make_site(size=32)], "test"), config,
            dataclasses.replace(resolve_runtime(config.train), channels_last=True))
    conv = model.features.denseblock1.denselayer1.conv2  # 3×3: its two layouts differ
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_inference()
    train_epochs(model, exam_set([make_site(size=32)], "train"), config, steps=1, progress=False)
    assert conv.weight.is_contiguous() and not conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_runtime_on_cpu() -> None:
    config = tiny_config()
    runtime = resolve_runtime(config.train)
    if not torch.cuda.is_available():
        assert runtime.device.type == "cpu" and runtime.amp_dtype is None and not runtime.channels_last
    config.train.device = "cpu"
    config.train.precision = "bf16"
    assert resolve_runtime(config.train).amp_dtype == torch.bfloat16
    config.train.precision = "fp16"
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_runtime(config.train)


def test_runtime_never_channels_last_under_dp() -> None:
    config = tiny_config()
    config.train.device = "cuda" if torch.cuda.is_available() else "cpu"
    assert not resolve_runtime(config.train, private=True).channels_last


def test_chunked_batches_accumulate_to_the_whole_batchs_step() -> None:
    """`physical_batch_size` cuts each batch into chunks whose gradients add up to the whole batch's (group
    norm: an exam's output does not depend on its batch), for a batch that does not divide evenly too."""
    config = tiny_config(lr=1e-3, batch_size=5, augment=False)
    config.data.image_size = (32, 32)
    config.model.dropout = 0.0
    data = exam_set([make_site(size=32)], "train")  # 8 exams: batches of 5 and 3
    trained = []
    for chunk in (0, 2):
        config.train.physical_batch_size = chunk
        torch.manual_seed(7)
        model = DualViewDenseNet(norm="group", dropout=0.0)
        start = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)  # Adam would magnify rounding in tiny gradients
        stats = train_epochs(model, data, config, epochs=1, optimizer=sgd,
                             generator=torch.Generator().manual_seed(3), progress=False)
        assert stats.steps == 2 and stats.exams == 8
        trained.append((stats.loss, torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - start))
    (loss, whole), (chunked_loss, chunked) = trained
    assert chunked_loss == pytest.approx(loss, rel=1e-5)
    assert float((chunked - whole).norm()) < 0.01 * float(whole.norm())  # float32 rounding (weights - start)


def test_step_plan_shares_every_batch_among_processes() -> None:
    order = torch.arange(11)
    plans = [step_plan(order, 5, 2, rank, 2) for rank in (0, 1)]
    # batches [0..4], [5..9] shared 3 + 2, cut into as many chunks per process; [10] < 2 processes: left out
    assert [[p.index for p in plan] for plan in plans] == [[[0, 1], [2], [5, 6], [7]], [[3], [4], [8], [9]]]
    assert [len(p) for p in plans] == [4, 4] and all(p.scale == 2 / 5 for plan in plans for p in plan)
    assert [(p.first, p.last) for p in plans[0]] == [(True, False), (False, True)] * 2
    assert [p.index for p in step_plan(order, 4, 0)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]


def test_stream_reads_in_order_with_workers_and_holds_a_few_batches() -> None:
    """Loader workers give the batches of the in-process read, in the plan's order; the memory the read
    holds is a few batches, whatever the number of exams."""
    small = exam_set([make_site(splits={"train": (4, 4)})], "train")
    large = exam_set([make_site(splits={"train": (40, 24)})], "train")
    plan = chunks(torch.randperm(len(large), generator=torch.Generator().manual_seed(0)), 4)
    here = list(stream(large, plan, torch.device("cpu")))
    there = list(stream(large, plan, torch.device("cpu"), workers=2))
    assert all(torch.equal(a.views, b.views) and torch.equal(a.malignant, b.malignant)
               for a, b in zip(here, there, strict=True))
    del here, there

    def peak(data: object) -> int:
        tracemalloc.start()
        for _ in stream(data, chunks(torch.arange(len(data)), 4), torch.device("cpu")):
            pass
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    one_exam = 2 * SIZE * SIZE * 4  # float32 on the device
    assert peak(large) < peak(small) + 4 * one_exam  # 64 exams cost what 8 cost
    assert peak(large) < 16 * one_exam


def test_device_choices_on_a_cuda_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """What `resolve_runtime` and `loader_workers` choose on a (pretended) machine: 4 GPUs, 32 cores."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(32)))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    config = tiny_config()
    runtime = resolve_runtime(config.train)
    assert (runtime.device.type, runtime.amp_dtype, runtime.channels_last, runtime.processes) == \
        ("cuda", torch.bfloat16, True, 4)
    assert torch.backends.cudnn.benchmark  # the views' size is fixed: autotune the convolutions
    assert loader_workers(config.data, runtime.device) == 7  # 32 cores / 4 GPUs, one left for training
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_runtime(config.train).amp_dtype == torch.float16  # with a loss scaler
    assert resolve_runtime(config.train).scaler().is_enabled()
    private = resolve_runtime(config.train, private=True)  # Opacus: one process, no channels_last, eager
    assert (private.processes, private.channels_last, private.compile) == (1, False, False)
    config.train.device = "cuda:2"
    assert resolve_runtime(config.train).processes == 1
    config.train.processes = 2
    with pytest.raises(ValueError, match="needs as many GPUs"):
        resolve_runtime(config.train)
    config.train.device, config.train.processes = "auto", 8
    with pytest.raises(ValueError, match="this machine shows 4"):
        resolve_runtime(config.train)
    config.train.processes = 2
    with pytest.raises(ValueError, match="DP-SGD runs in one process"):
        resolve_runtime(config.train, private=True)


def test_device_choices_on_the_cpu() -> None:
    config = tiny_config()
    config.train.device = "cpu"
    runtime = resolve_runtime(config.train)
    assert runtime.processes == 1 and not runtime.compile
    assert loader_workers(config.data, runtime.device) == 0  # the model's compute takes the cores
    config.data.loader_workers = 3
    assert loader_workers(config.data, runtime.device) == 3
    config.train.processes, config.train.compile = 2, True
    runtime = resolve_runtime(config.train)
    assert runtime.processes == 2 and runtime.compile
    model = DualViewDenseNet()
    assert runtime.compiled(model) is not model
    assert resolve_runtime(tiny_config().train).compiled(model) is model
