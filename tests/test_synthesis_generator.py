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
from ioisray.synthesis.plan import chunk_sizes, plan_epoch


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


class TinyGuide(torch.nn.Sequential):
    def __init__(self):
        super().__init__(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                         torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))


def _counting_backend():
    graphs = []

    def backend(gm, example_inputs):  # called once per graph dynamo compiles
        graphs.append(gm)
        return gm.forward

    return graphs, backend


@pytest.fixture(scope="module")
def two_level_model_dir(tmp_path_factory):
    """A UNet of two levels (one upsampling): a fraction of tiny's graph for dynamo to trace."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("unet2")
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, num_class_embeds=3)
    save_diffusion_model(unet, make_train_scheduler(), path)
    return str(path)


def test_the_generator_compiles_every_chunk_size_of_the_plan_before_it_is_ready(two_level_model_dir,
                                                                                one_torch_thread):
    # chunk_size 128: the ramp 16, 32, 64 and the remainder 38. Without the warm-up the chunk of 64
    # compiled the UNet again, mid-epoch: diffusers' upsampling branches on batch >= 64, so the graph
    # made for the first chunk does not cover it.
    torch._dynamo.reset()
    graphs, backend = _counting_backend()
    gen = DiffusionGenerator(two_level_model_dir, 3, SamplerConfig(steps=1, guidance_scale=1.0, compile=True),
                             make_classifier=TinyGuide, compile_backend=backend, warmup_sizes=chunk_sizes(150, 128))
    assert gen.warmed_up == [16, 32, 38, 64]
    made_while_loading = len(graphs)
    assert made_while_loading >= 3  # the UNet below 64 images and from 64 on, and the guide
    # An IOIS run's first two epochs: unguided, then guided by the trained classifier's weights.
    state = {k: v.clone() for k, v in TinyGuide().state_dict().items()}
    seen = set()
    for epoch, (quotas, weights) in enumerate((([50, 50, 50], None), ([90, 40, 20], state))):
        gen.set_classifier(weights)
        for chunk in plan_epoch(quotas, epoch, run_seed=0, chunk_size=128):
            assert gen.generate(chunk.labels, chunk.seeds)["image"].shape == (len(chunk), 8, 8, 3)
            seen.add(len(chunk))
    assert sorted(seen) == gen.warmed_up and len(graphs) == made_while_loading  # nothing compiled after


def test_the_run_warms_up_its_plans_chunk_sizes_on_a_cpu_only_when_compiled(model_dir):
    cfg = load_config(None, ["synthesis.mode=online", "synthesis.budget=100", "synthesis.chunk_size=32",
                             "synthesis.pool_size=3", "data.image_size=8", "sampler.steps=1"])
    make = generator_factory(cfg, model_dir, 3)
    assert make.keywords["warmup_sizes"] == tuple(sorted(set(chunk_sizes(100, 32, 3))))
    assert make().warmed_up == []  # eager on the CPU (sampler.compile unset): nothing to compile or tune



def test_a_cfg_generator_warms_up_and_samples_only_real_classes(two_level_model_dir, tmp_path, one_torch_thread):
    # The warm-up samples a chunk of each size with labels 0, 1, 2, ...: never the null class, which is
    # one more label embedding than the data has classes.
    import dataclasses

    from ioisray.models.diffusion import CLASS_CONDITIONING_FILE
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel.from_pretrained(two_level_model_dir)  # 3 label embeddings: 2 classes and the null one
    unet.null_class_label = 2
    save_diffusion_model(unet, make_train_scheduler(), tmp_path / "cfg")
    assert (tmp_path / "cfg" / CLASS_CONDITIONING_FILE).is_file()
    gen = DiffusionGenerator(str(tmp_path / "cfg"), 2, SamplerConfig(steps=1, cfg_scale=2.0))
    # The warm-up runs where the UNet is compiled (CUDA by default); its sampling, without the compiler's
    # cost (tens of seconds on a CPU), is that of an eager UNet under the same settings.
    gen.sampler = dataclasses.replace(gen.sampler, compile=True)
    assert gen.warm_up([5]) == [5] and gen.sampler.cfg_scale == 2.0
    assert gen.generate(np.array([0, 1, 1]), np.array([1, 2, 3]))["image"].shape == (3, 8, 8, 3)


class SureOfClassZero(torch.nn.Module):
    """A judge that gives class 0 probability ~0.99 whatever the image (its logits are a parameter)."""

    def __init__(self, logits=(5.0, 0.0, 0.0)):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits))

    def forward(self, x):
        return self.logits.expand(len(x), -1) + 0 * x.mean()


def test_the_filter_drops_images_its_judge_doubts_and_counts_them_per_class(model_dir):
    labels, seeds = np.array([0, 1, 2, 0, 2]), np.arange(5)
    plain = DiffusionGenerator(model_dir, 3, SamplerConfig(steps=1, guidance_scale=0.0))
    made = plain.generate(labels, seeds)
    assert "filtered" not in made and len(made["label"]) == 5
    judged = DiffusionGenerator(model_dir, 3, SamplerConfig(steps=1, guidance_scale=0.0), filter_threshold=0.5,
                                make_judge=SureOfClassZero)
    out = judged.generate(labels, seeds)
    assert out["label"].tolist() == [0, 0] and out["seed"].tolist() == [0, 3]
    np.testing.assert_array_equal(out["image"], made["image"][[0, 3]])  # the kept images, unchanged
    assert out["filtered"].tolist() == [0, 1, 2]
    # The live classifier judges once it has weights (none before the first epoch: nothing filtered).
    live = DiffusionGenerator(model_dir, 3, SamplerConfig(steps=1, guidance_scale=0.0), filter_threshold=0.5,
                              make_classifier=SureOfClassZero)
    live.set_classifier(None)
    assert len(live.generate(labels, seeds)["label"]) == 5
    live.set_classifier({"logits": torch.tensor([0.0, 5.0, 0.0])})  # this epoch's classifier: sure of class 1
    out = live.generate(labels, seeds)
    assert out["label"].tolist() == [1] and out["filtered"].tolist() == [2, 0, 2] and not live.guided


def _finished_run(path, cfg, class_names):
    """A finished `ioisray train` run's files as load_classifier_run reads them."""
    import json

    from safetensors.torch import save_file

    from ioisray.config import save_config

    save_config(cfg, path / "config.yaml")
    (path / "metrics.json").write_text(json.dumps({"class_names": class_names}))
    model = build_classifier(cfg, len(class_names), pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "best_model.safetensors")
    return path


