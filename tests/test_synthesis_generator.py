"""One synthesis actor's work without Ray: the real DiffusionGenerator on a tiny UNet."""
import numpy as np
import pytest
import torch

from ioisray.config import load_config
from ioisray.models.diffusion import create_unet, save_diffusion_model
from ioisray.models import build_classifier
from ioisray.synthesis.generator import generator_factory
from ioisray.sampler import SamplerConfig, make_train_scheduler
from ioisray.synthesis.generator import DiffusionGenerator
from ioisray.synthesis.plan import plan_epoch


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("unet")
    save_diffusion_model(create_unet("tiny", 3, 8), make_train_scheduler(), path)
    return str(path)


def test_a_compiled_unet_compiles_once_for_every_chunk_size_of_a_run(model_dir, one_torch_thread):
    graphs = []

    def counting_backend(gm, example_inputs):  # called once per graph dynamo compiles
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    gen = DiffusionGenerator(model_dir, 3, SamplerConfig(steps=1, guidance_scale=0.0, compile=True),
                             compile_backend=counting_backend)
    eager = DiffusionGenerator(model_dir, 3, SamplerConfig(steps=1, guidance_scale=0.0, compile=False))
    first_call = None
    # Two epochs of a run: the same chunk sizes (the ramp 1, 2, 4, then 8s and a remainder), labels and
    # seeds changed by other quotas.
    for epoch, quotas in enumerate(([9, 9, 9], [20, 4, 3])):
        for chunk in plan_epoch(quotas, epoch, run_seed=0, chunk_size=8):
            out = gen.generate(chunk.labels, chunk.seeds)["image"]
            assert out.shape == (len(chunk), 8, 8, 3)
            first_call = first_call if chunk.index or epoch else len(graphs)
    # One graph, made for the first chunk: with a dynamic batch dimension (and a lone image sampled in
    # a batch of two) no other size of epoch 0 and nothing in epoch 1 compiled again.
    assert first_call == 1 and len(graphs) == 1
    reference = eager.generate(chunk.labels, chunk.seeds)["image"]  # the compiled module computes the same
    assert np.abs(out.astype(int) - reference.astype(int)).max() <= 1


def test_cpu_defaults_resolve_to_eager_and_the_native_dtype(model_dir):
    gen = DiffusionGenerator(model_dir, 3, SamplerConfig(steps=1))
    assert gen.sampler.compile is False  # compile pays on CUDA only
    assert gen.sampler.dtype in ("float32", "bfloat16") and not isinstance(gen.unet, torch._dynamo.OptimizedModule)


def test_the_guide_is_built_without_the_drivers_weights_file(model_dir, tmp_path):
    # model.weights names a file only the driver has (here: nobody has it); the synthesis actors build
    # the architecture and get the weights with every epoch.
    cfg = load_config(None, ["model.name=resnet10t", f"model.weights={tmp_path / 'not_on_this_node.safetensors'}",
                             "synthesis.mode=online", "synthesis.budget=8", "data.image_size=8", "sampler.steps=1"])
    with pytest.raises(FileNotFoundError, match="model.weights"):
        build_classifier(cfg, 3)
    gen = generator_factory(cfg, model_dir, 3)()  # what each actor runs
    gen.set_classifier({k: v.clone() for k, v in build_classifier(cfg, 3, pretrained=False).state_dict().items()})
    assert gen.guided and gen.generate(np.array([0, 2]), np.array([1, 2]))["image"].shape == (2, 8, 8, 3)
