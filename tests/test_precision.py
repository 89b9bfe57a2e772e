"""Mixed precision on the CPU: what each device gets by default, and that a bf16 training step gives
the same picture as fp32 on the same batch."""
import copy

import numpy as np
import pytest
import torch

from ioisray import precision
from ioisray.config import ModelConfig, load_config
from ioisray.engine import numpy_batches, predict, train_one_epoch
from ioisray.losses import create_loss
from ioisray.models import create_classifier
from ioisray.transforms import eval_transform
from test_engine import toy_data

CPU = torch.device("cpu")


def test_defaults_follow_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert precision.resolve_precision(None, CPU) == "bf16"
    assert precision.sampler_dtype(None, CPU) == "bfloat16"
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert precision.resolve_precision(None, CPU) == "fp32"
    assert precision.sampler_dtype(None, CPU) == "float32"
    assert precision.resolve_precision("bf16", CPU) == "bf16"  # asked for: given, even if emulated
    assert precision.sampler_dtype("bfloat16", CPU) == "bfloat16"


def test_a_gpu_that_only_emulates_bf16_defaults_to_fp32(monkeypatch):
    # torch counts emulated bf16 as supported by default; a V100 or T4 would then train slower in bf16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert not precision.native_bf16(torch.device("cuda"))
    assert precision.resolve_precision(None, torch.device("cuda")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere on
    assert precision.resolve_precision(None, torch.device("cuda")) == "bf16"


def test_fp16_needs_cuda_and_only_fp16_scales_gradients():
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        precision.resolve_precision("fp16", CPU)
    with pytest.raises(ValueError, match="train.precision"):
        precision.resolve_precision("fp8", CPU)
    assert not precision.grad_scaler(CPU, "bf16").is_enabled()
    assert precision.grad_scaler(torch.device("cuda"), "fp16").is_enabled() == torch.cuda.is_available()


def test_config_keys_default_to_the_device():
    cfg = load_config(None, ["train.precision=bf16", "sampler.compile=true", "train.channels_last=true"])
    assert (cfg.train.precision, cfg.sampler.compile, cfg.train.channels_last) == ("bf16", True, True)
    default = load_config(None)
    assert default.train.precision is None and default.sampler.dtype is None and default.sampler.compile is None


def test_a_bf16_step_gives_finite_loss_and_metrics_close_to_fp32(one_torch_thread):
    images, labels = toy_data((16, 16, 16))
    torch.manual_seed(0)
    model = create_classifier(ModelConfig(name="resnet10t"), 3)
    results = {}
    for p in ("fp32", "bf16"):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        stats = train_one_epoch(m, numpy_batches(images, labels, 48), create_loss("ce", [16, 16, 16]), opt,
                                eval_transform, 3, CPU, precision=p)
        # Evaluation is float32 whatever the training precision (engine.predict).
        _, probs = predict(m, numpy_batches(images, labels, 48), CPU)
        results[p] = (stats, probs)
    (s32, p32), (s16, p16) = results["fp32"], results["bf16"]
    assert np.isfinite(s16.loss) and abs(s16.loss - s32.loss) < 0.05 * s32.loss
    assert s16.total.tolist() == s32.total.tolist() == [16, 16, 16]
    assert abs(int(s16.correct.sum()) - int(s32.correct.sum())) <= 4  # of 48 images
    assert np.abs(p16 - p32).max() < 0.05  # probabilities after the same step in each precision


def test_a_last_batch_of_one_image_is_skipped_not_a_batchnorm_crash():
    images, labels = toy_data((5, 2, 2))  # 9 images in batches of 4: the last holds one
    model = create_classifier(ModelConfig(name="resnet10t"), 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    stats = train_one_epoch(model, numpy_batches(images, labels, 4), create_loss("ce", [5, 2, 2]), opt,
                            eval_transform, 3, CPU)
    assert stats.total.sum() == 8 and np.isfinite(stats.loss)


def test_an_fp16_step_with_its_gradient_scaler_runs_and_matches_fp32(one_torch_thread):
    # The GPU path of train.precision=fp16 (autocast in float16 plus an active GradScaler), executed on
    # the CPU, where both exist: the scaled loss is unscaled before the step, so the step is fp32's.
    images, labels = toy_data((16, 16, 16))
    torch.manual_seed(0)
    model = create_classifier(ModelConfig(name="resnet10t"), 3)
    before = copy.deepcopy(model.state_dict())
    runs = {}
    for p in ("fp32", "fp16"):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=p == "fp16")
        stats = train_one_epoch(m, numpy_batches(images, labels, 24), create_loss("ce", [16, 16, 16]), opt,
                                eval_transform, 3, CPU, precision=p, scaler=scaler)
        runs[p] = (stats, m.state_dict(), scaler)
    (s32, w32, _), (s16, w16, scaler) = runs["fp32"], runs["fp16"]
    assert scaler.is_enabled() and scaler.get_scale() == 2.0**10  # used, and no overflow to back off from
    assert np.isfinite(s16.loss) and abs(s16.loss - s32.loss) < 0.05 * s32.loss
    moved = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], w16[k])]
    assert moved  # the scaled steps were taken, not skipped
    step32 = torch.cat([(w32[k] - before[k]).flatten() for k in moved])
    step16 = torch.cat([(w16[k] - before[k]).flatten() for k in moved])
    assert torch.nn.functional.cosine_similarity(step16, step32, dim=0) > 0.9  # unscaled: fp32's step
