"""The classifier: any timm model by name; pretrained weights from timm (an opt-in download, then
cached) or from a local file, never unpickled."""
from __future__ import annotations

import io
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from ioisray.config import Config, ModelConfig
from ioisray.models.wrapping import cpu_state_dict, unwrap  # noqa: F401 - here for the classifier's users


def load_state_dict_file(path: str | Path, key: str = "model.weights") -> dict[str, torch.Tensor]:
    """Read weights without unpickling arbitrary objects (safetensors, or torch.load weights_only),
    from a local file or a filesystem URI (s3://..., what every node of a cluster reaches).

    A file that does not parse (truncated, not weights at all, or a pickle that weights_only
    refuses because it would import or call something) is a one-line ValueError naming it.
    """
    from ioisray import storage

    if storage.is_uri(path):
        try:
            data = storage.read_bytes(str(path))
        except FileNotFoundError:
            raise FileNotFoundError(f"{key}: no such file: {path}") from None
    else:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{key}: no such file: {path}")
        if not path.is_file():  # a folder, or a FIFO torch.load would wait on forever
            raise ValueError(f"{key}: {path} is not a weights file (not a regular file)")
        data = path.read_bytes()
    try:
        state = _parse_weights(str(path), data)
    except Exception as e:  # noqa: BLE001 - both parsers raise many types for bad input (see _short_reason)
        raise ValueError(f"{key}: {path} is not a weights file ({_short_reason(e)})") from None
    # Accept common wrappers: {"state_dict": ...} or {"model": ...}.
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{key}: {path} does not hold a state dict")
    return state


def _parse_weights(path: str, data: bytes):
    if path.endswith(".safetensors"):
        from safetensors.torch import load

        return load(data)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# Lines of torch's weights_only message that say nothing about this file.
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _short_reason(e: Exception) -> str:
    """What is wrong, in a few words: the first telling line of a parser's message (torch's are
    paragraphs of advice around one line such as "Trying to load unsupported GLOBAL posix.system")."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    telling = [line for line in lines if not line.startswith(_TORCH_BOILERPLATE)]
    reason = (telling or lines or [type(e).__name__])[0].split(". ")[0].rstrip(".")
    if any(line.startswith("Weights only load failed") for line in lines):
        reason = f"weights-only unpickling refused it: {reason}"
    return reason if len(reason) <= 200 else reason[:197] + "..."


def _timm_pretrained(cfg: ModelConfig, num_classes: int) -> torch.nn.Module:
    """timm's pretrained weights for `cfg.name` through timm's own loading path, which adapts the input
    convolution and drops the ImageNet head when `num_classes` differs (ours is freshly initialised).
    A file (local or a URI) is read here without unpickling and handed to timm as its `state_dict`
    source; it must be in timm's format (what `state_dict()` of timm's pretrained model saves)."""
    if not timm.is_model(cfg.name):
        raise ValueError(f"model.name: unknown timm model {cfg.name!r}")
    overlay = {}
    if cfg.pretrained_file:
        state = load_state_dict_file(cfg.pretrained_file, key="model.pretrained_file")
        # timm loads non-strictly once the head is dropped: check here that the file is this
        # architecture's, or a file for another one would leave a silently random backbone.
        own = timm.create_model(cfg.name, pretrained=False).state_dict()
        matching = sum(1 for k, v in own.items() if isinstance(state.get(k), torch.Tensor) and state[k].shape == v.shape)
        if matching < 0.9 * (len(own) - 2):
            raise ValueError(f"model.pretrained_file: {cfg.pretrained_file} does not hold timm weights for "
                             f"{cfg.name!r} (only {matching} of its {len(own)} tensors match)")
        overlay["state_dict"] = state
    try:
        return timm.create_model(cfg.name, pretrained=True, num_classes=num_classes,
                                 drop_rate=cfg.drop_rate, pretrained_cfg_overlay=overlay)
    except Exception as e:  # noqa: BLE001 - a download or parse fails in many ways; one line says which
        reason = _short_reason(e)
        if cfg.pretrained_file:
            raise ValueError(f"model.pretrained_file: {cfg.pretrained_file} does not hold timm weights for "
                             f"{cfg.name!r} ({reason})") from None
        raise ValueError(f"model.pretrained: timm could not fetch pretrained weights for {cfg.name!r} ({reason}); "
                         f"without network, download them on a machine that has it (timm.create_model("
                         f"{cfg.name!r}, pretrained=True), then save_file(model.state_dict(), ...)) and give "
                         f"model.pretrained_file=/path/to/weights.safetensors") from None


class NormedLinear(torch.nn.Module):
    """Cosine classifier: logits are cosines between normalised features and class weights.

    LDAM's margins and scale assume logits bounded in [-1, 1] (Cao et al. 2019 use this head).
    """

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(num_classes, in_features).uniform_(-1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).t()


def create_classifier(cfg: ModelConfig, num_classes: int, cosine_head: bool = False) -> torch.nn.Module:
    if cfg.pretrained or cfg.pretrained_file:
        model = _timm_pretrained(cfg, num_classes)
    else:
        try:
            model = timm.create_model(cfg.name, pretrained=False, num_classes=num_classes,
                                      drop_rate=cfg.drop_rate)
        except RuntimeError as e:  # timm: "Unknown model (...)"
            raise ValueError(f"model.name: {e}") from None
    if cosine_head:
        head = model.get_classifier()
        model.reset_classifier(num_classes)  # keeps timm's pooling, replaces the linear layer
        parent, _, name = model.pretrained_cfg.get("classifier", "fc").rpartition(".")
        setattr(model.get_submodule(parent), name, NormedLinear(head.in_features, num_classes))
    if cfg.weights:
        state = load_state_dict_file(cfg.weights)
        own = model.state_dict()
        # Keep matching tensors only: an ImageNet head (1000 classes) is replaced by ours.
        kept = {k: v for k, v in state.items()
                if isinstance(v, torch.Tensor) and k in own and own[k].shape == v.shape}
        # Only the classifier head may differ; a file for another architecture is an error, not a
        # silently half-initialised model.
        if len(kept) < 0.9 * (len(own) - 2):
            raise ValueError(f"model.weights: only {len(kept)} of {len(own)} tensors of timm model "
                             f"{cfg.name!r} match {cfg.weights}: weights for another architecture?")
        model.load_state_dict(kept, strict=False)
    return model


def build_classifier(cfg: Config, num_classes: int, *, pretrained: bool = True) -> torch.nn.Module:
    """The classifier of a run's config; LDAM-DRW gets the cosine head its margins assume.
    `pretrained=False` builds the architecture only, without reading `model.weights` or pretrained ones: for copies
    whose weights come from elsewhere (the synthesis actors' guide, a finished run's best model),
    possibly on a node that does not have that file."""
    model_cfg = cfg.model if pretrained else cfg.model.model_copy(
        update={"weights": None, "pretrained": False, "pretrained_file": None})
    return create_classifier(model_cfg, num_classes, cosine_head=cfg.method.loss == "ldam_drw")
