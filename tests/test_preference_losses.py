"""Every preference loss against a hand computation in plain `math` on fixed log-probs (independent of the implementation),
the settings' defaults against turbo-alignment 0.0.4's, their one-line errors, gradients, the logged metrics and unpaired KTO."""
import math
import pytest
import torch
from alignlab.settings import SettingsError
from alignlab import preference_losses as P


def sig(x): return 1 / (1 + math.exp(-x))
def nls(x): return math.log1p(math.exp(-x))  # -log sigmoid(x)
def odds(p): return p - math.log(1 - math.exp(p))
def T(xs): return torch.tensor(xs, dtype=torch.float64)

# two pairs: policy chosen / rejected, reference chosen / rejected (summed log-probs), and averaged ones for the reference-free losses
PW, PL, RW, RL = [-1.2, -4.0], [-3.0, -2.0], [-1.5, -3.5], [-2.0, -2.5]
AW, AL = [-0.7, -1.1], [-1.3, -0.6]
MARGIN = [0.4, -0.3]
NLL = [0.25, 0.8]


def hand(t, s, i):
    "The loss of pair `i` under loss_type `t` with settings dict `s`, from the raw numbers only."
    b = s.get("beta", 0.1)
    pw, pl, rw, rl = PW[i], PL[i], RW[i], RL[i]
    cw, cl = pw - rw, pl - rl
    D, pi = cw - cl, pw - pl
    m = MARGIN[i]
    if t == "sigmoid":
        e = s.get("label_smoothing", 0.0)
        return (1 - e) * nls(b * D) + e * nls(-b * D)
    if t == "sigmoid_with_margin": return nls(b * D - m)
    if t == "hinge": return max(0.0, 1 - b * (D if s.get("norm", True) else pi))
    if t == "ipo": return (D - 1 / (2 * b)) ** 2
    if t == "kto":
        zw = max(0.0, sum(PW[j] - RW[j] for j in range(2)) / 2)
        zl = max(0.0, sum(PL[j] - RL[j] for j in range(2)) / 2)
        return ((1 - sig(b * (cw - zl))) + (1 - sig(b * (zw - cl)))) / 2
    if t == "cpo": return nls(b * (D if s.get("norm", True) else pi)) + NLL[i]
    if t == "slic_hf":
        return max(0.0, s.get("delta", 1.0) - b * (D if s.get("norm", False) else pi)) - s.get("lam", 0.1) * m
    if t == "apo_zero": return 1 - sig(b * cw) + sig(b * cl)
    if t == "apo_down": return sig(b * cw) + 1 - sig(b * D)
    if t == "dpop": return nls(b * (D - s.get("lam", 0.1) * max(0.0, rw - pw)))
    if t == "nca_pair": return nls(b * cw) + 0.5 * nls(-b * cw) + 0.5 * nls(-b * cl)
    if t == "cal_dpo": return nls(D) + (cw - 1 / (2 * b)) ** 2 + (cl + 1 / (2 * b)) ** 2
    aw, al = AW[i], AL[i]
    lam, ce = s.get("lambda_", 1.0), s.get("ce_coef", 1.0)
    if t == "simpo": return nls(b * (aw - al - s.get("gamma", 0.1)))
    if t == "orpo": return ce * -aw + lam * nls(b * (odds(aw) - odds(al)))
    if t == "asft": return ce * -aw + lam * (nls(b * odds(aw)) + nls(-b * odds(al)))
    raise KeyError(t)


CASES = [{"loss_type": t} for t in P.LOSS_TYPES] + [
    {"loss_type": "sigmoid", "label_smoothing": 0.3, "beta": 0.5}, {"loss_type": "hinge", "norm": False, "beta": 0.7},
    {"loss_type": "ipo", "beta": 0.25}, {"loss_type": "cpo", "norm": False}, {"loss_type": "slic_hf", "norm": True, "delta": 0.5, "lam": 1.0},
    {"loss_type": "simpo", "gamma": 0.5, "beta": 2.0}, {"loss_type": "orpo", "lambda_": 0.5, "ce_coef": 2.0, "beta": 1.0},
    {"loss_type": "asft", "lambda_": 3.0, "ce_coef": 0.1}, {"loss_type": "dpop", "lam": 5.0, "beta": 0.3}, {"loss_type": "cal_dpo", "beta": 1.0},
    {"loss_type": "kto", "beta": 2.0}, {"loss_type": "nca_pair", "beta": 0.9}, {"loss_type": "apo_down", "beta": 3.0}]


