import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDIMScheduler

from ioisray.models.diffusion import create_unet
from ioisray.sampler import (SamplerConfig, _guidance_gradient, default_classifier_transform, make_scheduler,
                             make_train_scheduler, model_epsilon, sample)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NUM_CLASSES = 3


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return create_unet("tiny", NUM_CLASSES, image_size=16).eval()


class ChannelMeanClassifier(nn.Module):
    """Class c = colour channel c: logit_c = k * mean of channel c. log p(c|x) is smooth and strong in x."""

    def __init__(self, k: float = 4.0):
        super().__init__()
        self.k = nn.Parameter(torch.tensor(k))
        self.bn = nn.BatchNorm1d(3)  # checks the sampler puts the classifier in eval mode

    def forward(self, x):
        return self.bn(self.k * x.mean(dim=(2, 3)))


def target_log_prob(classifier, images, labels):
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        logits = classifier.eval()(default_classifier_transform(None)(x))
    return F.log_softmax(logits, -1).gather(1, labels[:, None]).mean().item()


def test_schedulers_share_linear_betas_and_do_not_clip():
    ddim, ddpm = make_scheduler(), make_train_scheduler()
    assert not ddim.config.clip_sample and ddim.config.prediction_type == "epsilon"
    assert torch.equal(ddim.alphas_cumprod, ddpm.alphas_cumprod)
    assert ddpm.betas[0].item() == pytest.approx(1e-4) and ddpm.betas[-1].item() == pytest.approx(0.02)


class AsVelocity(nn.Module):
    """An epsilon model re-expressed as the v-prediction model that makes the same predictions."""

    def __init__(self, eps_model, train_scheduler):
        super().__init__()
        self.eps_model, self.config = eps_model, eps_model.config
        self.abar = train_scheduler.alphas_cumprod

    def forward(self, x, t, class_labels=None):
        eps = self.eps_model(x, t, class_labels=class_labels).sample
        abar = self.abar[t].view(-1, 1, 1, 1)
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        return type("Out", (), {"sample": abar.sqrt() * eps - (1 - abar).sqrt() * x0})()


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_velocity_model_samples_like_the_epsilon_model_it_equals(unet, beta_schedule):
    eps_sched = make_train_scheduler(beta_schedule, "epsilon")
    v_sched = make_train_scheduler(beta_schedule, "v_prediction")
    v_unet = AsVelocity(unet, v_sched)
    cfg = SamplerConfig(steps=5, guidance_scale=2.0, guidance_form="x0")
    a = sample(unet, [0, 2], [1, 2], cfg, classifier=ChannelMeanClassifier(), scheduler=eps_sched)
    b = sample(v_unet, [0, 2], [1, 2], cfg, classifier=ChannelMeanClassifier(), scheduler=v_sched)
    assert (a.images.int() - b.images.int()).abs().max() <= 1
    # Reading the velocity as noise gives other images: the conversion is what makes them equal.
    c = sample(v_unet, [0, 2], [1, 2], cfg, classifier=ChannelMeanClassifier(), scheduler=eps_sched)
    assert (a.images.int() - c.images.int()).abs().float().mean() > 5


def test_cosine_schedule_and_bad_schedule_names():
    cos = make_train_scheduler("squaredcos_cap_v2", "v_prediction")
    assert make_scheduler(cos).config.beta_schedule == "squaredcos_cap_v2"
    assert torch.equal(make_scheduler(cos).alphas_cumprod, cos.alphas_cumprod)
    assert cos.alphas_cumprod[500] > make_train_scheduler().alphas_cumprod[500]  # gentler mid-way
    with pytest.raises(ValueError, match="diffusion.beta_schedule"):
        make_train_scheduler("quadratic")
    with pytest.raises(ValueError, match="diffusion.prediction_type"):
        make_train_scheduler("linear", "sample")


def test_output_format_and_output_size(unet):
    out = sample(unet, [0, 2], [1, 2], SamplerConfig(steps=3), output_size=24)
    assert out.images.shape == (2, 24, 24, 3) and out.images.dtype == torch.uint8
    assert out.labels.tolist() == [0, 2] and out.labels.dtype == torch.int64 and out.seeds == [1, 2]
    assert out.images.min() >= 0 and out.images.max() <= 255 and out.images.float().std() > 0
    assert sample(unet, [], [], SamplerConfig(steps=3)).images.shape == (0, 16, 16, 3)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_seed_decides_the_image_regardless_of_batch(unet, eta):
    cfg = SamplerConfig(steps=4, eta=eta)
    alone = sample(unet, [1], [7], cfg).images[0]
    batch = sample(unet, [0, 1, 2], [3, 7, 11], cfg).images
    # Same noise exactly; conv kernels may round differently per batch size, so allow one grey level.
    assert (alone.int() - batch[1].int()).abs().max() <= 1
    assert (alone == batch[1]).float().mean() > 0.99
    assert torch.equal(alone, sample(unet, [1], [7], cfg).images[0])
    assert (batch[0].int() - batch[2].int()).abs().float().mean() > 5  # different seeds differ


