"""The Ray-free training core: one epoch, prediction, transforms."""
import numpy as np
import pytest
import torch

from ioisray.config import AugmentConfig, ModelConfig
from ioisray.engine import numpy_batches, predict, train_one_epoch
from ioisray.losses import create_loss
from ioisray.models import create_classifier
from ioisray.transforms import TrainTransform, eval_transform


def toy_data(n_per_class=(12, 6, 3), size=16, seed=0):
    """Classes told apart by colour: a model can learn them in a few steps."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c, n in enumerate(n_per_class):
        base = np.zeros((n, size, size, 3), np.float32)
        base[..., c] = 200
        images.append(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))
        labels += [c] * n
    return np.concatenate(images), np.array(labels, np.int64)


def test_epoch_counts_every_image_per_class_and_learns():
    torch.manual_seed(0)
    images, labels = toy_data()
    model = create_classifier(ModelConfig(name="resnet10t"), 3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = create_loss("ce", [12, 6, 3])
    tf = TrainTransform(16, AugmentConfig(crop_scale=(1.0, 1.0), hflip=True))
    first = train_one_epoch(model, numpy_batches(images, labels, 8, shuffle_seed=0), loss_fn, opt, tf, 3,
                            torch.device("cpu"))
    assert first.total.tolist() == [12, 6, 3]
    assert (first.correct <= first.total).all()
    for e in range(1, 15):
        last = train_one_epoch(model, numpy_batches(images, labels, 8, shuffle_seed=e), loss_fn, opt, tf, 3,
                               torch.device("cpu"))
    assert last.loss < first.loss
    y, p = predict(model, numpy_batches(images, labels, 8), torch.device("cpu"))
    assert (p.argmax(1) == y).mean() > 0.9


def test_max_batches_and_mixup_counting():
    images, labels = toy_data()
    model = create_classifier(ModelConfig(name="resnet10t"), 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    stats = train_one_epoch(model, numpy_batches(images, labels, 4), create_loss("ce", [12, 6, 3]), opt,
                            eval_transform, 3, torch.device("cpu"), mixup_alpha=0.4,
                            generator=torch.Generator().manual_seed(0), max_batches=2)
    assert stats.total.sum() == 8  # two batches of four, each image counted once
    assert np.isnan(stats.per_class_accuracy).any()  # classes 1 and 2 not seen in the first 8 rows


def test_predict_keeps_every_image_and_is_deterministic():
    images, labels = toy_data((5, 4, 4))  # 13 images, batch 4: a partial last batch
    model = create_classifier(ModelConfig(name="resnet10t"), 3)
    y1, p1 = predict(model, numpy_batches(images, labels, 4), torch.device("cpu"))
    y2, p2 = predict(model, numpy_batches(images, labels, 4), torch.device("cpu"))
    assert len(y1) == 13 and p1.shape == (13, 3)
    assert np.array_equal(y1, labels) and np.array_equal(p1, p2)
    assert np.allclose(p1.sum(1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="no images"):
        predict(model, [], torch.device("cpu"))


def test_transforms_shapes_and_randomness():
    images = torch.from_numpy(toy_data()[0][:4])
    x = eval_transform(images)
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    assert torch.equal(x, eval_transform(images))
    tf = TrainTransform(16, AugmentConfig(crop_scale=(0.5, 1.0), hflip=True, vflip=True, color_jitter=0.2))
    torch.manual_seed(0)
    a = tf(images)
    torch.manual_seed(1)
    b = tf(images)
    assert a.shape == x.shape and not torch.equal(a, b)


def test_mixup_counts_for_aas_only_rows_whose_dominant_image_is_real():
    # Real rows are class 0, synthetic rows class 1: whichever image of a mixed pair is counted, a
    # class-1 count would be a synthetic image reaching AAS. Beta(0.2, 0.2) puts lam below 0.5 in about
    # half the batches, where the counted label is the permuted one.
    images, labels = toy_data((24, 24))
    synthetic = torch.from_numpy(labels == 1).long()
    batches = [{"image": torch.from_numpy(images[i::6]), "label": torch.from_numpy(labels[i::6]),
                "synthetic": synthetic[i::6]} for i in range(6)]
    model = create_classifier(ModelConfig(name="resnet10t"), 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    stats = train_one_epoch(model, batches, create_loss("ce", [24, 24]), opt, eval_transform, 2,
                            torch.device("cpu"), mixup_alpha=0.2, generator=gen)
    assert stats.total[1] == 0 and stats.correct[1] == 0
    assert 0 < stats.total[0] < 48  # counted: the rows whose dominant image is a real one


def test_synthetic_rows_weigh_loss_weight_in_the_loss_and_weight_one_trains_as_before():
    import torch.nn.functional as F

    from ioisray.mixup import mixup_batch, mixup_loss

    torch.manual_seed(0)
    images, labels = toy_data((4, 4), size=8)
    synthetic = torch.tensor([0, 1] * 4)
    batch = {"image": torch.from_numpy(images), "label": torch.from_numpy(labels), "synthetic": synthetic}
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the model stays as it is: every epoch sees the same logits
    loss_fn = create_loss("ce", [4, 4])

    def epoch_loss(**kwargs):
        return train_one_epoch(model, [batch], loss_fn, opt, eval_transform, 2, torch.device("cpu"), **kwargs).loss

    with torch.no_grad():
        per_row = F.cross_entropy(model(eval_transform(batch["image"])), batch["label"], reduction="none")
    weights = torch.where(synthetic == 0, 1.0, 0.25)
    assert epoch_loss(synthetic_weight=0.25) == pytest.approx(((weights * per_row).sum() / weights.sum()).item(),
                                                              rel=1e-6)
    assert epoch_loss(synthetic_weight=1.0) == epoch_loss() == pytest.approx(per_row.mean().item(), rel=1e-6)
    # With mixup each target's loss is weighted by its own image's weight, the permuted image's included.
    got = epoch_loss(synthetic_weight=0.25, mixup_alpha=0.4, generator=torch.Generator().manual_seed(3))
    x, a, b, lam = mixup_batch(eval_transform(batch["image"]), torch.stack([batch["label"], 1 - synthetic], 1), 0.4,
                               generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(x)
        want = mixup_loss(loss_fn, logits, a[:, 0], b[:, 0], lam, torch.where(a[:, 1] == 1, 1.0, 0.25),
                          torch.where(b[:, 1] == 1, 1.0, 0.25))
        unweighted = mixup_loss(loss_fn, logits, a[:, 0], b[:, 0], lam)
    assert got == pytest.approx(want.item(), rel=1e-6) and want.item() != pytest.approx(unweighted.item(), rel=1e-4)