def _inputs(t):
    free = t in P.REFERENCE_FREE
    pw, pl = (AW, AL) if free else (PW, PL)
    return [T(pw), T(pl), None if free else T(RW), None if free else T(RL)], pw, pl


@pytest.mark.parametrize("s", CASES, ids=lambda s: "-".join(f"{v}" for v in s.values()))
def test_each_loss_matches_its_hand_computation(s):
    t = s["loss_type"]
    args, pw, pl = _inputs(t)
    nll = T(NLL) if t == "cpo" else None  # cpo: an explicit NLL; orpo/asft: the default, -policy_chosen
    out = P.preference_loss(P.parse_loss_settings(s), *args, margin=T(MARGIN), policy_chosen_nll=nll)
    assert out.losses.shape == (2,)
    for i in range(2): assert out.losses[i].item() == pytest.approx(hand(t, s, i), rel=1e-12, abs=1e-12), (s, i)
    b = s.get("beta", 0.1)
    ref = (0.0, 0.0) if t in P.REFERENCE_FREE else None
    for i in range(2):
        cw = pw[i] - (ref[0] if ref else RW[i]); cl = pl[i] - (ref[1] if ref else RL[i])
        assert out.chosen_rewards[i].item() == pytest.approx(b * cw, abs=1e-12)
        assert out.rejected_rewards[i].item() == pytest.approx(b * cl, abs=1e-12)


def test_every_loss_type_is_covered_by_a_hand_computation():
    assert {s["loss_type"] for s in CASES} == set(P.LOSS_TYPES) and len(P.LOSS_TYPES) == 15


def test_hand_and_code_disagree_when_the_formula_is_wrong():
    """Negative control: the hand formula is sensitive to the terms the code must get right (a flipped sign or a missing β fails)."""
    out = P.preference_loss(P.parse_loss_settings({"loss_type": "ipo"}), T(PW), T(PL), T(RW), T(RL))
    D0 = (PW[0] - RW[0]) - (PL[0] - RL[0])
    assert out.losses[0].item() != pytest.approx((D0 + 5) ** 2)
    assert out.losses[0].item() != pytest.approx((D0 - 0.5) ** 2)
    swapped = P.preference_loss(P.parse_loss_settings({"loss_type": "sigmoid"}), T(PL), T(PW), T(RL), T(RW))
    assert swapped.losses[0].item() != pytest.approx(hand("sigmoid", {}, 0))


def test_orpo_and_asft_default_nll_is_minus_policy_chosen_and_an_explicit_one_replaces_it():
    ls = P.parse_loss_settings({"loss_type": "orpo"})
    a = P.preference_loss(ls, T(AW), T(AL)).losses
    b = P.preference_loss(ls, T(AW), T(AL), policy_chosen_nll=T(NLL)).losses
    for i in range(2): assert (a[i] - b[i]).item() == pytest.approx(-AW[i] - NLL[i], abs=1e-12)


def test_settings_defaults_are_turbos():
    turbo = {"sigmoid": {"label_smoothing": 0}, "sigmoid_with_margin": {}, "hinge": {"norm": True}, "ipo": {}, "kto": {},
             "slic_hf": {"delta": 1.0, "lam": 0.1, "norm": False}, "cpo": {"norm": True}, "orpo": {"lambda_": 1.0, "ce_coef": 1.0},
             "simpo": {"gamma": 0.1}, "apo_zero": {}, "apo_down": {}, "asft": {"lambda_": 1.0, "ce_coef": 1.0}, "dpop": {"lam": 0.1},
             "nca_pair": {}, "cal_dpo": {}}
    assert list(P.LOSS_SETTINGS) == list(turbo)
    for t, f in turbo.items(): assert P.parse_loss_settings({"loss_type": t}).model_dump() == {"loss_type": t, "beta": 0.1, **f}
    assert P.SyncRefModelSettings().model_dump() == {"sync_ref_model": False, "alpha": 1.0, "sync_steps": 1}
    assert P.KTOUnpairedSettings().model_dump() == {"beta": 0.1, "desirable_weight": 1.33, "undesirable_weight": 1.0}
    assert P.REFERENCE_FREE == P.NEEDS_AVERAGE_LOG_PROB == {"simpo", "orpo", "asft"}


