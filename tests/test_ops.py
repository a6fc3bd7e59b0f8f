"""Tests for rlhf_ray.ops: hand-computed numbers and loop references, tight tolerances."""
import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_ray.ops import (
    AdaptiveKLController,
    FixedKLController,
    PPOStats,
    truncated_is_weights,
    clipped_surrogate,
    entropy_from_logits,
    expected_calibration_error,
    gae,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_old_new,
    kl_penalized_rewards,
    listwise_probs,
    listwise_rm_loss,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_ratio,
    ppo_objective,
    value_loss,
)

D = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def ragged_valid(B, K, g):
    """bool [B, K], row n has 1..K leading valid entries."""
    lens = torch.randint(1, K + 1, (B,), generator=g)
    return torch.arange(K)[None, :] < lens[:, None], lens


# ----------------------------------------------------------------------------- listwise RM

def test_listwise_k2_is_bradley_terry():
    g = gen(1)
    r = torch.randn(64, 2, generator=g, dtype=D)
    best = torch.randint(0, 2, (64,), generator=g)
    valid = torch.ones(64, 2, dtype=torch.bool)
    rb, ro = r.gather(1, best[:, None])[:, 0], r.gather(1, 1 - best[:, None])[:, 0]
    expected = -F.logsigmoid(rb - ro).mean()
    torch.testing.assert_close(listwise_rm_loss(r, valid, best), expected, atol=1e-6, rtol=0)


def test_listwise_hand_computed():
    r = torch.tensor([[1.0, 2.0, 3.0]], dtype=D)
    valid = torch.ones(1, 3, dtype=torch.bool)
    # -log softmax([1,2,3])[2] = log(e + e^2 + e^3) - 3
    loss = listwise_rm_loss(r, valid, torch.tensor([2]))
    assert loss.item() == pytest.approx(0.40760596444438013, abs=1e-12)
    # padded column with garbage changes nothing; best 0 -> log(e+e^2+e^3) - 1
    r_pad = torch.tensor([[1.0, 2.0, 3.0, 100.0]], dtype=D)
    v_pad = torch.tensor([[True, True, True, False]])
    assert listwise_rm_loss(r_pad, v_pad, torch.tensor([0])).item() == pytest.approx(2.40760596444438013, abs=1e-12)
    p = listwise_probs(r_pad, v_pad)[0]
    z = math.e + math.e**2 + math.e**3
    torch.testing.assert_close(p, torch.tensor([math.e / z, math.e**2 / z, math.e**3 / z, 0.0], dtype=D))


def test_listwise_padding_and_permutation_invariance():
    g = gen(2)
    B, K = 16, 5
    valid, lens = ragged_valid(B, K, g)
    r = torch.randn(B, K, generator=g, dtype=D)
    best = (torch.rand(B, generator=g, dtype=D) * lens).long()
    base = listwise_rm_loss(r, valid, best)
    # extra padding columns holding garbage (huge, inf, nan) and garbage in existing padding
    garbage = torch.tensor([1e6, float("inf"), float("nan")], dtype=D).expand(B, 3)
    r2 = torch.cat([torch.where(valid, r, torch.full_like(r, 1e9)), garbage], 1)
    v2 = torch.cat([valid, torch.zeros(B, 3, dtype=torch.bool)], 1)
    torch.testing.assert_close(listwise_rm_loss(r2, v2, best), base, atol=1e-12, rtol=0)
    # permuting candidates (and best with them)
    perm = torch.randperm(K + 3, generator=g)
    inv = torch.argsort(perm)
    torch.testing.assert_close(listwise_rm_loss(r2[:, perm], v2[:, perm], inv[best]), base, atol=1e-12, rtol=0)
    torch.testing.assert_close(listwise_probs(r2[:, perm], v2[:, perm]), listwise_probs(r2, v2)[:, perm])


