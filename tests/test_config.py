import pytest
import yaml

from ioisray.config import Config, ConfigError, load_config, save_config


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_compose_in_order_and_file_wins(tmp_path):
    write(tmp_path / "base.yaml", {"seed": 1, "train": {"epochs": 5, "lr": 0.1}})
    (tmp_path / "m").mkdir()
    write(tmp_path / "m" / "ldam.yaml", {"method": {"loss": "ldam_drw"}, "train": {"epochs": 7}})
    exp = write(tmp_path / "exp.yaml", {"defaults": ["base.yaml", "m/ldam.yaml"], "train": {"lr": 0.2}})
    cfg = load_config(exp)
    assert (cfg.seed, cfg.train.epochs, cfg.train.lr, cfg.method.loss) == (1, 7, 0.2, "ldam_drw")


def test_overrides_are_typed_and_win(tmp_path):
    exp = write(tmp_path / "exp.yaml", {"train": {"epochs": 5}})
    cfg = load_config(exp, ["train.epochs=3", "train.milestones=[1, 2]", "ray.use_gpu=true",
                            "model.weights=/w.safetensors"])
    assert cfg.train.epochs == 3 and cfg.train.milestones == [1, 2] and cfg.ray.use_gpu is True
    assert cfg.model.weights == "/w.safetensors"


@pytest.mark.parametrize("override, key", [
    ("train.epoch=3", "train.epoch: unknown key"),
    ("train.epochs=abc", "train.epochs"),
    ("method.loss=hinge", "method.loss"),
    ("train.lr=-1", "train.lr"),
    ("data.name=ham10000", "data.root is required"),
    ("data.val_fraction=0.85", "data.val_fraction + data.test_fraction"),
    ("name=a/b", "name"),
    ("model.name=hf-hub:timm/resnet18.a1_in1k", "Hugging Face Hub"),  # would be fetched even unpretrained
    ("data.split_seed=-1", "data.split_seed"),
    ("train.lr=.inf", "train.lr"),
    ("train.augment.crop_scale=[1.2,0.5]", "train.augment.crop_scale"),
    ("name=", "name: needs a value"),
    ("synthesis.budget=1000000000", "synthesis.budget=1000000000 is more than 10,000,000"),
    ("synthesis.budget=balanced", "synthesis.budget must be an integer >= 0 or 'balance'"),
    ("synthesis.max_budget=100", "synthesis.max_budget caps synthesis.budget=balance only"),
    ("synthesis.loss_weight=0", "synthesis.loss_weight"),
    ("synthesis.loss_weight=1.5", "synthesis.loss_weight"),
    ("sampler.guidance_objective=margin", "sampler.guidance_objective"),
    ("sampler.cfg_scale=-1", "sampler.cfg_scale"),
])
def test_bad_keys_and_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert key in str(e.value)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    exp = write(tmp_path / "exp.yaml", {"data": {"image_sise": 32}})
    with pytest.raises(ConfigError, match=r"exp\.yaml.*\n.*data\.image_sise: unknown key"):
        load_config(exp)


def test_unknown_key_in_a_defaults_file_names_that_file(tmp_path):
    write(tmp_path / "parts" / "data.yaml", {"data": {"image_size": 16, "imbalance": 5}})
    exp = write(tmp_path / "exp.yaml", {"defaults": ["parts/data.yaml"], "train": {"epochs": 1}})
    with pytest.raises(ConfigError, match=r"parts/data\.yaml.*\n.*data\.imbalance: unknown key"):
        load_config(exp)



def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")
    write(tmp_path / "a.yaml", {"defaults": ["b.yaml"]})
    write(tmp_path / "b.yaml", {"defaults": ["a.yaml"]})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])


@pytest.mark.parametrize("kind, why", [("folder", "is a directory, not a YAML file"),
                                       ("binary", "is not a text (UTF-8) YAML file"),
                                       ("nul", "is not a text (UTF-8) YAML file")])
