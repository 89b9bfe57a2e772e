from ioisray.models.classifier import create_classifier, load_state_dict_file

__all__ = ["create_classifier", "load_state_dict_file"]