def test_listwise_gradient_is_onehot_minus_p():
    g = gen(3)
    B, K = 8, 6
    valid, lens = ragged_valid(B, K, g)
    r = torch.randn(B, K, generator=g, dtype=D)
    r = torch.where(valid, r, torch.tensor(float("nan"), dtype=D)).requires_grad_(True)  # nan padding
    best = (torch.rand(B, generator=g, dtype=D) * lens).long()
    listwise_rm_loss(r, valid, best).backward()
    assert torch.isfinite(r.grad).all()
    P = listwise_probs(r.detach(), valid)
    onehot = F.one_hot(best, K).to(D)
    # minimising: dL/dR_i = -(1[i=b] - P_i) / B, zero at padding
    torch.testing.assert_close(r.grad, -(onehot - P) / B, atol=1e-12, rtol=0)
    assert (r.grad[~valid] == 0).all()


def test_listwise_gradient_linear_model_matches_derivation():
    g = gen(4)
    B, K, Dm = 6, 4, 3
    valid, lens = ragged_valid(B, K, g)
    phi = torch.randn(B, K, Dm, generator=g, dtype=D)
    phi[~valid] = 1e3  # garbage features at padding
    w = torch.randn(Dm, generator=g, dtype=D, requires_grad=True)
    best = (torch.rand(B, generator=g, dtype=D) * lens).long()
    listwise_rm_loss(phi @ w, valid, best).backward()
    # by hand: grad_w = -(1/B) sum_n (phi_{n,b} - sum_i P_i phi_{n,i}), over valid i
    expected = torch.zeros(Dm, dtype=D)
    with torch.no_grad():
        for n in range(B):
            k = int(lens[n])
            rn = phi[n, :k] @ w
            Pn = torch.exp(rn) / torch.exp(rn).sum()
            expected -= (phi[n, best[n]] - (Pn[:, None] * phi[n, :k]).sum(0)) / B
    torch.testing.assert_close(w.grad, expected, atol=1e-12, rtol=1e-10)


def test_listwise_errors():
    r = torch.zeros(2, 3)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    with pytest.raises(ValueError):
        listwise_rm_loss(r, valid, torch.tensor([2, 0]))  # best on padding
    with pytest.raises(ValueError):
        listwise_rm_loss(r, valid, torch.tensor([0, 3]))  # out of range
    with pytest.raises(ValueError):
        listwise_rm_loss(r, valid, torch.tensor([-1, 0]))
    with pytest.raises(ValueError):
        listwise_rm_loss(r, torch.tensor([[False] * 3, [True] * 3]), torch.tensor([0, 0]))  # empty row


# ----------------------------------------------------------------------------- ECE

def test_ece_hand_computed():
    probs = torch.tensor([0.1, 0.2, 0.9, 0.95])
    labels = torch.tensor([0, 1, 1, 1])
    # bins: {0.1}: |0.1-0|=0.1, {0.2}: |0.2-1|=0.8, {0.9,0.95}: |0.925-1|=0.075
    # ECE = 1/4*0.1 + 1/4*0.8 + 2/4*0.075 = 0.025 + 0.2 + 0.0375 = 0.2625
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.2625, abs=1e-6)
    # p == 1.0 joins the last bin: {1.0, 0.95} vs labels {1, 0}: |0.975 - 0.5| = 0.475
    assert expected_calibration_error(torch.tensor([1.0, 0.95]), torch.tensor([1, 0])) == pytest.approx(0.475, abs=1e-6)
    # same bin: over- and under-confidence cancel within a bin ({0.42, 0.48} vs {1, 0})
    assert expected_calibration_error(torch.tensor([0.42, 0.48]), torch.tensor([1, 0])) == pytest.approx(0.05, abs=1e-6)
    # different bins with 2 bins: {0.3}: 0.3, {0.8}: 0.2 -> (0.3 + 0.2) / 2
    ece = expected_calibration_error(torch.tensor([0.3, 0.8]), torch.tensor([0, 1]), n_bins=2)
    assert ece == pytest.approx(0.25, abs=1e-6)


