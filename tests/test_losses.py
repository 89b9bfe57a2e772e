"""Each loss against a value written out by hand (plain `math`, float64) on a 3-sample, 3-class batch."""

import math

import pytest
import torch

from ioisray.losses import LOSS_NAMES, ImbalanceLoss, create_loss

COUNTS = [100, 20, 5]
LOGITS = [[2.0, 0.5, -1.0], [0.1, 1.2, 0.3], [-0.5, 0.0, 1.5]]
TARGET = [0, 2, 2]  # class 2 twice, so a weighted mean differs from a plain mean


def _logits(rows=LOGITS):
    return torch.tensor(rows, dtype=torch.float32, requires_grad=True)


def _target():
    return torch.tensor(TARGET, dtype=torch.int64)


def _log_softmax(row, y):
    return row[y] - math.log(sum(math.exp(v) for v in row))


def _normalise(w):
    return [v * len(w) / sum(w) for v in w]


def _cb_weights(beta):
    return _normalise([(1 - beta) / (1 - beta**n) for n in COUNTS])


def _compute(name, **kwargs):
    return create_loss(name, COUNTS, **kwargs)(_logits(), _target()).item()


def test_ce_by_hand():
    expected = sum(-_log_softmax(r, y) for r, y in zip(LOGITS, TARGET)) / 3
    assert _compute("ce") == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("power", [1.0, 0.5])
def test_weighted_ce_is_weighted_mean(power):
    w = _normalise([(1 / n) ** power for n in COUNTS])
    assert sum(w) == pytest.approx(3)
    num = sum(-w[y] * _log_softmax(r, y) for r, y in zip(LOGITS, TARGET))
    den = sum(w[y] for y in TARGET)
    assert _compute("weighted_ce", weight_power=power) == pytest.approx(num / den, rel=1e-6)
    # The plain mean of weighted terms would be a different number: guard against that reduction.
    assert num / 3 != pytest.approx(num / den, rel=1e-3)


def test_focal_by_hand():
    gamma = 2.0
    terms = []
    for r, y in zip(LOGITS, TARGET):
        logp = _log_softmax(r, y)
        terms.append(-((1 - math.exp(logp)) ** gamma) * logp)
    assert _compute("focal", focal_gamma=gamma) == pytest.approx(sum(terms) / 3, rel=1e-6)


def test_focal_gamma_zero_is_ce():
    assert _compute("focal", focal_gamma=0.0) == pytest.approx(_compute("ce"), rel=1e-6)


def test_cb_focal_by_hand():
    gamma, beta = 1.5, 0.99
    w = _cb_weights(beta)
    terms = []
    for r, y in zip(LOGITS, TARGET):
        logp = _log_softmax(r, y)
        terms.append(-w[y] * (1 - math.exp(logp)) ** gamma * logp)
    got = _compute("cb_focal", focal_gamma=gamma, cb_beta=beta)
    assert got == pytest.approx(sum(terms) / 3, rel=1e-6)  # plain mean over the batch


def _ldam_expected(max_m, s, weights=None):
    m = [n**-0.25 for n in COUNTS]
    m = [v * max_m / max(m) for v in m]
    num = den = 0.0
    for r, y in zip(LOGITS, TARGET):
        z = [s * (v - (m[y] if c == y else 0.0)) for c, v in enumerate(r)]
        w = 1.0 if weights is None else weights[y]
        num += -w * _log_softmax(z, y)
        den += w
    return num / den


def test_ldam_drw_before_and_after_drw_epoch():
    max_m, s, drw_epoch, drw_beta = 0.5, 30.0, 4, 0.999
    loss = create_loss(
        "ldam_drw", COUNTS, ldam_max_margin=max_m, ldam_scale=s, drw_epoch=drw_epoch, drw_beta=drw_beta
    )
    logits, target = _logits(), _target()
    unweighted = _ldam_expected(max_m, s)
    weighted = _ldam_expected(max_m, s, _cb_weights(drw_beta))
    assert weighted != pytest.approx(unweighted, rel=1e-3)

    assert loss(logits, target).item() == pytest.approx(unweighted, rel=1e-5)  # before any set_epoch
    loss.set_epoch(drw_epoch - 1)
    assert loss(logits, target).item() == pytest.approx(unweighted, rel=1e-5)
    loss.set_epoch(drw_epoch)
    assert loss(logits, target).item() == pytest.approx(weighted, rel=1e-5)
    loss.set_epoch(drw_epoch + 10)
    assert loss(logits, target).item() == pytest.approx(weighted, rel=1e-5)


def test_ldam_largest_margin_on_rarest_class():
    loss = create_loss("ldam_drw", COUNTS, ldam_max_margin=0.3)
    assert loss.margins.argmax().item() == 2
    assert loss.margins.max().item() == pytest.approx(0.3)


def test_balanced_softmax_by_hand():
    total = sum(COUNTS)
    expected = 0.0
    for r, y in zip(LOGITS, TARGET):
        z = [v + math.log(n / total) for v, n in zip(r, COUNTS)]
        expected += -_log_softmax(z, y) / 3
    assert _compute("balanced_softmax") == pytest.approx(expected, rel=1e-6)


