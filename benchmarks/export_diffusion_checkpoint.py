"""Save the EMA weights of a diffusion pretraining run's latest checkpoint as a diffusers model folder,
so that a run stopped early (or still running) can be sampled from.

    python benchmarks/export_diffusion_checkpoint.py outputs/dermamnist_diffusion /tmp/unet_latest
"""
import argparse
import json
from pathlib import Path

from diffusers.training_utils import EMAModel

from ioisray.checkpoint import TrainingState
from ioisray.config import load_config
from ioisray.models.diffusion import create_unet, save_diffusion_model
from ioisray.data.setup import setup_data
from ioisray.recipes.pretrain_diffusion import diffusion_image_size, record_training_images, training_noise_scheduler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a pretrain-diffusion run folder")
    ap.add_argument("out", type=Path, help="where to write the diffusers folder")
    args = ap.parse_args()
    cfg = load_config(args.run / "config.yaml")
    ckpts = sorted(p for p in (args.run / "ray_train").glob("checkpoint_*") if p.is_dir())
    if not ckpts:
        raise SystemExit(f"{args.run}/ray_train holds no checkpoint")
    state = TrainingState.load(ckpts[-1])
    num_classes = next(v.shape[0] for k, v in state.model.items() if k.startswith("class_embedding"))
    unet = create_unet(cfg.diffusion.preset, num_classes, diffusion_image_size(cfg))
    unet.load_state_dict(state.model)
    ema = EMAModel(unet.parameters(), decay=cfg.pretrain.ema_decay)
    ema.load_state_dict(state.extra["ema"])
    ema.copy_to(unet.parameters())
    save_diffusion_model(unet, training_noise_scheduler(cfg), args.out)
    # The run's training split, recorded as pretraining does, so IOIS runs can check the model.
    ds, splits = setup_data(cfg, image_size=diffusion_image_size(cfg))
    record_training_images(cfg, ds, splits["train"], args.out)
    print(json.dumps({"checkpoint": str(ckpts[-1]), "epoch": state.epoch, "out": str(args.out)}))


if __name__ == "__main__":
    main()