def test_ece_perfect_calibration_is_zero():
    # each bin's mean confidence equals its positive rate
    probs = torch.tensor([0.25] * 4 + [0.5] * 2 + [0.75] * 4 + [1.0] * 3, dtype=D)
    labels = torch.tensor([1, 0, 0, 0] + [1, 0] + [1, 1, 1, 0] + [1, 1, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------- masked stats

def test_masked_stats_match_selection():
    g = gen(5)
    x = torch.randn(7, 11, generator=g, dtype=D)
    mask = torch.rand(7, 11, generator=g) < 0.6
    mask[0] = False  # an empty row
    xg = torch.where(mask, x, torch.tensor(float("nan"), dtype=D))  # garbage outside the mask
    sel = x[mask]
    for m in (mask, mask.to(D)):  # bool and 0/1 float masks
        torch.testing.assert_close(masked_sum(xg, m), sel.sum())
        torch.testing.assert_close(masked_mean(xg, m), sel.mean())
        torch.testing.assert_close(masked_var(xg, m), sel.var(unbiased=True))
        torch.testing.assert_close(masked_var(xg, m, unbiased=False), sel.var(unbiased=False))
    rows = [x[i][mask[i]] for i in range(7)]
    torch.testing.assert_close(masked_sum(xg, mask, dim=1), torch.stack([r.sum() for r in rows]))
    torch.testing.assert_close(masked_mean(xg, mask, dim=1)[1:], torch.stack([r.mean() for r in rows[1:]]))
    assert masked_mean(xg, mask, dim=1)[0] == 0  # empty row -> 0, not nan
    cols = [x[:, j][mask[:, j]] for j in range(11)]
    torch.testing.assert_close(masked_sum(xg, mask, dim=0), torch.stack([c.sum() for c in cols]))


def test_masked_whiten():
    g = gen(6)
    x = torch.randn(5, 9, generator=g, dtype=D) * 3 + 2
    mask = torch.rand(5, 9, generator=g) < 0.5
    xg = torch.where(mask, x, torch.tensor(float("nan"), dtype=D))
    sel = x[mask]
    w = masked_whiten(xg, mask)
    torch.testing.assert_close(w[mask], (sel - sel.mean()) / torch.sqrt(sel.var() + 1e-8))
    assert (w[~mask] == 0).all()
    assert masked_mean(w, mask).abs() < 1e-12 and abs(masked_var(w, mask).item() - 1) < 1e-6
    w2 = masked_whiten(xg, mask, shift_mean=False)
    torch.testing.assert_close(w2[mask], (sel - sel.mean()) / torch.sqrt(sel.var() + 1e-8) + sel.mean())
    assert (w2[~mask] == 0).all()
    # nan garbage at padding gives no nan gradient
    xr = xg.clone().requires_grad_(True)
    (masked_whiten(xr, mask) * torch.arange(45, dtype=D).view(5, 9)).sum().backward()
    assert torch.isfinite(xr.grad).all() and (xr.grad[~mask] == 0).all()
    xr.grad = None
    masked_var(xr, mask).backward()
    assert torch.isfinite(xr.grad).all()


# ----------------------------------------------------------------------------- GAE

def gae_reference(rewards, values, mask, gamma, lam):
    """Textbook backward recursion (vectorised over B, loop over T)."""
    B, T = rewards.shape
    m = mask.to(rewards.dtype)
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros(B, dtype=rewards.dtype)
    next_v = torch.zeros(B, dtype=rewards.dtype)
    next_m = torch.zeros(B, dtype=rewards.dtype)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_v * next_m - values[:, t]
        adv[:, t] = delta + gamma * lam * next_m * next_adv
        next_adv, next_v, next_m = adv[:, t], values[:, t], m[:, t]
    adv = adv * m
    return adv, (adv + values) * m


def random_span_mask(B, T, g):
    start = torch.randint(0, T, (B,), generator=g)
    end = start + torch.randint(0, T, (B,), generator=g)  # exclusive; may be empty, clipped at T
    t = torch.arange(T)[None, :]
    return (t >= start[:, None]) & (t < end[:, None])


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (1.0, 0.0), (0.9, 0.0), (0.5, 0.7), (1.0, 0.95)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_gae_matches_loop(gamma, lam, dtype, tol):
    g = gen(7)
    B, T = 9, 33
    mask = random_span_mask(B, T, g)
    mask[0] = True  # full row
    mask[1] = False  # empty row
    r = torch.randn(B, T, generator=g, dtype=dtype)
    v = torch.randn(B, T, generator=g, dtype=dtype)
    adv, ret = gae(r, v, mask, gamma, lam)
    ea, er = gae_reference(r.double(), v.double(), mask, gamma, lam)
    torch.testing.assert_close(adv.double(), ea, rtol=tol, atol=tol)
    torch.testing.assert_close(ret.double(), er, rtol=tol, atol=tol)
    adv_f, _ = gae(r, v, mask.to(dtype), gamma, lam)  # 0/1 float mask
    torch.testing.assert_close(adv_f, adv)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_gae_long_sequence(dtype, tol):
    g = gen(8)
    B, T = 4, 512
    mask = random_span_mask(B, T, g)
    mask[0, 3:] = True
    r = torch.randn(B, T, generator=g, dtype=dtype) * 0.1
    v = torch.randn(B, T, generator=g, dtype=dtype) * 0.1
    for gamma, lam in [(1.0, 1.0), (0.99, 0.95)]:
        adv, ret = gae(r, v, mask, gamma, lam)
        assert torch.isfinite(adv).all()
        ea, er = gae_reference(r.double(), v.double(), mask, gamma, lam)
        torch.testing.assert_close(adv.double(), ea, rtol=tol, atol=tol)
        torch.testing.assert_close(ret.double(), er, rtol=tol, atol=tol)


def test_gae_hand_computed():
    gamma, lam = 0.9, 0.5
    # row 0: prompt at t=0, response t=1..2, padding t=3 (its values must not be used)
    # row 1: response t=0..2, padding t=3
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    r = torch.tensor([[0.0, 1.0, 2.0, 0.0], [1.0, 0.0, 1.0, 5.0]], dtype=D)
    v = torch.tensor([[9.0, 0.5, 1.0, 7.0], [0.5, 0.25, 0.5, 3.0]], dtype=D)
    # row 0: d2 = 2 - 1 = 1, A2 = 1;  d1 = 1 + 0.9*1 - 0.5 = 1.4, A1 = 1.4 + 0.45*1 = 1.85
    # row 1: d2 = 1 - 0.5 = 0.5, A2 = 0.5;  d1 = 0 + 0.9*0.5 - 0.25 = 0.2, A1 = 0.2 + 0.45*0.5 = 0.425
    #        d0 = 1 + 0.9*0.25 - 0.5 = 0.725, A0 = 0.725 + 0.45*0.425 = 0.91625
    adv, ret = gae(r, v, mask, gamma, lam)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 1.85, 1.0, 0.0], [0.91625, 0.425, 0.5, 0.0]], dtype=D))
    torch.testing.assert_close(ret, torch.tensor([[0.0, 2.35, 2.0, 0.0], [1.41625, 0.675, 1.0, 0.0]], dtype=D))


