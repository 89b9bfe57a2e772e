"""The guided sampler's options: one schema, used as the config's `sampler` section and by
`ioisray.sampler.sample`. Plain Python (no torch, no pydantic), validated once, here."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

SOLVERS = ("ddim", "dpmsolver++", "unipc")


@dataclass
class SamplerConfig:
    # Unknown keys in a config's `sampler:` section are errors, as in every other section.
    __pydantic_config__ = {"extra": "forbid"}

    steps: int = 50  # sampler steps (DDIM's, or a multistep solver's)
    guidance_scale: float = 1.0  # s; 0 disables classifier guidance
    guidance_form: Literal["x_t", "x0"] = "x_t"  # the classifier sees the noisy x_t (paper) or the predicted x0
    eta: float = 0.0  # DDIM's stochasticity (ddim only)
    # Networks under bf16 autocast (the guidance maths stays float32); None: bfloat16 where the device
    # computes in bf16 natively, else float32 (ioisray/precision.py).
    dtype: Optional[Literal["float32", "bfloat16"]] = None
    solver: Literal["ddim", "dpmsolver++", "unipc"] = "ddim"  # the multistep ones are for 10-25 steps
    # torch.compile the UNet once per synthesis actor, its batch dimension dynamic; None: on for CUDA,
    # off on the CPU (no gain measured there).
    compile: Optional[bool] = None

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
        if self.dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"sampler.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
