import pytest
import torch
from safetensors.torch import save_file

from ioisray.config import ModelConfig
from ioisray.models import create_classifier


def test_local_weights_load_backbone_and_replace_head(tmp_path):
    torch.manual_seed(0)
    imagenet = create_classifier(ModelConfig(name="resnet10t"), 1000)
    save_file(imagenet.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": imagenet.state_dict()}, tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        torch.manual_seed(1)
        m = create_classifier(ModelConfig(name="resnet10t", weights=str(tmp_path / f)), 5)
        assert torch.equal(m.conv1[0].weight, imagenet.conv1[0].weight)
        assert m.fc.weight.shape == (5, imagenet.fc.weight.shape[1])


def test_bad_model_inputs_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="model.name"):
        create_classifier(ModelConfig(name="resnet_does_not_exist"), 3)
    with pytest.raises(FileNotFoundError, match="model.weights"):
        create_classifier(ModelConfig(name="resnet10t", weights=str(tmp_path / "nope.pth")), 3)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="model.weights"):
        create_classifier(ModelConfig(name="resnet10t", weights=str(tmp_path / "other.safetensors")), 3)


@pytest.mark.parametrize("name", ["resnet10t", "convnext_atto"])
def test_cosine_head_bounds_logits_for_ldam(name):
    m = create_classifier(ModelConfig(name=name), 4, cosine_head=True)
    logits = m(100 * torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 4) and logits.abs().max() <= 1.0 + 1e-5
    logits.sum().backward()  # trainable end to end