@pytest.mark.parametrize("form", ["x_t", "x0"])
def test_guidance_raises_target_class_log_probability(unet, form):
    classifier = ChannelMeanClassifier()
    classifier.train()
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    seeds = list(range(6))
    plain = sample(unet, labels, seeds, SamplerConfig(steps=5, guidance_scale=0.0, guidance_form=form),
                   classifier=classifier)
    guided = sample(unet, labels, seeds, SamplerConfig(steps=5, guidance_scale=20.0, guidance_form=form),
                    classifier=classifier)
    assert classifier.training  # mode restored
    assert classifier.k.grad is None  # only x got gradients
    lp_plain = target_log_prob(classifier, plain.images, labels)
    lp_guided = target_log_prob(classifier, guided.images, labels)
    assert lp_guided > lp_plain + 0.1, (lp_plain, lp_guided)


def test_guidance_uses_the_given_transform(unet):
    seen = []

    def transform(x):
        seen.append(tuple(x.shape))
        return F.interpolate(x, size=8, mode="bilinear", antialias=True)

    sample(unet, [0], [0], SamplerConfig(steps=2, guidance_scale=1.0), classifier=ChannelMeanClassifier(),
           classifier_transform=transform)
    assert seen == [(1, 3, 16, 16)] * 2


def test_bfloat16_matches_float32_loosely(unet):
    labels, seeds = [0, 1], [5, 6]
    fp32 = sample(unet, labels, seeds, SamplerConfig(steps=4, guidance_scale=5.0),
                  classifier=ChannelMeanClassifier()).images
    bf16 = sample(unet, labels, seeds, SamplerConfig(steps=4, guidance_scale=5.0, dtype="bfloat16"),
                  classifier=ChannelMeanClassifier()).images
    assert (fp32.float() - bf16.float()).abs().mean() < 2


def test_bad_inputs_rejected(unet):
    with pytest.raises(ValueError, match="steps"):
        SamplerConfig(steps=0)
    with pytest.raises(ValueError, match="guidance_form"):
        SamplerConfig(guidance_form="eps")
    with pytest.raises(ValueError, match="dtype"):
        SamplerConfig(dtype="float16")
    with pytest.raises(ValueError, match="seeds"):
        sample(unet, [0, 1], [1], SamplerConfig(steps=1))
    with pytest.raises(ValueError, match="labels"):
        sample(unet, [NUM_CLASSES], [1], SamplerConfig(steps=1))
    with pytest.warns(UserWarning, match="clip_sample"):
        sample(unet, [0], [1], SamplerConfig(steps=1), scheduler=DDIMScheduler())


@pytest.mark.parametrize("solver", ["dpmsolver++", "unipc"])
def test_multistep_solvers_reach_ddims_images_in_fewer_steps(unet, solver):
    # Same model, noise and guidance: a 2nd-order solver at 10 steps lands near DDIM at 50 steps
    # (the reference), nearer than DDIM itself at 10 steps does.
    labels, seeds = [0, 1, 2, 0], [5, 6, 7, 8]
    clf = ChannelMeanClassifier()
    reference = sample(unet, labels, seeds, SamplerConfig(steps=50), classifier=clf).images.float()
    fast = sample(unet, labels, seeds, SamplerConfig(steps=10, solver=solver), classifier=clf).images.float()
    ddim10 = sample(unet, labels, seeds, SamplerConfig(steps=10), classifier=clf).images.float()
    assert fast.shape == reference.shape
    assert (fast - reference).abs().mean() < (ddim10 - reference).abs().mean()


def test_channels_last_gives_the_same_predictions_and_images(unet):
    import copy

    cl = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([500, 10]), torch.tensor([0, 2])
    with torch.no_grad():
        want = unet(x, t, class_labels=y).sample
        got = cl(x.contiguous(memory_format=torch.channels_last), t, class_labels=y).sample
    assert torch.allclose(got, want, atol=1e-4)
    cfg = SamplerConfig(steps=3, guidance_scale=1.0)
    a = sample(unet, [0, 2], [1, 2], cfg, classifier=ChannelMeanClassifier()).images.float()
    b = sample(cl, [0, 2], [1, 2], cfg, classifier=ChannelMeanClassifier()).images.float()
    # The same images up to rounding: a random-init UNet saturates most pixels and amplifies the
    # ~1e-6 differences of another conv kernel order into a few grey levels on a few pixels
    # (measured on one CPU: mean 0.24, 5% of pixels off by more than 1).
    assert (a - b).abs().mean() < 1.0 and ((a - b).abs() > 2).float().mean() < 0.1