@pytest.mark.parametrize("d,where,msg", [
    ({"loss_type": "sigmod"}, "trainer_settings.loss_settings", "trainer_settings.loss_settings.loss_type: 'sigmod' is not one of 'sigmoid', "),
    ({"loss_type": "simPO"}, "x", "did you mean 'simpo'?"),
    ({"beta": 0.2}, "trainer_settings.loss_settings", "trainer_settings.loss_settings.loss_type: missing field; expected one of 'sigmoid', "),
    ({"loss_type": "slic_hf", "delt": 2}, "ls", "ls.delt: unknown key in SlicHfLossSettings; did you mean 'delta'?"),
    ({"loss_type": "orpo", "lambda": 2}, "ls", "ls.lambda: unknown key in ORPOLossSettings; did you mean 'lambda_'?"),
    ({"loss_type": "ipo", "beta": 0}, "ls", "ls.beta: Input should be greater than 0 (got 0)"),
    ({"loss_type": "sigmoid", "label_smoothing": 0.6}, "ls", "ls.label_smoothing: "),
    ("sigmoid", "ls", "ls: expected a JSON object with a loss_type, got a string"),
])
def test_parse_errors_are_one_line_and_name_the_field(d, where, msg):
    with pytest.raises(SettingsError) as e: P.parse_loss_settings(d, where=where)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_check_loss_settings_reproduces_turbos_average_log_prob_rule_and_names_the_reference():
    for t in ("simpo", "orpo", "asft"):
        with pytest.raises(SettingsError, match=f"average_log_prob: false, but loss_type '{t}'"):
            P.check_loss_settings(P.LOSS_SETTINGS[t](), average_log_prob=False, use_ref_model=False)
        assert P.check_loss_settings(P.LOSS_SETTINGS[t](), True, False) == "none"
    assert P.check_loss_settings(P.IPOLossSettings(), False, False) == "adapter-disabled"
    assert P.check_loss_settings(P.IPOLossSettings(), False, True) == "model"


def test_missing_inputs_are_one_line_errors():
    ls = P.parse_loss_settings({"loss_type": "sigmoid_with_margin"})
    with pytest.raises(SettingsError, match="no precomputed_margin given"): P.preference_loss(ls, T(PW), T(PL), T(RW), T(RL))
    with pytest.raises(SettingsError, match="needs reference log-probs"): P.preference_loss(P.IPOLossSettings(), T(PW), T(PL))
    with pytest.raises(ValueError, match="ref_chosen: 1 pairs"): P.preference_loss(P.IPOLossSettings(), T(PW), T(PL), T(RW[:1]), T(RL))
    with pytest.raises(ValueError, match="1-D float tensor"): P.preference_loss(P.IPOLossSettings(), PW, T(PL), T(RW), T(RL))


@pytest.mark.parametrize("t", P.LOSS_TYPES)
def test_gradients_are_finite_for_every_loss_type(t):
    args, _, _ = _inputs(t)
    pw, pl = args[0].clone().float().requires_grad_(), args[1].clone().float().requires_grad_()
    refs = [a.float() if a is not None else None for a in args[2:]]
    out = P.preference_loss(P.parse_loss_settings({"loss_type": t}), pw, pl, *refs, margin=T(MARGIN).float())
    out.losses.mean().backward()
    assert torch.isfinite(pw.grad).all() and torch.isfinite(pl.grad).all() and pw.grad.abs().sum() > 0
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_orpo_stays_finite_at_probability_one():
    pw = T([0.0, -1e-12]).requires_grad_()
    out = P.preference_loss(P.ORPOLossSettings(), pw, T([-1.0, -1.0]))
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(pw.grad).all()


