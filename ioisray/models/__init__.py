from ioisray.models.classifier import NormedLinear, create_classifier, load_state_dict_file

__all__ = ["NormedLinear", "create_classifier", "load_state_dict_file"]
