"""What training does with any model, classifier or UNet (torch only: a diffusion pretraining worker
imports this without timm)."""
import torch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module inside DDP: a forward on one rank alone must not wait for the others."""
    return model.module if hasattr(model, "module") else model


def cpu_state_dict(model: torch.nn.Module) -> dict:
    """The bare module's weights as CPU tensors of their own (training may go on changing the live ones)."""
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}
