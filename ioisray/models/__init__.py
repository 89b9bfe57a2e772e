from ioisray.models.classifier import (NormedLinear, build_classifier, cpu_state_dict, create_classifier,
                                      load_state_dict_file, unwrap)

__all__ = ["NormedLinear", "build_classifier", "cpu_state_dict", "create_classifier", "load_state_dict_file", "unwrap"]
