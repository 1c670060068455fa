"""LOGO loss and the preference-loss family vs independent float64 references."""
import math

import pytest
import torch
import torch.nn.functional as F

import logo_kernels as lk


def make_batch(batch, num_negatives, *, vocab=300, dim=16, seed=0, ignore_inside=True, bias=False):
    """Random hidden states for B examples x (M + 1) responses of uneven lengths, some tokens ignored."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 12, (batch * (num_negatives + 1),), generator=g)
    total = int(lengths.sum())
    hidden = torch.randn(total, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) * 0.5
    targets = torch.randint(0, vocab, (total,), generator=g)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.long)
    cu[1:] = lengths.cumsum(0)
    if ignore_inside:  # ignore the second token of every response (it keeps >= 1 scored token)
        targets[cu[:-1] + 1] = -100
    b = torch.randn(vocab, generator=g) if bias else None
    return hidden, weight, targets, cu, b


def reference_logo(hidden, weight, targets, cu, bias=None, *, num_negatives, beta, gamma, sft_weight,
                   loss_type="sigmoid", label_smoothing=0.0):
    """fp64: full logits, log_softmax, gather, a Python loop of per-sequence means, LOGO's formula."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    logprobs = torch.log_softmax(logits, dim=-1)
    means = []
    for s in range(len(cu) - 1):
        rows = range(int(cu[s]), int(cu[s + 1]))
        scored = [logprobs[t, targets[t]] for t in rows if targets[t] != -100]
        means.append(torch.stack(scored).mean())
    means = torch.stack(means).view(-1, num_negatives + 1)
    losses = []
    for example in means:
        chosen, rejected = example[0], example[1:]
        z = beta * (chosen - rejected.mean()) - gamma
        if loss_type == "sigmoid":
            pref = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
        else:
            pref = torch.relu(1 - z)
        losses.append(pref + sft_weight * (-chosen))
    return torch.stack(losses).mean(), means


