import pytest
import torch

from ioisray.mixup import mixup_batch, mixup_loss


def _batch(b=6):
    x = torch.arange(b * 2 * 3 * 3, dtype=torch.float32).reshape(b, 2, 3, 3)
    y = torch.arange(b, dtype=torch.int64) % 3
    return x, y


@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_shapes_and_convex_combination(alpha):
    x, y = _batch()
    mixed, y_a, y_b, lam = mixup_batch(x, y, alpha, torch.Generator().manual_seed(0))
    assert isinstance(lam, float) and 0.0 <= lam <= 1.0
    assert mixed.shape == x.shape and y_a.shape == y.shape and y_b.shape == y.shape
    assert torch.equal(y_a, y)
    # y_b is a permutation of y, and every mixed sample is lam * x_i + (1 - lam) * x_j for the j behind y_b.
    assert sorted(y_b.tolist()) == sorted(y.tolist())
    rows = x.flatten(1)
    for i in range(x.shape[0]):
        matches = [
            j
            for j in range(x.shape[0])
            if y[j] == y_b[i] and torch.allclose(mixed[i].flatten(), lam * rows[i] + (1 - lam) * rows[j])
        ]
        assert matches


def test_same_seed_same_result_and_different_seeds_differ():
    x, y = _batch(16)
    a = mixup_batch(x, y, 0.4, torch.Generator().manual_seed(123))
    b = mixup_batch(x, y, 0.4, torch.Generator().manual_seed(123))
    c = mixup_batch(x, y, 0.4, torch.Generator().manual_seed(124))
    assert a[3] == b[3]
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert a[3] != c[3]


def test_generator_leaves_global_rng_untouched():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    mixup_batch(*_batch(), 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(torch.rand(3), expected)


def test_lam_follows_beta_mean():
    # Beta(a, a) has mean 1/2; small alpha puts mass near 0 and 1, large alpha near 1/2.
    gen = torch.Generator().manual_seed(0)
    x, y = _batch(2)
    small = [mixup_batch(x, y, 0.1, gen)[3] for _ in range(400)]
    large = [mixup_batch(x, y, 20.0, gen)[3] for _ in range(400)]
    assert sum(small) / 400 == pytest.approx(0.5, abs=0.08)
    assert sum(large) / 400 == pytest.approx(0.5, abs=0.03)

    def spread(values):
        return sum(abs(v - 0.5) for v in values) / len(values)

    assert spread(small) > 0.3 > 0.1 > spread(large)


def test_without_generator_works():
    x, y = _batch()
    mixed, _, _, lam = mixup_batch(x, y, 1.0)
    assert 0.0 <= lam <= 1.0 and mixed.shape == x.shape


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_non_positive_alpha_rejected(alpha):
    x, y = _batch()
    with pytest.raises(ValueError, match="method.mixup_alpha"):
        mixup_batch(x, y, alpha)


def test_mixup_loss_is_convex_combination():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 1.2, 0.3]], requires_grad=True)
    y_a, y_b = torch.tensor([0, 1]), torch.tensor([2, 1])
    calls = []

    def loss_fn(lg, t):
        calls.append(t.tolist())
        return torch.nn.functional.cross_entropy(lg, t)

    lam = 0.3
    got = mixup_loss(loss_fn, logits, y_a, y_b, lam)
    expected = lam * loss_fn(logits, y_a) + (1 - lam) * loss_fn(logits, y_b)
    assert got.item() == pytest.approx(expected.item(), rel=1e-7)
    assert calls[:2] == [[0, 1], [2, 1]]
    got.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # lam = 1 reduces to the loss on y_a alone.
    assert mixup_loss(loss_fn, logits, y_a, y_b, 1.0).item() == pytest.approx(loss_fn(logits, y_a).item())


def test_on_the_generators_device_the_permutation_is_the_generators_own_draw():
    # The CPU path draws exactly as before: lam's seed, then randperm from the same generator.
    from ioisray.mixup import sample_lam

    x, y = _batch(16)
    _, _, y_b, lam = mixup_batch(x, y, 0.4, torch.Generator().manual_seed(5))
    reference = torch.Generator().manual_seed(5)
    assert lam == sample_lam(0.4, reference)
    assert torch.equal(y_b, y[torch.randperm(16, generator=reference)])


def test_a_generator_for_another_device_follows_the_seeded_stream():
    # Data on a GPU gets its permutation drawn there, from a generator on its device seeded by one draw
    # of the engine's CPU generator: reproducible from that generator, which advances by that one draw.
    from ioisray.mixup import generator_on

    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    on_a, on_b = generator_on(torch.device("cpu"), a), generator_on(torch.device("cpu"), b)
    assert on_a is not a and on_a.device == torch.device("cpu")
    assert torch.equal(torch.randperm(50, generator=on_a), torch.randperm(50, generator=on_b))
    after_one_draw = torch.Generator().manual_seed(3)
    torch.randint(0, 2**62, (1,), generator=after_one_draw)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=after_one_draw))
    other = generator_on(torch.device("cpu"), torch.Generator().manual_seed(4))
    assert not torch.equal(torch.randperm(50, generator=other), torch.randperm(50, generator=on_a))


def test_weighted_mixup_loss_weights_each_target_by_its_own_image():
    from ioisray.losses import create_loss

    loss_fn = create_loss("ce", [4, 4, 4])
    logits, y_a, y_b = torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 0, 0])
    w_a, w_b = torch.tensor([1.0, 0.5, 1.0, 0.5]), torch.tensor([0.5, 1.0, 1.0, 1.0])
    lam = 0.3
    per_a = torch.nn.functional.cross_entropy(logits, y_a, reduction="none")
    per_b = torch.nn.functional.cross_entropy(logits, y_b, reduction="none")
    want = lam * (w_a * per_a).sum() / w_a.sum() + (1 - lam) * (w_b * per_b).sum() / w_b.sum()
    assert mixup_loss(loss_fn, logits, y_a, y_b, lam, w_a, w_b).item() == pytest.approx(want.item(), rel=1e-6)
    assert mixup_loss(loss_fn, logits, y_a, y_b, lam).item() == pytest.approx(
        (lam * per_a.mean() + (1 - lam) * per_b.mean()).item(), rel=1e-6)