def test_gae_rejects_gappy_mask():
    mask = torch.tensor([[1, 0, 1, 0]], dtype=torch.bool)
    with pytest.raises(ValueError):
        gae(torch.zeros(1, 4), torch.zeros(1, 4), mask, 1.0, 1.0)


# ----------------------------------------------------------------------------- PPO surrogate

def test_clipped_surrogate_hand_computed():
    eps = 0.2
    # ratio, A -> min(rA, clip(r)A), clipped?
    # 1.0,  2 -> 2.0            no
    # 1.5,  1 -> min(1.5, 1.2)  = 1.2   yes (A>0, r>1+eps)
    # 0.5,  1 -> min(0.5, 0.8)  = 0.5   no  (unclipped branch is the pessimistic one)
    # 1.5, -1 -> min(-1.5,-1.2) = -1.5  no
    # 0.5, -1 -> min(-0.5,-0.8) = -0.8  yes (A<0, r<1-eps)
    # 1.1, -3 -> -3.3           no
    # 9.0,  5 -> masked out
    ratio = torch.tensor([[1.0, 1.5, 0.5, 1.5], [0.5, 1.1, 9.0, 1.0]], dtype=D)
    A = torch.tensor([[2.0, 1.0, 1.0, -1.0], [-1.0, -3.0, 5.0, 0.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    old = torch.randn(2, 4, generator=gen(9), dtype=D)
    logp = (old + ratio.log()).requires_grad_(True)
    torch.testing.assert_close(policy_ratio(logp, old), ratio)
    l_clip, frac = clipped_surrogate(logp, old, A, mask, eps)
    # (2 + 1.2 + 0.5 - 1.5 - 0.8 - 3.3) / 6 = -1.9 / 6
    assert l_clip.item() == pytest.approx(-1.9 / 6, abs=1e-12)
    assert frac.item() == pytest.approx(2 / 6, abs=1e-12) and not frac.requires_grad
    l_clip.backward()
    # clipped tokens and masked tokens get no gradient; others get ratio * A / n
    expected = torch.tensor([[2.0, 0.0, 0.5, -1.5], [0.0, -3.3, 0.0, 0.0]], dtype=D) / 6
    torch.testing.assert_close(logp.grad, expected)


def test_behaviour_weighted_surrogate_hand_computed():
    """Decoupled PPO: w = min(pi_old / pi_behaviour, cap) multiplies each token's clipped surrogate."""
    old = torch.log(torch.tensor([[0.5, 0.2, 0.9, 0.3]], dtype=D))
    behaviour = torch.log(torch.tensor([[0.25, 0.4, 0.1, 0.3]], dtype=D))  # pi_old / pi_b = 2, 0.5, 9, 1
    w = truncated_is_weights(old, behaviour, cap=3.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5, 3.0, 1.0]], dtype=D))
    assert not w.requires_grad
    ratio = torch.tensor([[1.0, 1.5, 0.5, 1.1]], dtype=D)
    A = torch.tensor([[2.0, 1.0, -1.0, 4.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    logp = (old + ratio.log()).requires_grad_(True)
    l_clip, frac = clipped_surrogate(logp, old, A, mask, 0.2, weights=w)
    # surrogates 2, 1.2 (clipped), -0.8 (clipped), masked; weighted: 4 + 0.6 - 2.4 = 2.2 over 3 tokens
    assert l_clip.item() == pytest.approx(2.2 / 3, abs=1e-12) and frac.item() == pytest.approx(2 / 3)
    l_clip.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[2.0 * 2.0, 0.0, 0.0, 0.0]], dtype=D) / 3)
    # ppo_objective passes them through (beta = c1 = 0: L = L_clip)
    zeros = torch.zeros_like(A)
    loss, st = ppo_objective(logp.detach(), old, A, zeros, zeros, zeros, mask, 0.2, 0.0, 0.0, weights=w)
    assert loss.item() == pytest.approx(-2.2 / 3, abs=1e-12)