def test_a_folder_or_binary_file_given_as_config_is_named(tmp_path, capsys, kind, why):
    from ioisray.cli import main

    path = tmp_path / ("configs" if kind == "folder" else "weights.safetensors")
    if kind == "folder":
        path.mkdir()
    else:  # bytes that are not UTF-8 at all, or UTF-8 with NULs (text tools take both for binary)
        path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00" * 8 if kind == "binary" else b"seed: 1\x00\x00\x01")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and why in str(e.value) and "\n" not in str(e.value)
    exp = write(tmp_path / "exp.yaml", {"defaults": [path.name], "seed": 2})  # also as a `defaults:` entry
    with pytest.raises(ConfigError) as e:
        load_config(exp)
    assert str(path) in str(e.value) and why in str(e.value)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and why in err and "Traceback" not in err


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(None, ["train.epochs=4", "method.loss=focal", "data.imbalance_ratio=10"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    assert not [p for p in (tmp_path / "run").iterdir() if p.name != "config.yaml"]  # no temp files left


def test_repository_configs_are_valid():
    from pathlib import Path

    configs = Path(__file__).resolve().parent.parent / "configs"
    top = [p for p in configs.glob("*.yaml") if p.name != "base.yaml"]
    assert top
    for p in top:
        assert isinstance(load_config(p, ["data.root=/data"]), Config), p


def test_two_nccl_ranks_are_never_packed_onto_one_gpu():
    with pytest.raises(ConfigError, match=r"ray.resources_per_worker.GPU=0.5 with ray.num_workers=2"):
        load_config(None, ["ray.use_gpu=true", "ray.num_workers=2", "ray.resources_per_worker={GPU: 0.5}"])
    # One worker may share its GPU (with the synthesis actors), and CPU workers hold no GPU at all.
    assert load_config(None, ["ray.use_gpu=true", "ray.num_workers=1", "ray.resources_per_worker={GPU: 0.5}"])
    assert load_config(None, ["ray.num_workers=2", "ray.resources_per_worker={GPU: 0.5}"])


def test_local_paths_become_absolute_and_uris_stay(tmp_path):
    from ioisray.config import with_absolute_paths

    cfg = load_config(None, ["data.name=csv", "data.csv=lists/labels.csv", "model.weights=w.safetensors",
                             "diffusion.model_dir=s3://bucket/unet", "baseline=runs/ce", "synthesis.filter=0.5",
                             "synthesis.filter_model=runs/judge"])
    out = with_absolute_paths(cfg, tmp_path)
    assert out.synthesis.filter_model == str(tmp_path / "runs/judge")
    assert out.output_dir == str(tmp_path / "outputs") and out.data.csv == str(tmp_path / "lists/labels.csv")
    assert out.model.weights == str(tmp_path / "w.safetensors") and out.baseline == str(tmp_path / "runs/ce")
    assert out.diffusion.model_dir == "s3://bucket/unet" and out.data.root is None
    assert with_absolute_paths(out, "/elsewhere") == out  # absolute paths are kept


def test_new_options_default_to_what_runs_did_before_them():
    cfg = load_config(None, [])
    assert (cfg.sampler.cfg_scale, cfg.sampler.guidance_objective) == (1.0, "log_prob")
    assert (cfg.synthesis.loss_weight, cfg.synthesis.budget, cfg.synthesis.max_budget) == (1.0, 0, None)
    assert cfg.synthesis.filter == 0.0 and cfg.synthesis.filter_model is None
    # Every new key says what it does in the schema.
    from ioisray.config.schema import SynthesisConfig

    schema = Config.model_json_schema()["$defs"]
    for key in ("cfg_scale", "guidance_objective"):
        assert schema["SamplerConfig"]["properties"][key]["description"]
    for key in ("loss_weight", "budget", "max_budget", "filter", "filter_model"):
        assert SynthesisConfig.model_fields[key].description


def test_balance_budget_is_a_config_value():
    cfg = load_config(None, ["synthesis.mode=online", "synthesis.budget=balance", "synthesis.max_budget=500"])
    assert cfg.synthesis.budget == "balance" and cfg.synthesis.max_budget == 500
    assert load_config(None, ["synthesis.mode=offline", "synthesis.budget=balance"]).synthesis.max_budget is None
