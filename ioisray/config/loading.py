"""Loading a config: YAML files composed with `defaults:`, `key=value` overrides, strict validation.

A config file may list other YAML files under `defaults:` (paths relative to it); they are merged in
order, then the file itself on top, then the command-line overrides. Unknown keys and bad types are
errors that name the key and the file. The resolved config is saved with every run (`save_config`).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ioisray.atomic import atomic_write_text
from ioisray.config.describe import hint, suggest_keys, suggest_values
from ioisray.config.schema import Config, ConfigError, is_config_key, section_fields


def _read_text(path: Path) -> str:
    """A config file's text. A folder, a binary file (say a weights file given in its place) or a
    FIFO (which would block the read) is a ConfigError naming it, not a traceback or a bare decode
    error."""
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, not a YAML file")
    if path.exists() and not path.is_file():
        raise ConfigError(f"{path} is not a regular file, not a YAML file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:  # NUL bytes: binary, even where they happen to decode
        raise ConfigError(f"{path} is not a text (UTF-8) YAML file")
    return text


def _read_yaml(path: Path) -> dict:
    text = _read_text(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _unknown_keys(data: dict, model: Any = None, prefix: str = "") -> list[str]:
    """Dotted keys of `data` that are not settings (dict-valued settings are not looked into)."""
    fields = section_fields(model or Config)
    out = []
    for k, v in data.items():
        if k not in fields:
            out.append(f"{prefix}{k}")
            continue
        if isinstance(v, dict) and section_fields(fields[k]) is not None:
            out += _unknown_keys(v, fields[k], f"{prefix}{k}.")
    return out


def _compose(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: `defaults` include cycle")
    data = _read_yaml(path)
    defaults = data.pop("defaults", []) or []
    unknown = _unknown_keys(data)
    if unknown:  # named here, with the file that holds them, rather than after the files are merged
        raise ConfigError(f"invalid config ({path}):\n" + "\n".join(f"  {k}: unknown key{hint(suggest_keys(k))}"
                                                                  for k in unknown))
    if not isinstance(defaults, list):
        raise ConfigError(f"{path}: `defaults` must be a list of YAML file paths")
    baseline = data.get("baseline")
    if isinstance(baseline, str) and baseline.endswith((".yaml", ".yml")) and not Path(baseline).is_absolute():
        # A baseline config named in a config file is read where that file is, like its `defaults:`,
        # whatever the working directory (a path that exists from the working directory is kept).
        beside = path.parent / baseline
        if beside.is_file() and not Path(baseline).is_file():
            data["baseline"] = str(beside)
    merged: dict = {}
    for d in defaults:
        merged = _merge(merged, _compose(path.parent / str(d), seen + (path,)))
    return _merge(merged, data)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides to a copy of `raw`; values are parsed as YAML (so `3`, `0.1`,
    `true`, `[1, 2]` work)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node = node.setdefault(p, {})
        try:
            node[parts[-1]] = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            node[parts[-1]] = value
    return out


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        unknown = e["type"] in ("extra_forbidden", "unexpected_keyword_argument")
        if unknown:
            lines.append(f"  {key}: unknown key{hint(suggest_keys(e['loc']))}")
        elif e.get("input") is None:  # `key=` (empty) means "none", which only optional keys take
            lines.append(f"  {key}: needs a value (it was given none: `{key}=` with nothing after it, or null)")
        else:
            got = f" (got {e['input']!r})" if not isinstance(e.get("input"), dict) else ""
            near = suggest_values(e["loc"], e["input"]) if e["type"] == "literal_error" else []
            lines.append(f"  {key}: {e['msg']}{got}{hint([repr(v) for v in near])}")
    return "\n".join(lines)


def build_config(raw: dict, source: str = "config") -> Config:
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None
    for key in cfg.tune.search_space:  # here, not in the schema: the suggestions walk the schema
        if not is_config_key(key):
            raise ConfigError(f"{source}: tune.search_space: {key!r} is not a config key{hint(suggest_keys(key))}")
    return cfg


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Compose `path` (None: built-in defaults), apply overrides, validate."""
    raw = _compose(Path(path)) if path else {}
    raw = apply_overrides(raw, list(overrides))
    return build_config(raw, source=str(path) if path else "defaults")


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    atomic_write_text(path, to_yaml(cfg))


def config_from_dict(d: dict[str, Any]) -> Config:
    return build_config(d, source="dict")


# Keys that hold a path on this machine (or a filesystem URI, which is kept as it is).
PATH_KEYS = ("output_dir", "data.root", "data.csv", "model.weights", "model.pretrained_file", "diffusion.model_dir",
             "baseline", "synthesis.filter_model")


def with_absolute_paths(cfg: Config, start: str | os.PathLike | None = None) -> Config:
    """`cfg` with every local path of PATH_KEYS made absolute against `start` (default: the folder the
    command was started in). A Tune trial runs in a working folder of its own, where a relative
    `output_dir` would put the runs out of sight; resolved before any trial starts, every trial writes
    and reads where the user meant."""
    from ioisray.storage import is_uri

    start = Path(start or os.getcwd())
    data = cfg.model_dump(mode="json")
    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        section = data
        for part in parents:
            section = section[part]
        value = section.get(leaf)
        if value and not is_uri(value):
            section[leaf] = str((start / Path(value).expanduser()).resolve())
    return Config.model_validate(data)