def test_metrics_by_hand():
    ls = P.SigmoidLossSettings(beta=0.5)
    out = P.preference_loss(ls, T(PW), T(PL), T(RW), T(RL))
    m = P.preference_metrics(out, T(PW), T(PL), T(RW), T(RL))
    cw = [0.5 * (PW[i] - RW[i]) for i in range(2)]; cl = [0.5 * (PL[i] - RL[i]) for i in range(2)]
    assert m["rewards/chosen"] == pytest.approx(sum(cw) / 2) and m["rewards/rejected"] == pytest.approx(sum(cl) / 2)
    assert m["rewards/margins"] == pytest.approx((cw[0] - cl[0] + cw[1] - cl[1]) / 2)
    assert m["rewards/accuracies"] == (int(cw[0] > cl[0]) + int(cw[1] > cl[1])) / 2
    acc = [PW[i] > PL[i] for i in range(2)]; racc = [RW[i] > RL[i] for i in range(2)]
    assert acc == [True, False] and racc == [True, False]
    assert m["logps/accuracies"] == 0.5 and m["logps/ref_accuracies"] == 0.5
    assert m["logps/chosen"] == pytest.approx((PW[0] + PW[1]) / 2) and m["logps/ref_rejected"] == pytest.approx((RL[0] + RL[1]) / 2)
    assert [m[f"flips/{k}"] for k in ("correct->correct", "correct->incorrect", "incorrect->correct", "incorrect->incorrect")] == [0.5, 0, 0, 0.5]
    flipped = P.preference_metrics(out, T(PW), T(PL), T(RL), T(RW))  # the reference's answers swapped: both pairs flip
    assert [flipped[f"flips/{k}"] for k in ("correct->correct", "correct->incorrect", "incorrect->correct", "incorrect->incorrect")] == [0, 0.5, 0.5, 0]
    assert all(type(v) is float for v in m.values())
    assert not any(k.startswith("flips") for k in P.preference_metrics(out, T(PW), T(PL)))


def test_unpaired_kto_by_hand():
    ls = P.KTOUnpairedSettings(beta=0.5, desirable_weight=2.0, undesirable_weight=0.5)
    pol, ref, des = [-1.0, -2.0, -3.0, -0.5], [-1.4, -1.5, -3.1, -0.9], [True, False, False, True]
    klp, klr = [-5.0, -6.0, -4.0, -7.0], [-5.3, -6.1, -4.4, -6.9]
    z0 = max(0.0, sum(a - b for a, b in zip(klp, klr)) / 4)
    assert z0 == pytest.approx(0.175)
    k = P.kto_loss(ls, T(pol), T(ref), des, T(klp), T(klr))
    assert k.kl.item() == pytest.approx(z0, abs=1e-12)
    for i in range(4):
        c = pol[i] - ref[i]
        want = 2.0 * (1 - sig(0.5 * (c - z0))) if des[i] else 0.5 * (1 - sig(0.5 * (z0 - c)))
        assert k.losses[i].item() == pytest.approx(want, abs=1e-12)
        assert k.rewards[i].item() == pytest.approx(0.5 * c, abs=1e-12)
    assert P.kto_loss(ls, T(pol), T(ref), des, T([-1.0]), T([0.0])).kl.item() == 0.0  # negative estimate clamped
    m = P.kto_metrics(k, T(pol))
    assert m["rewards/chosen"] == pytest.approx(0.5 * ((0.4 + 0.4) / 2)) and m["rewards/rejected"] == pytest.approx(0.5 * ((-0.5 + 0.1) / 2))
    assert m["logps/chosen"] == pytest.approx(-0.75) and m["kl"] == pytest.approx(0.175)
    p, kp = T(pol).requires_grad_(), T(klp).requires_grad_()
    P.kto_loss(ls, p, T(ref), des, kp, T(klr)).losses.mean().backward()
    assert kp.grad is None and (p.grad[0] < 0) and (p.grad[1] > 0)  # z0 detached; desirable pushed up, undesirable down
    assert P.kl_partners(4) == [1, 2, 3, 0]
