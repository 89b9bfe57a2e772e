"""The typed experiment config: its schema (schema.py) and how it is loaded (loading.py)."""
from ioisray.config.loading import (apply_overrides, build_config, config_from_dict, load_config, save_config,
                                    to_yaml, with_absolute_paths)
from ioisray.config.schema import (AASConfig, AugmentConfig, BenchmarkSettings, Config, ConfigError, DataConfig,
                                   DiffusionConfig, MethodConfig, ModelConfig, PretrainConfig, RayConfig,
                                   RunFinishedError, SamplerConfig, SearchDimension, SynthesisConfig, TrainConfig,
                                   TuneSettings, is_config_key)

__all__ = ["AASConfig", "AugmentConfig", "BenchmarkSettings", "Config", "ConfigError", "DataConfig", "DiffusionConfig",
           "MethodConfig", "ModelConfig", "PretrainConfig", "RayConfig", "RunFinishedError", "SamplerConfig",
           "SearchDimension", "SynthesisConfig", "TrainConfig", "TuneSettings", "apply_overrides", "build_config",
           "config_from_dict", "is_config_key", "load_config", "save_config", "to_yaml", "with_absolute_paths"]
