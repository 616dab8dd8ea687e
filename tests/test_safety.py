"Cross-checks of llmlit.safety: closed forms, trained classifiers against the NP rate at stated significance, the verifiers and the loop"
import math
import numpy as np
import pytest
import torch
from scipy import special, stats

import llmlit.safety as S

# ---------- exact classifier theory ----------

def test_ceiling_monotone_and_subpolynomial():
    Ns = np.logspace(2, 15, 40)
    U = np.array([S.utility_ceiling(n, 1) for n in Ns])
    assert (np.diff(U) > 0).all() and (np.diff(U/Ns) < 0).all()
    Bs = np.logspace(-3, 1.5, 20)
    assert (np.diff([S.utility_ceiling(1e6, b) for b in Bs]) > 0).all()
    # slower than any power: the local log-log slope falls below each a > 0 and keeps falling
    gd = S.growth_diagnostics([10.**k for k in (3, 6, 12, 24, 48, 96, 192, 300)])
    assert (np.diff(gd.slope) < 0).all() and gd.slope.iloc[-1] < 0.03
    assert gd.log_ratio[gd.N.between(1e4, 1e12)].between(0.81, 0.90).all()

def test_ceiling_is_even_split_optimum():
    "Jensen: random splits of the same budget never beat U*"
    rng = np.random.default_rng(1)
    for N in (100, 1000):
        best = S.utility_ceiling(N, 1)
        for a in (.2, 1, 5):
            for _ in range(10): assert S.schedule_utility(rng.dirichlet(np.full(N, a))) < best
    assert abs(S.schedule_utility(S.even_schedule(1000)) - S.utility_ceiling(1000, 1)) < 1e-9

def test_llr_interface_matches_gaussian():
    for sep in (.5, 1, 2):
        pair = S.LLRPair(stats.norm(sep**2/2, sep), stats.norm(-sep**2/2, sep))
        ds = np.logspace(-9, -0.01, 50)
        np.testing.assert_allclose(S.tpr_np(ds, pair=pair), S.tpr_np(ds, sep), rtol=1e-7)
        for a in (1.5, 3): assert abs(pair.renyi(a) - S.GaussianPair(sep).renyi(a)) < 1e-6

@pytest.mark.parametrize('sep', [.5, 1, 2])
@pytest.mark.parametrize('alpha', [1.2, 1.5, 2, 3, 5, 10, 30])
def test_holder_bound_above_exact(sep, alpha):
    ds = np.logspace(-14, -1e-9, 2000)
    assert (S.holder_bound(ds, alpha, sep) >= S.tpr_np(ds, sep)*(1 - 1e-12)).all()
    assert (S.holder_bound_opt(ds, sep) >= S.tpr_np(ds, sep)).all()

def test_holder_renyi_power_pair_exponent_tight():
    "Theorem 3: for PowerPair(a) the exponent 1 - 1/a is attained, and D_α blows up at α = a"
    p = S.PowerPair(2.0)
    ds = np.logspace(-10, -0.1, 100)
    np.testing.assert_allclose(p.tpr(ds), ds**0.5)
    for alpha in (1.2, 1.6, 1.9): assert (S.holder_bound(ds, alpha, pair=p) >= p.tpr(ds)).all()
    assert p.renyi(2.0) == math.inf

@pytest.mark.parametrize('p,sep', [(1.3, .5), (1.5, 1), (2, 1), (3, 2), (4, .25)])
def test_counting_and_holder_sum_bounds(p, sep):
    exact = S.np_sum_exact(p, sep=sep, n_terms=200_000)
    assert exact <= S.np_counting_bound(p, sep=sep) + 1e-9
    assert exact <= S.holder_sum_bound(p, sep=sep)[0]
    # layer cake: the floored count equals the exact sum
    assert abs(S.np_counting_bound(p, sep=sep, floor=True) - exact) < 2e-3*exact

def test_dual_conditions_power_law_vs_verifier():
    "p > 1: Σδ and ΣTPR converge (and stay below the Hölder sum bound); a verifier's utility grows linearly"
    for p in (1.5, 2, 3):
        c = 0.5
        bound = S.holder_sum_bound(p, c=c)[0]
        parts = []
        for N in (10**4, 10**5, 10**6):
            d = c*np.arange(1, N + 1, dtype=float)**-p
            dc = S.dual_conditions(d, S.tpr_np(d))
            parts.append(dc['utility'])
            assert dc['utility'] <= bound and dc['risk'] <= c*special.zeta(p)
        assert parts[2] - parts[1] < parts[1] - parts[0]          # increments shrink
        assert dc['utility_last_decade'] < 0.05
    for N in (10**4, 10**6):
        v = S.dual_conditions(np.zeros(N), np.full(N, 0.35))
        assert v['risk'] == 0 and abs(v['utility'] - 0.35*N) < 1e-6*N and abs(v['utility_last_decade'] - 0.9) < 1e-9

@pytest.mark.parametrize('name', list(S.SCHEDULES))
def test_schedules(name):
    d = S.SCHEDULES[name](500, B=0.3)
    assert d.shape == (500,) and (d > 0).all() and (d < 1).all() and (np.diff(d) <= 0).all() and d.sum() <= 0.3 + 1e-12
    with pytest.raises(ValueError, match='N=0'): S.SCHEDULES[name](0)
    with pytest.raises(ValueError, match='B=0'): S.SCHEDULES[name](10, B=0)