def test_a_filter_model_is_a_finished_run_of_the_datas_classes_checked_before_the_run(model_dir, tmp_path):
    from ioisray.config import ConfigError
    from ioisray.recipes.prerequisites import check_filter_model

    judge_cfg = load_config(None, ["model.name=resnet10t", "data.image_size=8"])
    run = _finished_run(tmp_path / "judge", judge_cfg, ["a", "b", "c"])
    cfg = load_config(None, ["model.name=resnet10t", "synthesis.mode=online", "synthesis.budget=8", "data.image_size=8",
                             "sampler.steps=1", "synthesis.filter=0.3", f"synthesis.filter_model={run}"])
    make = generator_factory(cfg, model_dir, 3)
    assert make.keywords["make_classifier"] is not None  # the guide; the judge is the run's own model
    gen = make()
    assert gen.judge is not None and gen.filter_threshold == 0.3 and not gen.judge.training
    out = gen.generate(np.array([0, 1, 2, 1]), np.arange(4))
    assert len(out["label"]) + int(out["filtered"].sum()) == 4

    class Data:
        class_names = ["a", "b", "c"]

    check_filter_model(cfg, Data)
    Data.class_names = ["a", "b", "d"]
    with pytest.raises(ConfigError, match=r"synthesis.filter_model: .* classifies \['a', 'b', 'c'\]"):
        check_filter_model(cfg, Data)
    Data.class_names = ["a", "b", "c"]
    with pytest.raises(ConfigError, match="synthesis.filter_model: .*trained at 8px"):
        check_filter_model(cfg.model_copy(update={"data": cfg.data.model_copy(update={"image_size": 16})}), Data)
    with pytest.raises(ConfigError, match="synthesis.filter_model: .*not a finished"):
        check_filter_model(cfg.model_copy(update={"synthesis": cfg.synthesis.model_copy(
            update={"filter_model": str(tmp_path / "nothing")})}), Data)
    # Without a filter_model the classifier being trained judges: the actors build its architecture even
    # unguided, and no other model.
    live = load_config(None, ["synthesis.mode=online", "synthesis.budget=8", "synthesis.guidance=false",
                              "synthesis.filter=0.3", "data.image_size=8", "sampler.steps=1"])
    make = generator_factory(live, model_dir, 3)
    assert make.keywords["make_classifier"] is not None and make.keywords["make_judge"] is None
    assert generator_factory(live.model_copy(update={"synthesis": live.synthesis.model_copy(update={"filter": 0.0})}),
                             model_dir, 3).keywords["make_classifier"] is None