def test_solver_options_validated():
    with pytest.raises(ValueError, match="sampler.solver"):
        SamplerConfig(solver="euler")
    with pytest.raises(ValueError, match="eta"):
        SamplerConfig(solver="unipc", eta=0.5)


@pytest.fixture(scope="module")
def cfg_unet():
    """A tiny UNet with a null class (label dropout), as classifier-free guidance needs."""
    torch.manual_seed(1)
    return create_unet("tiny", NUM_CLASSES, image_size=16, null_class_label=True).eval()


def test_cfg_scale_one_is_the_conditional_eps_zero_the_null_eps_and_w_extrapolates(cfg_unet):
    torch.manual_seed(0)
    x, labels, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 2]), 500
    abar, null = make_scheduler().alphas_cumprod[t], cfg_unet.null_class_label
    assert null == NUM_CLASSES
    with torch.no_grad():
        cond = cfg_unet(x, torch.full((2,), t), class_labels=labels).sample
        uncond = cfg_unet(x, torch.full((2,), t), class_labels=torch.full_like(labels, null)).sample
    assert (cond - uncond).abs().mean() > 1e-3  # the null class predicts something else

    def eps(w):
        return model_epsilon(cfg_unet, x, t, labels, abar, "epsilon", SamplerConfig(cfg_scale=w, dtype="float32"),
                             null)

    assert torch.equal(eps(1.0), cond)  # w = 1: one conditional call, as before classifier-free guidance
    # w != 1: one call on the doubled batch, whose kernels may round differently from a batch of two.
    assert torch.allclose(eps(0.0), uncond, atol=1e-5)
    assert torch.allclose(eps(3.0), uncond + 3.0 * (cond - uncond), atol=1e-4)


def test_cfg_sampling_changes_the_images_and_needs_a_null_class(unet, cfg_unet):
    plain = sample(cfg_unet, [0, 1], [1, 2], SamplerConfig(steps=2))
    assert torch.equal(plain.images, sample(cfg_unet, [0, 1], [1, 2], SamplerConfig(steps=2, cfg_scale=1.0)).images)
    guided = sample(cfg_unet, [0, 1], [1, 2], SamplerConfig(steps=2, cfg_scale=3.0), classifier=ChannelMeanClassifier())
    assert guided.images.shape == plain.images.shape and not torch.equal(guided.images, plain.images)
    with pytest.raises(ValueError, match="sampler.cfg_scale=3 needs a diffusion model with a null class"):
        sample(unet, [0], [1], SamplerConfig(steps=1, cfg_scale=3.0))  # `unet` has no null class
    with pytest.raises(ValueError, match="sampler.cfg_scale"):
        SamplerConfig(cfg_scale=-1.0)


@pytest.mark.parametrize("form", ["x_t", "x0"])
def test_entropy_objective_follows_the_gradient_of_the_classifiers_entropy(form):
    torch.manual_seed(0)
    clf = ChannelMeanClassifier().eval()
    x, eps, abar = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8), torch.tensor(0.6)
    labels, transform, cpu = torch.tensor([0, 1, 2]), default_classifier_transform(None), torch.device("cpu")

    def seen(x_t):
        return x_t if form == "x_t" else (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()

    def entropy(x_t):
        return torch.distributions.Categorical(logits=clf(transform(seen(x_t)))).entropy().sum()

    cfg = SamplerConfig(guidance_objective="entropy", guidance_form=form, dtype="float32")
    got = _guidance_gradient(x, eps, abar, labels, clf, transform, cfg, cpu)
    x_req = x.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(entropy(x_req), x_req)
    assert torch.allclose(got, want, atol=1e-6)
    with torch.no_grad():  # the sign: a step along it makes the classifier less sure
        assert entropy(x + 0.05 * got) > entropy(x)
    log_prob = _guidance_gradient(x, eps, abar, labels, clf, transform,
                                  SamplerConfig(guidance_form=form, dtype="float32"), cpu)
    assert not torch.allclose(log_prob, got, atol=1e-3)  # the default objective is another direction
    with pytest.raises(ValueError, match="sampler.guidance_objective"):
        SamplerConfig(guidance_objective="margin")
