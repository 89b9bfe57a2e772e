import os
import pickle

import numpy as np
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
    # Local files, and files named by URI (what every node of a cluster reaches).
    for f in ("w.safetensors", "w.pth", f"file://{tmp_path}/w.safetensors", f"file://{tmp_path}/w.pth"):
        torch.manual_seed(1)
        m = create_classifier(ModelConfig(name="resnet10t", weights=f if "://" in f else str(tmp_path / f)), 5)
        assert torch.equal(m.conv1[0].weight, imagenet.conv1[0].weight)
        assert m.fc.weight.shape == (5, imagenet.fc.weight.shape[1])


def test_bad_model_inputs_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="model.name"):
        create_classifier(ModelConfig(name="resnet_does_not_exist"), 3)
    with pytest.raises(FileNotFoundError, match="model.weights"):
        create_classifier(ModelConfig(name="resnet10t", weights=str(tmp_path / "nope.pth")), 3)
    with pytest.raises(FileNotFoundError, match="model.weights: no such file: file://"):
        create_classifier(ModelConfig(name="resnet10t", weights=f"file://{tmp_path}/nope.pth"), 3)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="model.weights"):
        create_classifier(ModelConfig(name="resnet10t", weights=str(tmp_path / "other.safetensors")), 3)
    torch.save([torch.zeros(2)], tmp_path / "list.pth")  # loads without unpickling anything, but no dict
    for key in ("weights", "pretrained_file"):
        with pytest.raises(ValueError, match=f"^model.{key}: {tmp_path / 'list.pth'} does not hold a state dict$"):
            create_classifier(ModelConfig(name="resnet10t", **{key: str(tmp_path / "list.pth")}), 3)


class MakesADirectory:
    """Unpickling this calls os.mkdir(marker): the payload a hostile .pth file could carry."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("kind", ["truncated safetensors", "random bytes", "torch.save payload", "pickle payload",
                                  "truncated pth", "folder"])
def test_a_corrupt_or_hostile_weights_file_is_one_line(tmp_path, kind):
    marker = tmp_path / "payload_ran"
    path = tmp_path / ("w.safetensors" if "safetensors" in kind else "w.pth")
    if kind == "truncated safetensors":
        save_file({"x": torch.zeros(64)}, str(path))
        path.write_bytes(path.read_bytes()[:40])
    elif kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "torch.save payload":
        torch.save({"state_dict": MakesADirectory(str(marker))}, path)
    elif kind == "pickle payload":  # a bare pickle, as torch.load's legacy format reads it
        path.write_bytes(pickle.dumps(MakesADirectory(str(marker)), protocol=2))
    elif kind == "truncated pth":
        torch.save({"conv.weight": torch.zeros(8)}, path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.mkdir()
    with pytest.raises(ValueError) as e:
        create_classifier(ModelConfig(name="resnet10t", weights=str(path)), 3)
    msg = str(e.value)
    assert msg.startswith(f"model.weights: {path} is not a weights file (") and msg.endswith(")"), msg
    assert "\n" not in msg and len(msg) < 300 + len(str(path)), msg
    assert not marker.exists()  # the payload did not run


@pytest.mark.parametrize("name", ["resnet10t", "convnext_atto"])
def test_cosine_head_bounds_logits_for_ldam(name):
    m = create_classifier(ModelConfig(name=name), 4, cosine_head=True)
    logits = m(100 * torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 4) and logits.abs().max() <= 1.0 + 1e-5
    logits.sum().backward()  # trainable end to end


def test_pretrained_file_goes_through_timms_loader_and_replaces_the_head(tmp_path):
    # An "ImageNet" checkpoint as timm publishes it: 1000-class head. timm's own loader drops that
    # head for a model with our class count; every other tensor is the file's.
    torch.manual_seed(0)
    imagenet = create_classifier(ModelConfig(name="resnet10t"), 1000)
    save_file(imagenet.state_dict(), str(tmp_path / "in1k.safetensors"))
    for source in (str(tmp_path / "in1k.safetensors"), f"file://{tmp_path}/in1k.safetensors"):
        torch.manual_seed(1)
        m = create_classifier(ModelConfig(name="resnet10t", pretrained_file=source), 7)
        own, theirs = m.state_dict(), imagenet.state_dict()
        backbone = [k for k in own if not k.startswith("fc.")]
        assert backbone and all(torch.equal(own[k], theirs[k]) for k in backbone)
        assert m.fc.weight.shape == (7, imagenet.fc.weight.shape[1])


def test_pretrained_without_network_or_file_is_one_line_naming_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.pretrained_file: no such file"):
        create_classifier(ModelConfig(name="resnet10t", pretrained_file=str(tmp_path / "nope.safetensors")), 3)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"^model.pretrained_file: .*other.safetensors does not hold timm weights"):
        create_classifier(ModelConfig(name="resnet10t", pretrained_file=str(tmp_path / "other.safetensors")), 3)
    with pytest.raises(ValueError, match="model.weights and model.pretrained"):
        ModelConfig(name="resnet10t", weights="w.pth", pretrained=True)


def test_pretrained_on_a_machine_without_network_is_one_line_before_anything_is_saved(tmp_path, capsys,
                                                                                     monkeypatch):
    import huggingface_hub.constants as hub

    from ioisray.cli import main

    # What huggingface_hub does without network (HF_HUB_OFFLINE=1, read when it is imported), with
    # an empty cache: it raises at once instead of retrying a connection.
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    code = main(["train", "configs/digits_ce.yaml", f"output_dir={tmp_path}", "name=hub", "model.pretrained=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1, err
    assert err[0].startswith("ioisray: error: model.pretrained: timm could not fetch pretrained weights for "
                             "'resnet10t'") and "model.pretrained_file=" in err[0]
    assert not (tmp_path / "hub").exists()
