"""The guided sampler's options: one schema, used as the config's `sampler` section and by
`ioisray.sampler.sample`. Plain Python (no torch, no pydantic), validated once, here."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

SOLVERS = ("ddim", "dpmsolver++", "unipc")
GUIDANCE_OBJECTIVES = ("log_prob", "entropy")


def _doc(text: str) -> dict:
    return {"description": text}


@dataclass
class SamplerConfig:
    # Unknown keys in a config's `sampler:` section are errors, as in every other section.
    __pydantic_config__ = {"extra": "forbid"}

    # Each field's description (field metadata) is what `ioisray config describe` and the docs show.
    steps: int = field(default=50, metadata=_doc("Sampler steps (DDIM's, or a multistep solver's)."))
    guidance_scale: float = field(default=1.0, metadata=_doc(
        "Classifier guidance scale s (1.0 as in the paper); 0 disables classifier guidance."))
    guidance_form: Literal["x_t", "x0"] = field(default="x_t", metadata=_doc(
        "What the guiding classifier sees: the noisy image x_t (the paper's form) or the predicted clean image x0."))
    eta: float = field(default=0.0, metadata=_doc("DDIM's stochasticity in [0, 1] (ddim only); 0 is deterministic."))
    dtype: Optional[Literal["float32", "bfloat16"]] = field(default=None, metadata=_doc(
        "Run the networks under bf16 autocast (the guidance maths stays float32); unset: bfloat16 where the device "
        "computes in bf16 natively, else float32."))
    solver: Literal["ddim", "dpmsolver++", "unipc"] = field(default="ddim", metadata=_doc(
        "The sampler: DDIM, or one of diffusers' multistep solvers (meant for 10-25 steps), fed the same guided eps."))
    # No gain was measured on the CPU.
    compile: Optional[bool] = field(default=None, metadata=_doc(
        "torch.compile the UNet and guide classifier once per synthesis actor, batch dimension dynamic; unset: on "
        "for CUDA, off on the CPU."))
    cfg_scale: float = field(default=1.0, metadata=_doc(
        "Classifier-free guidance weight w, eps = eps_null + w (eps_c - eps_null), both from one batched UNet call; "
        "1 is plain conditional sampling, and any other value needs a model pretrained with "
        "diffusion.label_dropout > 0."))
    guidance_objective: Literal["log_prob", "entropy"] = field(default="log_prob", metadata=_doc(
        "What classifier guidance pushes up: log p(c | x) of the image's class, or the classifier's predictive "
        "entropy (images the classifier finds hard, as in feedback-guided synthesis)."))

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"sampler.steps must be an integer >= 1, got {self.steps!r}")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"sampler.guidance_scale must be finite and >= 0, got {self.guidance_scale!r}")
        if self.guidance_form not in ("x_t", "x0"):
            raise ValueError(f"sampler.guidance_form must be 'x_t' or 'x0', got {self.guidance_form!r}")
        if not (0.0 <= self.eta <= 1.0):
            raise ValueError(f"sampler.eta must be in [0, 1], got {self.eta!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"sampler.solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.eta > 0 and self.solver != "ddim":
            raise ValueError(f"sampler.eta applies to the ddim solver only, not {self.solver!r}")
        if isinstance(self.cfg_scale, bool) or not isinstance(self.cfg_scale, (int, float)) \
                or not math.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise ValueError(f"sampler.cfg_scale must be a finite number >= 0, got {self.cfg_scale!r}")
        if self.guidance_objective not in GUIDANCE_OBJECTIVES:
            raise ValueError(f"sampler.guidance_objective must be one of {GUIDANCE_OBJECTIVES}, "
                             f"got {self.guidance_objective!r}")
        if self.dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"sampler.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