# ----------------------------------------------------------------------------- KL

def test_kl_estimators_hand_computed():
    logp, logq = torch.tensor([math.log(0.5)], dtype=D), torch.tensor([math.log(0.25)], dtype=D)
    assert kl_k1(logp, logq).item() == pytest.approx(math.log(2), abs=1e-12)  # 0.693147...
    assert kl_k2(logp, logq).item() == pytest.approx(0.2402265069591007, abs=1e-12)  # 0.5 log(2)^2
    assert kl_k3(logp, logq).item() == pytest.approx(0.1931471805599453, abs=1e-12)  # 0.5 - 1 + log 2
    assert kl_k3(logp, logp).item() == 0.0
    g = gen(10)
    a, b = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    assert (kl_k3(a, b) >= 0).all() and (kl_k2(a, b) >= 0).all()


def test_kl_estimators_monte_carlo():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=D)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=D)
    true_kl = (p * (p / q).log()).sum().item()  # 0.2238046...
    assert true_kl == pytest.approx(0.22380465718564746, abs=1e-12)
    x = torch.multinomial(p, 200_000, replacement=True, generator=gen(11))
    logp, logq = p.log()[x], q.log()[x]
    assert kl_k1(logp, logq).mean().item() == pytest.approx(true_kl, abs=1e-2)
    assert kl_k3(logp, logq).mean().item() == pytest.approx(true_kl, abs=1e-2)


def test_kl_old_new_direction_and_mask():
    g = gen(12)
    old, new = torch.randn(3, 5, generator=g, dtype=D), torch.randn(3, 5, generator=g, dtype=D)
    mask = torch.rand(3, 5, generator=g) < 0.7
    sel = mask
    torch.testing.assert_close(kl_old_new(old, new, mask, "k1"), (old - new)[sel].mean())
    d = new - old  # log q - log p with p = pi_old
    torch.testing.assert_close(kl_old_new(old, new, mask), (d.exp() - 1 - d)[sel].mean())
    torch.testing.assert_close(kl_old_new(old, new, mask, "k2"), (0.5 * d**2)[sel].mean())
    with pytest.raises(ValueError):
        kl_old_new(old, new, mask, "k4")