@pytest.mark.parametrize("loss_type, label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("hinge", 0.0)])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("num_negatives", [1, 2, 3])
def test_logo_loss_matches_float64_reference(backend, num_negatives, batch, loss_type, label_smoothing):
    hidden, weight, targets, cu, bias = make_batch(batch, num_negatives, seed=num_negatives * 10 + batch, bias=True)
    kw = dict(num_negatives=num_negatives, beta=2.5, gamma=0.25, sft_weight=0.1, loss_type=loss_type,
              label_smoothing=label_smoothing)
    params = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = lk.logo_loss(params[0], params[1], targets, cu, bias=params[2], backend=backend, **kw)
    out.loss.backward()
    ref_params = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    ref_loss, ref_means = reference_logo(ref_params[0], ref_params[1], targets, cu, ref_params[2], **kw)
    ref_loss.backward()

    torch.testing.assert_close(out.loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.chosen_logps.double(), ref_means[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.rejected_logps.double(), ref_means[:, 1:], rtol=1e-5, atol=1e-5)
    for ours, ref, name in zip(params, ref_params, ("hidden", "weight", "bias")):
        torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert out.rejected_logps.shape == (batch, num_negatives)
    assert not out.chosen_rewards.requires_grad and not out.margins.requires_grad


def test_metrics():
    hidden, weight, targets, cu, _ = make_batch(3, 2, seed=5)
    out = lk.logo_loss(hidden, weight, targets, cu, num_negatives=2, beta=10.0, gamma=3.0, sft_weight=0.1)
    torch.testing.assert_close(out.chosen_rewards, 10.0 * out.chosen_logps)
    torch.testing.assert_close(out.rejected_rewards, 10.0 * out.rejected_logps)
    torch.testing.assert_close(out.margins, out.chosen_rewards - out.rejected_rewards.mean(1))
    expected_accuracy = (out.chosen_rewards[:, None] > out.rejected_rewards).float().mean()
    torch.testing.assert_close(out.accuracy, expected_accuracy)
    torch.testing.assert_close(out.sft_loss, -out.chosen_logps.mean())


def test_m1_is_simpo():
    """M = 1, λ = 0: SimPO, -log s(β/|y_w| log π(y_w|x) - β/|y_l| log π(y_l|x) - γ)."""
    hidden, weight, targets, cu, _ = make_batch(4, 1, seed=6, ignore_inside=False)
    out = lk.logo_loss(hidden, weight, targets, cu, num_negatives=1, beta=2.0, gamma=0.5, sft_weight=0.0)
    logprobs = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(1, targets[:, None]).squeeze(1)
    seq = torch.stack([logprobs[cu[s]:cu[s + 1]].sum() / (cu[s + 1] - cu[s]) for s in range(len(cu) - 1)])
    chosen, rejected = seq[0::2], seq[1::2]
    simpo = -F.logsigmoid(2.0 * chosen - 2.0 * rejected - 0.5).mean()
    torch.testing.assert_close(out.loss.double(), simpo, rtol=1e-5, atol=1e-6)


def _swap_sequences(hidden, targets, cu, first, second):
    """Reorders the token blocks of sequences ``first`` and ``second`` (and the boundaries)."""
    blocks = [(int(cu[s]), int(cu[s + 1])) for s in range(len(cu) - 1)]
    blocks[first], blocks[second] = blocks[second], blocks[first]
    index = torch.cat([torch.arange(a, b) for a, b in blocks])
    lengths = torch.tensor([b - a for a, b in blocks])
    new_cu = torch.zeros_like(cu)
    new_cu[1:] = lengths.cumsum(0)
    return hidden[index], targets[index], new_cu


def test_swapping_rejected_responses_leaves_loss_unchanged():
    """Guards the authors' bug L1 (second negative sliced as [len:] instead of [2*len:])."""
    hidden, weight, targets, cu, _ = make_batch(2, 2, seed=7)
    kw = dict(num_negatives=2, beta=10.0, gamma=3.0, sft_weight=0.1)
    base = lk.logo_loss(hidden, weight, targets, cu, **kw)
    h2, t2, cu2 = _swap_sequences(hidden, targets, cu, 1, 2)  # example 0: rejected_1 <-> rejected_2
    h2, t2, cu2 = _swap_sequences(h2, t2, cu2, 4, 5)  # example 1 too
    swapped = lk.logo_loss(h2, weight, t2, cu2, **kw)
    torch.testing.assert_close(swapped.loss, base.loss)
    torch.testing.assert_close(swapped.rejected_logps, base.rejected_logps.flip(1))
    # ... while swapping chosen with a rejected response does change it.
    h3, t3, cu3 = _swap_sequences(hidden, targets, cu, 0, 1)
    assert not torch.allclose(lk.logo_loss(h3, weight, t3, cu3, **kw).loss, base.loss)


def test_ignored_tokens_do_not_count_in_the_means():
    hidden, weight, targets, cu, _ = make_batch(2, 2, seed=8, ignore_inside=False)
    masked = targets.clone()
    masked[cu[:-1] + 1] = -100
    out = lk.logo_loss(hidden, weight, masked, cu)
    keep = masked != -100
    logprobs = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(1, targets[:, None]).squeeze(1)
    means = torch.stack([logprobs[cu[s]:cu[s + 1]][keep[cu[s]:cu[s + 1]]].mean() for s in range(len(cu) - 1)])
    torch.testing.assert_close(out.chosen_logps.double(), means.view(2, 3)[:, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make_bad, message", [
    (lambda t, cu: (t, torch.tensor([0, 5, 3, 9, 12, 15, 20])), r"non-decreasing: cu_seqlens\[1\] = 5 > cu_seqlens\[2\] = 3 \(example 0\)"),
    (lambda t, cu: (t, torch.tensor([0, 3, 6, 9, 12, 15, 19])), r"cu_seqlens\[-1\] = 19 must equal the number of tokens T = 20"),
    (lambda t, cu: (t, torch.tensor([0, 5, 10, 15, 20])), r"4 sequences cannot be grouped .* divisible by num_negatives \+ 1 = 3"),
    (lambda t, cu: (t, torch.tensor([1, 5, 10, 12, 15, 17, 20])), r"must start at 0"),
    (lambda t, cu: (t.index_fill(0, torch.arange(12, 15), -100), torch.tensor([0, 3, 6, 9, 12, 15, 20])),
     r"example 1: response rejected_1 \(sequence 4\) has no scored tokens"),
    (lambda t, cu: (t, torch.tensor([0, 3, 6, 6, 12, 15, 20])), r"example 0: response rejected_2 \(sequence 2\) has no scored tokens"),
])
def test_input_validation_names_the_example(make_bad, message):
    hidden = torch.randn(20, 8)
    weight = torch.randn(50, 8)
    targets, cu = make_bad(torch.randint(0, 50, (20,)), None)
    with pytest.raises(ValueError, match=message):
        lk.logo_loss(hidden, weight, targets, cu, num_negatives=2)


def test_option_errors():
    hidden, weight, targets, cu, _ = make_batch(1, 2)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        lk.logo_loss(hidden, weight, targets, cu, loss_type="dpo")
    with pytest.raises(TypeError, match="cu_seqlens must be a 1-D integer tensor"):
        lk.logo_loss(hidden, weight, targets, cu.float())
    with pytest.raises(ValueError, match="num_negatives must be an int >= 1"):
        lk.logo_loss(hidden, weight, targets, cu, num_negatives=0)


def test_logo_loss_module():
    hidden, weight, targets, cu, _ = make_batch(2, 3, seed=9)
    module = lk.LogoLoss(num_negatives=3, beta=3.0, gamma=0.6, sft_weight=0.0)
    assert "num_negatives=3" in repr(module)
    expected = lk.logo_loss(hidden, weight, targets, cu, num_negatives=3, beta=3.0, gamma=0.6, sft_weight=0.0)
    torch.testing.assert_close(module(hidden, weight, targets, cu).loss, expected.loss)


# ---------------------------------------------------------------- preference_loss (per-sequence values)

def _random_logps(batch=5, negatives=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    draw = lambda *shape: -torch.rand(*shape, generator=g, dtype=torch.float64) * 3 - 0.05  # noqa: E731
    return draw(batch), draw(batch, negatives), draw(batch), draw(batch, negatives)


def _logsig(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def _expected(loss_type, c, r, rc, rr, beta, gamma, eps):
    """Per-example loss written out with scalars (independent of the vectorised implementation)."""
    if loss_type == "orpo":
        odds = lambda l: l - math.log(1 - math.exp(l))  # noqa: E731
        ratio = odds(c) - sum(odds(x) for x in r) / len(r)
        return -beta * _logsig(ratio)
    h = (c - rc) - sum(x - y for x, y in zip(r, rr)) / len(r)
    z = beta * h - gamma
    if loss_type in ("logo", "simpo", "dpo", "cpo"):
        return -(1 - eps) * _logsig(z) - eps * _logsig(-z)
    if loss_type == "robust":
        return (-(1 - eps) * _logsig(z) + eps * _logsig(-z)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return max(0.0, 1 - z)
    return (h - 1 / (2 * beta)) ** 2  # ipo


@pytest.mark.parametrize("loss_type", lk.losses.LOSS_TYPES)
def test_preference_loss_formulas(loss_type):
    chosen, rejected, ref_c, ref_r = _random_logps(seed=1)
    uses_ref = loss_type in ("dpo", "robust", "hinge", "ipo")
    gamma = 0.0 if loss_type in ("ipo", "orpo") else 0.3
    eps = 0.1 if loss_type in ("logo", "simpo", "dpo", "cpo", "robust") else 0.0
    refs = dict(ref_chosen_logps=ref_c, ref_rejected_logps=ref_r) if uses_ref else {}
    out = lk.preference_loss(chosen, rejected, loss_type=loss_type, beta=2.0, gamma=gamma, label_smoothing=eps,
                             sft_weight=0.2, **refs)
    expected = []
    for b in range(chosen.shape[0]):
        rc, rr = (ref_c[b].item(), ref_r[b].tolist()) if uses_ref else (0.0, [0.0] * rejected.shape[1])
        expected.append(_expected(loss_type, chosen[b].item(), rejected[b].tolist(), rc, rr, 2.0, gamma, eps)
                        - 0.2 * chosen[b].item())
    torch.testing.assert_close(out.loss, torch.tensor(expected, dtype=torch.float64).mean())


def test_preference_loss_single_negative_shapes_and_chosen_nll():
    chosen, rejected, _, _ = _random_logps(negatives=1, seed=2)
    as_vector = lk.preference_loss(chosen, rejected[:, 0], loss_type="cpo", beta=1.0, sft_weight=1.0,
                                   chosen_nll=torch.full_like(chosen, 2.0))
    as_matrix = lk.preference_loss(chosen, rejected, loss_type="cpo", beta=1.0, sft_weight=0.0)
    torch.testing.assert_close(as_vector.loss, as_matrix.loss + 2.0)
    assert as_vector.rejected_rewards.shape == (chosen.shape[0], 1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss_type="dpo"), "needs ref_chosen_logps and ref_rejected_logps"),
    (dict(loss_type="simpo", ref_chosen_logps=torch.zeros(5), ref_rejected_logps=torch.zeros(5, 2)),
     "reference-free"),
    (dict(loss_type="dpo", ref_chosen_logps=torch.zeros(5)), "pass both"),
    (dict(loss_type="ipo", gamma=1.0, ref_chosen_logps=torch.zeros(5), ref_rejected_logps=torch.zeros(5, 2)),
     "gamma"),
    (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing is not defined"),
    (dict(loss_type="robust", label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
    (dict(loss_type="kto"), "loss_type must be one of"),
    (dict(beta=0.0), "beta must be a finite number > 0"),
])
def test_preference_loss_errors(kwargs, message):
    chosen, rejected, _, _ = _random_logps()
    with pytest.raises(ValueError, match=message):
        lk.preference_loss(chosen.float(), rejected.float(), **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(beta=float("inf")), "beta must be a finite number > 0"),
    (dict(beta=-2.0), "beta must be a finite number > 0"),
    (dict(gamma=float("nan")), "gamma must be a finite number"),
    (dict(sft_weight=-1.0), "sft_weight must be a finite number >= 0"),
    (dict(label_smoothing=float("nan")), "label_smoothing must be a finite number >= 0"),
    (dict(label_smoothing=-0.1), "label_smoothing must be a finite number >= 0"),
])
def test_hyperparameters_are_validated_by_class(kwargs, message):
    chosen, rejected, _, _ = _random_logps()
    with pytest.raises(ValueError, match=message):
        lk.preference_loss(chosen, rejected, **kwargs)
    hidden, weight, targets, cu, _ = make_batch(1, 2)
    with pytest.raises(ValueError, match=message):
        lk.logo_loss(hidden, weight, targets, cu, **kwargs)
    with pytest.raises(ValueError, match=message):
        lk.LogoLoss(**kwargs)  # refused at construction, before any training step


@pytest.mark.parametrize("where, value, message", [
    ("chosen", float("nan"), r"chosen_logps\[2\] = nan: log-probabilities must be finite"),
    ("rejected", float("-inf"), r"rejected_logps\[2, 1\] = -inf: log-probabilities must be finite"),
    ("chosen", 3.5, r"chosen_logps\[2\] = 3.5 > 0: log-probabilities are <= 0"),
])
def test_log_probabilities_are_finite_and_not_positive(where, value, message):
    chosen, rejected, _, _ = _random_logps()
    if where == "chosen":
        chosen[2] = value
    else:
        rejected[2, 1] = value
    with pytest.raises(ValueError, match=message):
        lk.preference_loss(chosen, rejected)
    with pytest.raises(TypeError, match="chosen_logps must be a floating torch.Tensor"):
        lk.preference_loss(torch.zeros(5, dtype=torch.long), rejected)


def test_bool_cu_seqlens_and_bool_num_negatives_are_refused():
    hidden, weight, targets, cu, _ = make_batch(1, 2)
    with pytest.raises(TypeError, match="cu_seqlens must be a 1-D integer tensor"):
        lk.logo_loss(hidden, weight, targets, cu.bool())
    with pytest.raises(ValueError, match="num_negatives must be an int >= 1"):
        lk.logo_loss(hidden, weight, targets, cu, num_negatives=True)
    with pytest.raises(ValueError, match="num_negatives must be an int >= 1"):
        lk.LogoLoss(num_negatives=0)
