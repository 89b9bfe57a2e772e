"""Numeric precision and per-device settings for training and sampling (plain PyTorch, no Ray).

`train.precision` and `sampler.dtype` default to what pays on the device: bf16 where the hardware
computes in bf16 natively (CUDA GPUs from Ampere on, CPUs with AVX-512 BF16 / AMX), float32 elsewhere,
where bf16 would be emulated and slower. Autocast keeps the weights, the optimizer and the losses
(`losses.ImbalanceLoss` casts logits to float32) in float32; fp16 also needs a gradient scaler.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

PRECISIONS = ("bf16", "fp16", "fp32")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively."""
    if device.type == "cuda":
        # including_emulation=False: a V100 or T4 can emulate bf16 (slowly); only Ampere on is native
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(requested: Optional[str], device: torch.device) -> str:
    """`train.precision` for this device: as asked, or (None) bf16 where native, else fp32.

    fp16 on a CPU is refused: CPU autocast in float16 is slow and needs no scaler logic we test."""
    if requested is None:
        return "bf16" if native_bf16(torch.device(device)) else "fp32"
    if requested not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {PRECISIONS}, got {requested!r}")
    if requested == "fp16" and torch.device(device).type != "cuda":
        raise ValueError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return requested


def sampler_dtype(requested: Optional[str], device: torch.device) -> str:
    """`sampler.dtype` for this device: as asked, or (None) bfloat16 where native, else float32."""
    if requested is not None:
        return requested
    return "bfloat16" if native_bf16(torch.device(device)) else "float32"


def autocast(device: torch.device, precision: str):
    """Autocast for the forward pass (and loss) in `precision`; a no-op context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_AUTOCAST_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> "torch.amp.GradScaler":
    """A gradient scaler that is active for fp16 only (bf16 has fp32's exponent range)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")


def configure_device(device: torch.device, gpu_share: float = 1.0) -> None:
    """Per-process CUDA settings: cuDNN autotuning (fixed input shapes in training and sampling),
    TF32 matmuls, and, when this process holds only `gpu_share` of a GPU (Ray's fractional GPUs, e.g.
    a trainer and a synthesis actor on one card), a cap on its memory so that neither can starve the
    other. No-op on the CPU."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if 0 < gpu_share < 1:
        torch.cuda.set_per_process_memory_fraction(float(gpu_share), torch.device(device))