# ----------------------------------------------------------------------------- value, entropy, logprobs

def test_value_loss_hand_computed():
    V = torch.tensor([[1.0, 2.0, 0.0, 50.0]], dtype=D)
    V_old = torch.tensor([[1.5, 1.0, 0.0, 0.0]], dtype=D)
    R = torch.tensor([[0.0, 3.0, 1.0, 0.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    # unclipped: 0.5 * mean(1, 1, 1) = 0.5
    assert value_loss(V, V_old, R, mask).item() == pytest.approx(0.5, abs=1e-12)
    # clip 0.2: V_clip = (1.3, 1.2, 0.0); errors max((1,1.69), (1,3.24), (1,1)) -> 0.5 * 5.93 / 3
    assert value_loss(V, V_old, R, mask, clip_eps=0.2).item() == pytest.approx(0.5 * 5.93 / 3, abs=1e-12)


def test_entropy_and_logprobs_from_logits():
    g = gen(13)
    logits = torch.randn(2, 3, 17, generator=g) * 4
    labels = torch.randint(0, 17, (2, 3), generator=g)
    torch.testing.assert_close(entropy_from_logits(logits), torch.distributions.Categorical(logits=logits).entropy())
    ref = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(logprobs_from_logits(logits, labels), ref)
    lp16 = logprobs_from_logits(logits.bfloat16(), labels)
    assert lp16.dtype == torch.float32 and entropy_from_logits(logits.bfloat16()).dtype == torch.float32
    # huge logits stay finite
    big = torch.tensor([[[1e4, 0.0, -1e4]]])
    assert torch.isfinite(entropy_from_logits(big)).all()
    assert torch.isfinite(logprobs_from_logits(big, torch.tensor([[2]]))).all()


# ----------------------------------------------------------------------------- objective

@pytest.mark.parametrize("with_entropy", [False, True])
def test_ppo_objective_is_sum_of_parts(with_entropy):
    g = gen(14)
    B, T = 4, 6
    old = torch.randn(B, T, generator=g, dtype=D)
    logp = (old + 0.3 * torch.randn(B, T, generator=g, dtype=D)).requires_grad_(True)
    A, V_old, R = (torch.randn(B, T, generator=g, dtype=D) for _ in range(3))
    V = (V_old + 0.5 * torch.randn(B, T, generator=g, dtype=D)).requires_grad_(True)
    mask = random_span_mask(B, T, g)
    mask[0] = True
    ent = torch.rand(B, T, generator=g, dtype=D) if with_entropy else None
    kw = dict(clip_eps=0.2, beta=0.05, c1=0.5, value_clip_eps=0.2, entropy=ent, entropy_coef=0.01)
    loss, st = ppo_objective(logp, old, A, V, V_old, R, mask, **kw)
    assert isinstance(st, PPOStats)
    l_clip, frac = clipped_surrogate(logp, old, A, mask, 0.2)
    kl = kl_old_new(old, logp, mask, "k3")
    lv = value_loss(V, V_old, R, mask, 0.2)
    h = masked_mean(ent, mask) if with_entropy else torch.zeros((), dtype=D)
    L = l_clip - 0.05 * kl - 0.5 * lv + 0.01 * h
    torch.testing.assert_close(loss, -L)
    for got, want in zip(st, (L, l_clip, kl, lv, frac, h)):
        torch.testing.assert_close(got, want.detach())
        assert not got.requires_grad and got.dim() == 0
    loss.backward()
    assert torch.isfinite(logp.grad).all() and torch.isfinite(V.grad).all()
    assert (logp.grad[~mask] == 0).all() and (V.grad[~mask] == 0).all()


def test_ppo_objective_hand_computed_with_every_term():
    """One sequence, every term of L = w·L_clip - beta·KL_k3 - c1·L_V + c_H·H active, each token taking a
    different branch: token 1 clipped above (A > 0, ratio e^0.2 > 1.2), token 2 clipped below (A < 0,
    ratio e^-0.4 < 0.8), token 3 unclipped (ratio 1); value clipping active on tokens 1 and 3. Position 0
    (prompt) is masked out and holds values that would change every term. Gradients by hand too."""
    mask = torch.tensor([[False, True, True, True]])
    old = torch.tensor([[5.0, -1.0, -0.5, -2.0]], dtype=D)
    logp = torch.tensor([[0.0, -0.8, -0.9, -2.0]], dtype=D, requires_grad=True)
    A = torch.tensor([[9.0, 1.0, -2.0, 0.5]], dtype=D)
    w = torch.tensor([[9.0, 1.0, 0.5, 2.0]], dtype=D)
    V_old = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=D)
    V = torch.tensor([[7.0, 0.5, -0.1, 1.5]], dtype=D, requires_grad=True)
    R = torch.tensor([[-7.0, 1.0, 0.0, 2.0]], dtype=D)
    H = torch.tensor([[9.0, 1.0, 0.5, 1.5]], dtype=D)
    beta, c1, c_h = 0.1, 0.5, 0.01
    loss, st = ppo_objective(logp, old, A, V, V_old, R, mask, clip_eps=0.2, beta=beta, c1=c1, value_clip_eps=0.2,
                             entropy=H, entropy_coef=c_h, weights=w)
    # surrogates: min(r·A, clip(r)·A)·w = 1.2·1·1, 0.8·(-2)·0.5, 1·0.5·2
    l_clip = (1.2 - 0.8 + 1.0) / 3
    kl = ((math.exp(0.2) - 1 - 0.2) + (math.exp(-0.4) - 1 + 0.4) + 0.0) / 3  # k3 = r - 1 - log r
    # value errors max((V - R)^2, (V_old + clip(V - V_old, ±0.2) - R)^2): max(.25, .64), .01, max(.25, .64)
    l_v = 0.5 * (0.64 + 0.01 + 0.64) / 3
    h = (1.0 + 0.5 + 1.5) / 3
    objective = l_clip - beta * kl - c1 * l_v + c_h * h
    assert objective == pytest.approx(0.366109, abs=1e-6)
    for got, want in zip(st, (objective, l_clip, kl, l_v, 2 / 3, h)):
        assert float(got) == pytest.approx(want, rel=1e-12)
    assert float(loss.detach()) == pytest.approx(-objective, rel=1e-12)
    loss.backward()
    # d(-L)/d logp: clipped tokens only feel the KL term, beta·(r - 1)/3; token 3 only the surrogate, -w·r·A/3
    want_logp = [0.0, beta * (math.exp(0.2) - 1) / 3, beta * (math.exp(-0.4) - 1) / 3, -(2.0 * 1.0 * 0.5) / 3]
    assert logp.grad[0].tolist() == pytest.approx(want_logp, rel=1e-12, abs=1e-15)
    # d(-L)/dV: the clipped value branch is flat in V (tokens 1, 3); token 2: c1·0.5·2(V - R)/3
    assert V.grad[0].tolist() == pytest.approx([0.0, 0.0, c1 * 0.5 * 2 * (-0.1 - 0.0) / 3, 0.0], rel=1e-12, abs=1e-15)


# ----------------------------------------------------------------------------- KL control / rewards

def test_adaptive_kl_controller_hand_computed():
    c = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    # kl 9: error = clip(9/6 - 1 = 0.5) = 0.2; mult = 1 + 0.2 * 256 / 10000 = 1.00512
    assert c.update(9.0, 256) == pytest.approx(0.2 * 1.00512, rel=1e-12)
    # kl 3: error = clip(-0.5) = -0.2; mult = 0.99488
    c.update(torch.tensor(3.0), 256)
    assert c.value == pytest.approx(0.2 * 1.00512 * 0.99488, rel=1e-12)
    # kl 6.6: error = 0.1 (inside the clip); mult = 1 + 0.1 * 100 / 10000 = 1.001
    c.update(6.6, 100)
    assert c.value == pytest.approx(0.2 * 1.00512 * 0.99488 * 1.001, rel=1e-12)
    f = FixedKLController(0.1)
    f.update(100.0, 256)
    assert f.value == 0.1


def test_kl_penalized_rewards_hand_computed():
    # row 0: prompt, 2 response tokens, padding; row 1: 4 response tokens; row 2: empty
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    ref = torch.randn(3, 4, generator=gen(15), dtype=D)
    diff = torch.tensor([[5.0, 0.5, -0.25, 7.0], [0.1, 0.2, 0.0, -0.4], [1.0, 1.0, 1.0, 1.0]], dtype=D)
    scores = torch.tensor([1.0, -2.0, 3.0], dtype=D)
    rewards, kl = kl_penalized_rewards(scores, ref + diff, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0, 0.5, -0.25, 0], [0.1, 0.2, 0, -0.4], [0, 0, 0, 0]], dtype=D))
    expected = torch.tensor(
        [[0.0, -0.05, 0.025 + 1.0, 0.0], [-0.01, -0.02, 0.0, 0.04 - 2.0], [0.0, 0.0, 0.0, 0.0]], dtype=D
    )
    torch.testing.assert_close(rewards, expected)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000, 0])