def test_logit_adjusted_by_hand():
    tau, total = 0.5, sum(COUNTS)
    expected = 0.0
    for r, y in zip(LOGITS, TARGET):
        z = [v + tau * math.log(n / total) for v, n in zip(r, COUNTS)]
        expected += -_log_softmax(z, y) / 3
    assert _compute("logit_adjusted", la_tau=tau) == pytest.approx(expected, rel=1e-6)


def test_logit_adjusted_tau_one_equals_balanced_softmax():
    assert _compute("logit_adjusted", la_tau=1.0) == pytest.approx(_compute("balanced_softmax"), rel=1e-7)
    assert _compute("logit_adjusted", la_tau=0.0) == pytest.approx(_compute("ce"), rel=1e-6)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradients_flow(name):
    loss = create_loss(name, COUNTS, drw_epoch=0)
    assert isinstance(loss, ImbalanceLoss)
    loss.set_epoch(0)
    logits = _logits()
    value = loss(logits, _target())
    assert value.ndim == 0
    value.backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_half_precision_logits_computed_in_float32(name):
    loss = create_loss(name, COUNTS)
    expected = loss(_logits().detach(), _target())
    got = loss(_logits().detach().bfloat16(), _target())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=2e-2)


def test_class_statistics_are_buffers():
    # Buffers follow .to(device); check they are registered rather than plain attributes.
    assert "weight" in dict(create_loss("weighted_ce", COUNTS).named_buffers())
    assert "weight" in dict(create_loss("cb_focal", COUNTS).named_buffers())
    assert {"margins", "drw_weight"} <= set(dict(create_loss("ldam_drw", COUNTS).named_buffers()))
    assert "adjustment" in dict(create_loss("logit_adjusted", COUNTS).named_buffers())


def test_set_epoch_is_noop_for_other_losses():
    loss = create_loss("weighted_ce", COUNTS)
    before = loss(_logits(), _target()).item()
    loss.set_epoch(1000)
    assert loss(_logits(), _target()).item() == before


def test_unknown_name_lists_options():
    with pytest.raises(ValueError, match="method.loss") as err:
        create_loss("dice", COUNTS)
    for name in LOSS_NAMES:
        assert name in str(err.value)


@pytest.mark.parametrize("counts", [[10, 0, 3], [10, -2, 3]])
@pytest.mark.parametrize("name", ["ce", "weighted_ce", "ldam_drw"])
def test_non_positive_count_names_class(name, counts):
    with pytest.raises(ValueError, match=r"class 1\b"):
        create_loss(name, counts)


def test_wrong_number_of_classes_rejected():
    loss = create_loss("ce", [5, 5])
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        loss(_logits(), _target())


SAMPLE_WEIGHT = [1.0, 0.4, 1.0]  # row 1 a synthetic image under synthesis.loss_weight=0.4


def _by_hand_terms(name):
    """(per-sample term, per-sample normaliser) of each loss, so that the batch loss is
    sum(s_i * term_i) / sum(s_i * norm_i) for sample weights s (s = 1: the losses above)."""
    gamma, beta, tau, total = 2.0, 0.9999, 1.0, sum(COUNTS)
    terms, norms = [], []
    for r, y in zip(LOGITS, TARGET):
        if name in ("ce", "weighted_ce"):
            w = 1.0 if name == "ce" else _normalise([1 / n for n in COUNTS])[y]
            terms.append(-w * _log_softmax(r, y))
            norms.append(w)
        elif name in ("focal", "cb_focal"):
            w = 1.0 if name == "focal" else _cb_weights(beta)[y]
            logp = _log_softmax(r, y)
            terms.append(-w * (1 - math.exp(logp)) ** gamma * logp)
            norms.append(1.0)  # a plain mean: class weights do not normalise it
        elif name == "ldam_drw":  # after the DRW epoch: class-balanced weights, normalised as CE's
            m = [n**-0.25 for n in COUNTS]
            m = [v * 0.5 / max(m) for v in m]
            w = _cb_weights(beta)[y]
            terms.append(-w * _log_softmax([30.0 * (v - (m[y] if c == y else 0.0)) for c, v in enumerate(r)], y))
            norms.append(w)
        else:  # balanced_softmax, logit_adjusted (tau = 1 for both here)
            terms.append(-_log_softmax([v + tau * math.log(n / total) for v, n in zip(r, COUNTS)], y))
            norms.append(1.0)
    return terms, norms


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_sample_weights_give_the_weighted_mean_and_weight_one_the_plain_loss(name):
    loss = create_loss(name, COUNTS, drw_epoch=0)
    loss.set_epoch(0)
    terms, norms = _by_hand_terms(name)
    plain = sum(terms) / sum(norms)
    assert loss(_logits(), _target()).item() == pytest.approx(plain, rel=1e-5)  # the hand formula is right
    ones = torch.ones(3)
    assert loss(_logits(), _target(), ones).item() == pytest.approx(loss(_logits(), _target()).item(), rel=1e-6)
    s = SAMPLE_WEIGHT
    weighted = sum(si * t for si, t in zip(s, terms)) / sum(si * n for si, n in zip(s, norms))
    assert weighted != pytest.approx(plain, rel=1e-3)
    got = loss(_logits(), _target(), torch.tensor(s))
    assert got.dtype == torch.float32 and got.item() == pytest.approx(weighted, rel=1e-5)


def test_sample_weight_of_another_length_is_refused():
    with pytest.raises(ValueError, match="sample_weight"):
        create_loss("ce", COUNTS)(_logits(), _target(), torch.ones(2))