@pytest.mark.parametrize('bad', [0, 1, -1e-3, 1.0001, np.nan, [0.5, 1.0]])
def test_bad_delta(bad):
    with pytest.raises(ValueError, match='open interval'): S.holder_bound(bad, 2)
    with pytest.raises(ValueError, match='open interval'): S.schedule_utility(bad)

def _clopper_pearson_upper(k, n, alpha):
    return 1.0 if k == n else stats.beta.ppf(1 - alpha/2, k + 1, n - k)

def test_trained_classifiers_below_np():
    "LDA and a small MLP trained on d=16 Gaussians: TPR ≤ NP(upper 99.9% Clopper-Pearson FPR) + 3 s.e."
    rng = np.random.default_rng(0); d, n_tr, n_te = 16, 20_000, 200_000
    mu = np.zeros(d); mu[0] = 1.0
    xu, xs = rng.standard_normal((n_tr, d)), rng.standard_normal((n_tr, d)) + mu
    w = np.linalg.solve(np.cov(np.vstack([xu, xs]).T), xs.mean(0) - xu.mean(0))       # LDA direction
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(d, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.Adam(mlp.parameters(), 1e-2)
    X = torch.tensor(np.vstack([xu, xs]), dtype=torch.float32); y = torch.cat([torch.zeros(n_tr), torch.ones(n_tr)])
    for _ in range(150):
        opt.zero_grad(); torch.nn.functional.binary_cross_entropy_with_logits(mlp(X).squeeze(-1), y).backward(); opt.step()
    tu, ts = rng.standard_normal((n_te, d)), rng.standard_normal((n_te, d)) + mu
    scorers = dict(lda=lambda x: x @ w, mlp=lambda x: mlp(torch.tensor(x, dtype=torch.float32)).detach().squeeze(-1).numpy())
    for name, f in scorers.items():
        su, ss = f(tu), f(ts)
        for delta in (0.1, 0.01, 0.001):
            thr = np.quantile(su, 1 - delta)
            k = int((su > thr).sum()); tpr = float((ss > thr).mean())
            fpr_hi = _clopper_pearson_upper(k, n_te, 1e-3)
            se = math.sqrt(tpr*(1 - tpr)/n_te)
            assert tpr <= S.tpr_np(fpr_hi) + 3*se, (name, delta, tpr, S.tpr_np(fpr_hi))

# ---------- verifier and loop ----------

def test_verifier_never_accepts_outside_ball():
    g = torch.Generator().manual_seed(0)
    th0 = torch.randn(300, generator=g, dtype=torch.float64)
    v = S.BallVerifier(th0, margin=0.6, L=3.0)
    r = v.radius
    dirs = torch.randn(5000, 300, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=1, keepdim=True)
    radii = torch.rand(5000, generator=g, dtype=torch.float64)*2*r
    radii[:50] = r   # exactly on the boundary
    for d, rad in zip(dirs, radii):
        pt = th0 + rad*d
        if v.accepts(dict(theta=pt)): assert float((pt - th0).norm()) < r
    assert sum(v.accepts(th0 + 0.5*r*d) for d in dirs[:100]) == 100

def test_chained_verifier_recertifies_and_stays_inside():
    "Chained verifier on a 1-Lipschitz harm: every accept lies inside the ball certified at the previous anchor"
    certify = lambda t: (1.0 - float(t.abs().max()), 1.0)    # harm = ‖θ‖_∞ ≤ ‖θ‖₂: 1-Lipschitz
    v = S.ChainedBallVerifier(torch.zeros(20, dtype=torch.float64), certify)
    g = torch.Generator().manual_seed(3)
    th = torch.zeros(20, dtype=torch.float64)
    for _ in range(500):
        prop = th + 0.05*torch.randn(20, generator=g, dtype=torch.float64)
        r, anchor = v.radius, v.theta0.clone()
        if v.accepts(prop):
            assert float((prop - anchor).norm()) < r and float(prop.abs().max()) < 1.0
            th = prop; v.update(prop)
    assert len(v.radii) > 5

def test_self_improvement_loop_counts():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__(); self.w = torch.nn.Module(); self.w.lora_A = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    toy, g = Toy(), torch.Generator().manual_seed(0)
    prop = lambda m, th, n: dict(theta=th + 0.2*torch.randn(2, generator=g, dtype=torch.float64), kind='r', score=float(-n))
    oracle = lambda m: float(S.get_theta(m).norm()) > 1
    ver = S.ChainedBallVerifier(S.get_theta(toy), lambda t: (1 - float(t.norm()), 1.0))
    df = S.self_improvement_loop(toy, prop, ver, 400, oracle=oracle)
    s = S.gate_summary(df)
    assert s['unsafe_accepts'] == 0 and s['safe_accepts'] > 0 and s['safe_proposals'] + s['unsafe_proposals'] == 400
    assert df.safe_accepts.iloc[-1] == s['safe_accepts']
    clf = S.ClassifierGate(S.basel_schedule(400), np.random.default_rng(0).normal(-50, 5, 100))
    toy2 = Toy(); dfc = S.self_improvement_loop(toy2, prop, clf, 400, oracle=oracle)
    assert dfc.accepted.iloc[:10].sum() >= dfc.accepted.iloc[-10:].sum()
    with pytest.raises(ValueError, match='steps'): S.self_improvement_loop(toy, prop, ver, 0, oracle=oracle)