def test_chunked_logprobs_and_entropy_equal_the_full_logits_and_their_gradients(chunk):
    """chunked_logprobs_entropy against log_softmax / entropy of the whole [B, T, V] logits: the same values
    and the same gradients for hidden states, weight and bias, at any chunk size (masked positions 0)."""
    from rlhf_ray.ops import chunked_logprobs_entropy

    g = torch.Generator().manual_seed(0)
    B, T, H, V, temp = 3, 5, 4, 11, 0.7
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight, bias = torch.randn(V, H, generator=g, dtype=torch.float64), torch.randn(V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    up = torch.randn(B, T, generator=g, dtype=torch.float64)  # an arbitrary loss: sum(up * lp) + 0.3 sum(ent)

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
        lp, ent = fn(*leaves)
        ((up * lp).sum() + 0.3 * ent.sum()).backward()
        return lp.detach(), ent.detach(), [t.grad for t in leaves]

    def full(h, w, b):
        logits = (h @ w.T + b) / temp
        logp = torch.log_softmax(logits, -1)
        lp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1)
        return torch.where(mask, lp, 0.0), torch.where(mask, ent, 0.0)

    def chunked(h, w, b):
        return chunked_logprobs_entropy(h, w, labels, mask, bias=b, temperature=temp, chunk_tokens=chunk,
                                        with_entropy=True)

    (lp0, ent0, g0), (lp1, ent1, g1) = grads(full), grads(chunked)
    # (logprobs_from_logits works in float32: float64 inputs agree to float32 rounding)
    torch.testing.assert_close(lp1, lp0.float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(ent1, ent0.float(), rtol=0, atol=1e-5)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # A statistic-only entropy: the same values, no gradient through it.
    lp, ent = chunked_logprobs_entropy(hidden.requires_grad_(), weight, labels, mask, chunk_tokens=chunk,
                                       with_entropy=True, entropy_grad=False)
    assert lp.requires_grad and not ent.requires_grad
    assert chunked_logprobs_entropy(hidden, weight, labels, mask, chunk_tokens=chunk)[1] is None


def test_chunked_logprobs_keep_no_full_logits_for_backward():
    """What autograd saves for backward (every tensor packed by saved_tensors_hooks): with chunks of 4
    tokens nothing bigger than a chunk's logits, the head's weight or the hidden states; the plain path
    keeps the whole [B, T, V] logits."""
    from rlhf_ray.ops import chunked_logprobs_entropy, logprobs_from_logits

    B, T, H, V = 4, 16, 8, 1000
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight, labels = torch.randn(V, H, requires_grad=True), torch.randint(0, V, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    for run in ("chunked", "full"):
        sizes.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if run == "chunked":
                lp, _ = chunked_logprobs_entropy(hidden, weight, labels, mask, chunk_tokens=4)
            else:
                lp = logprobs_from_logits(hidden @ weight.T, labels)
        lp.sum().backward()
        if run == "chunked":
            assert max(sizes) <= max(4 * V, V * H, B * T * H) < B * T * V, sizes
        else:
            assert max(sizes) >= B * T * V
