"""What each config key is (`ioisray config describe`) and "did you mean" for wrong keys and values."""
import dataclasses
import inspect

import pytest
import yaml
from cli_utils import ROOT, run_cli
from pydantic import BaseModel

from ioisray.cli import main
from ioisray.config import Config, ConfigError, load_config, schema
from ioisray.config.describe import PLACEHOLDER, all_keys, default_text, describe
from ioisray.sampler_config import SamplerConfig

DIGITS = str(ROOT / "configs/digits_ce.yaml")


def test_every_field_of_the_schema_has_a_description():
    # Every model of the schema module, reachable from Config or not, so a new field cannot skip it.
    models = [m for _, m in inspect.getmembers(schema, inspect.isclass)
              if issubclass(m, BaseModel) and m.__module__ == schema.__name__ and m.model_fields]
    assert Config in models and schema.SearchDimension in models
    missing = [f"{m.__name__}.{name}" for m in models for name, f in m.model_fields.items()
               if not (f.description or "").strip()]
    missing += [f"SamplerConfig.{f.name}" for f in dataclasses.fields(SamplerConfig)
                if not f.metadata.get("description", "").strip()]
    assert not missing, f"fields without Field(description=...): {missing}"
    assert all(k.description.strip() for k in all_keys())


def test_describe_reports_each_keys_real_default():
    cfg = Config()
    leaves = [k for k in all_keys() if not k.is_section and PLACEHOLDER not in k.key]
    assert len(leaves) > 100
    for k in leaves:
        value = cfg
        for part in k.key.split("."):
            value = getattr(value, part)
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        assert k.default == default_text(value), k.key

    def flat(d, prefix=""):  # the leaves of the config as pydantic dumps it
        for name, v in d.items():
            yield from flat(v, f"{prefix}{name}.") if isinstance(v, dict) and v else [f"{prefix}{name}"]

    assert {k.key for k in leaves} == set(flat(cfg.model_dump(mode="json")))
    assert all(schema.is_config_key(k.key) for k in all_keys() if PLACEHOLDER not in k.key)


def test_describe_filters_by_prefix_and_names_types():
    keys = {k.key: k for k in describe("train.augment")}
    assert set(keys) == {"train.augment", *(f"train.augment.{n}" for n in schema.AugmentConfig.model_fields)}
    assert keys["train.augment.hflip"].type == "bool"
    assert describe("synthesis.budget")[0].type == "int or balance"
    assert describe("synthesis.max_retries")[0].type == "int, >= 0"
    assert describe("method.sampling")[0].type == "one of: natural, class_balanced"
    assert describe("train.precision")[0].type == "one of: bf16, fp16, fp32 or null"
    with pytest.raises(ConfigError, match=r"'synthesys' is not a config key or section \(did you mean synthesis\?\)"):
        describe("synthesys")


def test_config_describe_on_the_command_line(capsys):
    assert main(["config", "describe", "synthesis"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if not line.startswith(" ")]
    assert lines and all(line.startswith("synthesis") for line in lines)
    budget = schema.SynthesisConfig.model_fields["budget"]
    assert "synthesis.budget  (int or balance; default 0)" in out
    assert " ".join(budget.description.split()[:6]) in " ".join(out.split())
    assert main(["config", "describe", "synthesis.budjet"]) == 2
    assert capsys.readouterr().err.strip() == ("ioisray: error: 'synthesis.budjet' is not a config key or section "
                                               "(did you mean synthesis.budget?)")


def test_config_describe_through_the_installed_entry_point():
    done = run_cli("config", "describe", timeout=60)
    assert done.returncode == 0, done.stderr
    described = [line.split()[0] for line in done.stdout.splitlines() if line and not line.startswith(" ")]
    assert described == [k.key for k in all_keys()]


@pytest.mark.parametrize("override, hint", [
    ("synthesis.budjet=3", "synthesis.budjet: unknown key (did you mean synthesis.budget?)"),
    ("train.augment.hfip=false", "train.augment.hfip: unknown key (did you mean train.augment.hflip?)"),
    ("sampler.stepz=3", "sampler.stepz: unknown key (did you mean sampler.steps?)"),
    ("traim.epochs=3", "traim: unknown key (did you mean train?)"),
    ("train.budget=3", "train.budget: unknown key (did you mean synthesis.budget?)"),
    ("method.loss=ldam", "(got 'ldam') (did you mean 'ldam_drw'?)"),
    ("train.precision=bf61", "(got 'bf61') (did you mean 'bf16'?)"),
    ("sampler.solver=DDIM", "(got 'DDIM') (did you mean 'ddim'?)"),
    ("tune.search_space={aas.temprature: {grid: [1, 2]}}", "'aas.temprature' is not a config key (did you mean "
                                                           "aas.temperature?)"),
])
def test_unknown_keys_and_values_suggest_the_closest(capsys, override, hint):
    assert main(["train", DIGITS, override, "--print-config"]) == 2
    assert hint in capsys.readouterr().err


def test_no_suggestion_for_a_key_like_no_other(capsys):
    assert main(["train", DIGITS, "qqqq.zzzz=1"]) == 2
    err = capsys.readouterr().err
    assert "qqqq: unknown key" in err and "did you mean" not in err


def test_unknown_key_in_a_yaml_file_suggests_the_closest(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"synthesis": {"mode": "online", "budjet": 8}}))
    with pytest.raises(ConfigError, match=r"exp\.yaml.*\n  synthesis\.budjet: unknown key \(did you mean "
                                          r"synthesis\.budget\?\)"):
        load_config(path)
