"""Batched training augmentation: one call per batch, each image with its own random parameters,
the same crops and flips torchvision would make with those parameters."""
import math
from types import SimpleNamespace

import torch
import torchvision.transforms.v2.functional as TF

from ioisray.transforms import (TrainTransform, color_jitter, crop_boxes, eval_transform, normalise,
                                resized_crop_and_flip)


def augment(crop=(1.0, 1.0), hflip=False, vflip=False, jitter=0.0):
    return SimpleNamespace(crop_scale=crop, hflip=hflip, vflip=vflip, color_jitter=jitter)


def random_images(n=16, size=16, seed=0):
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_without_augmentation_it_is_the_eval_transform():
    images = random_images()
    assert torch.allclose(TrainTransform(16, augment())(images), eval_transform(images), atol=1e-6)


def test_flips_are_exact_mirrors_drawn_per_image():
    images = random_images(n=64)
    torch.manual_seed(0)
    out = TrainTransform(16, augment(hflip=True))(images)
    plain, mirrored = eval_transform(images), eval_transform(images).flip(3)
    same = [(o - p).abs().max() < 1e-5 for o, p in zip(out, plain)]
    flipped = [(o - m).abs().max() < 1e-5 for o, m in zip(out, mirrored)]
    assert all(s or f for s, f in zip(same, flipped))  # each image is itself or its mirror image
    assert 16 < sum(flipped) < 48  # and about half of them, independently, are mirrored


def test_crop_boxes_follow_random_resized_crop():
    torch.manual_seed(0)
    boxes = crop_boxes(4000, 32, 32, (0.5, 1.0), torch.device("cpu"))
    top, left, h, w = boxes.unbind(1)
    assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 32).all() and (left + w <= 32).all()
    area = h * w / 1024
    assert area.min() >= 0.45 and area.max() <= 1.0  # area fractions in the scale range (up to rounding)
    ratio = w / h
    assert ratio.min() >= 3 / 4 - 0.1 and ratio.max() <= 4 / 3 + 0.1
    assert len({tuple(b.tolist()) for b in boxes}) > 500  # independent draws, not one box for all


def test_resized_crop_matches_torchvision_inside_the_crop():
    images = random_images(n=3, size=32).permute(0, 3, 1, 2).float() / 255
    boxes = torch.tensor([[4.0, 6.0, 20.0, 24.0], [0.0, 0.0, 32.0, 32.0], [10.0, 2.0, 17.0, 13.0]])
    no = torch.zeros(3, dtype=torch.bool)
    ours = resized_crop_and_flip(images, boxes, no, no, 32)
    for img, box, out in zip(images, boxes.int().tolist(), ours):
        ref = TF.resized_crop(img, *box, [32, 32], antialias=False)
        # Identical but for samples within half a pixel of the crop's edge: compare the interior.
        assert (out[:, 2:-2, 2:-2] - ref[:, 2:-2, 2:-2]).abs().max() < 1e-4
    flipped = resized_crop_and_flip(images, boxes, torch.ones(3, dtype=torch.bool), no, 32)
    assert torch.allclose(flipped, ours.flip(3), atol=1e-5)


def test_color_jitter_factors_and_order_are_per_image():
    torch.manual_seed(0)
    x = torch.rand(256, 3, 8, 8)
    out = color_jitter(x, 0.3)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    change = (out - x).abs().mean(dim=(1, 2, 3))
    assert change.std() > 0.005  # images got different factors
    # Brightness alone (a constant-grey image is unchanged by contrast and saturation): factor in range.
    grey = torch.full((512, 3, 4, 4), 0.5)
    factors = color_jitter(grey, 0.3)[:, 0, 0, 0] / 0.5
    assert factors.min() >= 0.7 - 1e-5 and factors.max() <= 1.3 + 1e-5
    assert factors.std() > 0.1


def test_train_transform_runs_in_one_batched_call_with_every_option():
    images = random_images(n=8)
    tf = TrainTransform(16, augment(crop=(0.5, 1.0), hflip=True, vflip=True, jitter=0.2))
    torch.manual_seed(0)
    a = tf(images)
    torch.manual_seed(0)
    b = tf(images)
    torch.manual_seed(1)
    c = tf(images)
    assert a.shape == (8, 3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)  # seeded like the rest of the epoch's randomness
    assert math.isfinite(a.sum().item())


def test_normalise_uses_imagenet_statistics():
    x = torch.zeros(1, 3, 2, 2)
    assert torch.allclose(normalise(x)[0, :, 0, 0], -torch.tensor([0.485, 0.456, 0.406]) / torch.tensor(
        [0.229, 0.224, 0.225]))



def test_constants_are_made_once_per_device_and_dtype_and_shared():
    # A tensor built from Python values on a GPU is a host copy that waits for the GPU: the statistics,
    # grey weights and whole-image boxes are made on the first batch only.
    from ioisray.transforms import on_device

    tf = TrainTransform(16, augment(hflip=True, jitter=0.4))
    images = random_images(size=20)  # resized too: the whole-image box is used
    tf(images)
    made = on_device.cache_info().currsize
    before = on_device.cache_info().misses
    for _ in range(3):
        tf(images)
        normalise(torch.rand(2, 3, 4, 4))
    assert on_device.cache_info().misses == before and made >= 4  # mean, std, grey weights, box
    assert normalise(torch.rand(2, 3, 4, 4, dtype=torch.float64)).dtype == torch.float64  # one per dtype
    assert on_device.cache_info().misses == before + 2


def test_a_constant_first_made_in_inference_mode_can_be_saved_for_backward():
    # Evaluation (inference mode) may be the first to ask for a constant that the sampler's guidance later
    # saves for its gradient (x / std); an inference tensor there would fail the backward pass.
    from ioisray.transforms import on_device

    on_device.cache_clear()
    with torch.inference_mode():
        normalise(torch.rand(1, 3, 2, 2))
    x = torch.rand(1, 3, 2, 2, requires_grad=True)
    normalise(x).sum().backward()
    assert torch.allclose(x.grad[0, :, 0, 0], 1 / torch.tensor([0.229, 0.224, 0.225]))
