import pytest
import torch

from ioisray.models.diffusion import PRESETS, count_parameters, create_unet, load_unet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("preset, low, high", [
    ("tiny", 0.5e6, 3e6),
    ("small32", 4e6, 5e6),
    ("small64", 25e6, 32e6),
    ("adm128", 0.9 * 385e6, 1.1 * 385e6),  # builds in ~6 s on CPU; no forward is run
])
def test_preset_parameter_counts(preset, low, high):
    unet = create_unet(preset, num_classes=7)
    assert low <= count_parameters(unet) <= high
    assert unet.config.num_class_embeds == 7
    assert unet.config.sample_size == PRESETS[preset]["sample_size"]


def test_folder_that_is_not_a_diffusers_model_names_the_option(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="diffusion.model_dir"):
        load_unet(str(tmp_path), num_classes=3)


def test_tiny_forward_with_class_labels():
    unet = create_unet("tiny", num_classes=5).eval()
    x, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 5
    with torch.no_grad():
        out = unet(x, torch.full((8,), 10), class_labels=labels).sample
    assert out.shape == (8, 3, 32, 32)
    # The label actually conditions the output.
    with torch.no_grad():
        other = unet(x, 10, class_labels=(labels + 1) % 5).sample
    assert not torch.allclose(out, other)


def test_image_size_override_and_unknown_preset():
    assert create_unet("tiny", 3, image_size=16).config.sample_size == 16
    with pytest.raises(ValueError, match="multiple of 4"):
        create_unet("tiny", 3, image_size=18)
    with pytest.raises(ValueError, match="diffusion.preset.*adm128"):
        create_unet("huge", 3)


def test_save_and_load_round_trip_checks_class_count(tmp_path):
    torch.manual_seed(0)
    unet = create_unet("tiny", 4, image_size=16)
    unet.save_pretrained(tmp_path / "unet")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_unet(str(tmp_path / "unet"), 4)
    for (name, a), (_, b) in zip(unet.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match=r"unet.*4 classes.*has 6"):
        load_unet(str(tmp_path / "unet"), 6)
    with pytest.raises(FileNotFoundError):
        load_unet(str(tmp_path / "missing"), 4)


def test_unconditional_unet_rejected(tmp_path):
    from diffusers import UNet2DModel

    UNet2DModel(**PRESETS["tiny"]).save_pretrained(tmp_path / "uncond")
    with pytest.raises(ValueError, match="not class-conditional"):
        load_unet(str(tmp_path / "uncond"), 4)


def test_model_folder_carries_its_noise_schedule(tmp_path):
    from diffusers import DDPMScheduler

    from ioisray.models.diffusion import load_noise_scheduler, save_diffusion_model
    from ioisray.sampler import make_train_scheduler

    unet = create_unet("tiny", 4, image_size=16)
    save_diffusion_model(unet, make_train_scheduler("squaredcos_cap_v2", "v_prediction"), tmp_path / "m")
    loaded = load_noise_scheduler(tmp_path / "m")
    assert loaded.config.prediction_type == "v_prediction" and loaded.config.beta_schedule == "squaredcos_cap_v2"
    assert load_unet(str(tmp_path / "m"), 4).config.sample_size == 16
    # A plain UNet folder (or one saved before schedules were recorded) is the paper's: linear, epsilon.
    unet.save_pretrained(tmp_path / "plain")
    plain = load_noise_scheduler(tmp_path / "plain")
    assert plain.config.prediction_type == "epsilon" and plain.config.beta_schedule == "linear"
    DDPMScheduler(prediction_type="sample").save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"diffusion.model_dir.*'sample'"):
        load_noise_scheduler(tmp_path / "plain")


def test_null_class_round_trip_and_sampling_range(tmp_path):
    from ioisray.models.diffusion import num_data_classes, null_class, save_diffusion_model
    from ioisray.sampler import SamplerConfig, make_train_scheduler, sample

    unet = create_unet("tiny", 3, image_size=8, null_class_label=True)
    assert unet.config.num_class_embeds == 4 and null_class(unet) == 3 and num_data_classes(unet) == 3
    save_diffusion_model(unet, make_train_scheduler(), tmp_path / "cfg")
    loaded = load_unet(str(tmp_path / "cfg"), 3)  # 4 embeddings, but 3 classes: the folder says so
    assert null_class(loaded) == 3
    with pytest.raises(ValueError, match="diffusion.model_dir.*built for 3 classes"):
        load_unet(str(tmp_path / "cfg"), 4)
    # Without the marker, 4 embeddings mean 4 classes (every model saved before label dropout).
    (tmp_path / "cfg" / "class_conditioning.json").unlink()
    assert null_class(load_unet(str(tmp_path / "cfg"), 4)) is None
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        sample(unet.eval(), [3], [0], SamplerConfig(steps=1))  # the null class is no class to sample


def test_label_dropout_replaces_labels_by_the_null_class_at_its_rate():
    from ioisray.recipes.pretrain_diffusion import drop_labels

    torch.manual_seed(0)
    y = torch.arange(20_000) % 5
    dropped = drop_labels(y, null=5, p=0.2)
    share = (dropped == 5).float().mean().item()
    assert 0.18 < share < 0.22
    assert torch.equal(dropped[dropped != 5], y[dropped != 5])  # the others are untouched
    assert torch.equal(drop_labels(y, null=None, p=0.2), y)  # a model without a null class


def test_label_dropout_refuses_to_fine_tune_a_model_without_null_class(tmp_path):
    from ioisray.config import ConfigError, load_config
    from ioisray.recipes.pretrain_diffusion import initial_unet

    create_unet("tiny", 3, image_size=16).save_pretrained(tmp_path / "u", safe_serialization=True)
    cfg = load_config("configs/digits.yaml", [f"diffusion.model_dir={tmp_path / 'u'}", "diffusion.image_size=16",
                                              "diffusion.label_dropout=0.1"])
    with pytest.raises(ConfigError, match="diffusion.label_dropout"):
        initial_unet(cfg, 3, 16)
    fresh = initial_unet(load_config("configs/digits.yaml", ["diffusion.label_dropout=0.1"]), 3, 16)
    assert fresh.config.num_class_embeds == 4


def test_cfg_scale_is_refused_before_anything_starts_for_a_model_without_null_class(tmp_path):
    from ioisray.config import ConfigError, load_config
    from ioisray.data.setup import setup_data
    from ioisray.recipes.prerequisites import diffusion_model

    plain = tmp_path / "plain"
    create_unet("tiny", 10, image_size=16).save_pretrained(plain, safe_serialization=True)
    online = ["synthesis.mode=online", "synthesis.budget=8", "sampler.cfg_scale=2.5"]
    cfg = load_config("configs/digits.yaml", online + [f"diffusion.model_dir={plain}"])
    with pytest.raises(ConfigError, match=f"sampler.cfg_scale=2.5 needs a diffusion model with a null class, but "
                                          f"{plain} has none"):
        diffusion_model(cfg, *setup_data(cfg))
    # w = 1 keeps using it; with no model given, the run's own model needs label dropout.
    plain_cfg = load_config("configs/digits.yaml", online[:2] + [f"diffusion.model_dir={plain}"])
    assert diffusion_model(plain_cfg, *setup_data(plain_cfg)) == str(plain)
    with pytest.raises(ConfigError, match="sampler.cfg_scale=2.5.*diffusion.label_dropout"):
        load_config("configs/digits.yaml", online)
    assert load_config("configs/digits.yaml", online + ["diffusion.label_dropout=0.1"]).sampler.cfg_scale == 2.5
