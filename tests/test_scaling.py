"Cross-checks of llmlit.scaling: the Chinchilla refit, closed-form optima, inference-aware allocation, pass@k estimators"
import math, time
from pathlib import Path
import numpy as np, pytest
from llmlit.scaling import (BESIROGLU_2024, HOFFMANN_2022, ChinchillaLaw, T2Law, beta_pass_at_k, chinchilla_optimal, fit_chinchilla,
                            fit_t2_loss, inference_flops, lbfgs_batch, load_chinchilla_points, optimal_allocation,
                            optimal_allocation_total, pass_at_k, pass_at_k_from_p, task_loss_k)

CSV = Path(__file__).resolve().parents[1]/'data'/'chinchilla_fig4_points.csv'
needs_csv = pytest.mark.skipif(not CSV.is_file(), reason='data/chinchilla_fig4_points.csv not in this checkout')

@pytest.fixture(scope='module')
def chin():
    return load_chinchilla_points(CSV)

@pytest.fixture(scope='module')
def chin_fit(chin):
    t0 = time.perf_counter()
    law = fit_chinchilla(*chin)
    return law, time.perf_counter() - t0

@needs_csv
def test_loader_drops_five_highest(chin):
    N, D, L = chin
    assert len(N) == 240 and (N > 0).all() and (D > 0).all()
    N0, D0, L0 = load_chinchilla_points(CSV, drop=0)
    assert len(N0) == 245 and L.max() <= np.sort(L0)[-6] + 1e-12

@needs_csv
def test_recovers_besiroglu(chin_fit):
    "Tolerances: E, alpha to 1e-3, beta to 2e-3 absolute; A within 2%, B within 4% (the least determined)"
    law, secs = chin_fit
    pub = BESIROGLU_2024
    assert abs(law.E - pub.E) < 1e-3 and abs(law.alpha - pub.alpha) < 1e-3 and abs(law.beta - pub.beta) < 2e-3
    assert abs(law.A / pub.A - 1) < 0.02 and abs(law.B / pub.B - 1) < 0.04
    # the exact minimum of the summed-Huber objective (the spec's scipy check: A ~ 478, B ~ 2143)
    assert abs(law.A - 478) < 3 and abs(law.B - 2143) < 15
    assert law.info['n_best'] >= 10 and secs < 30, (law.info, secs)

@needs_csv
def test_pruning_keeps_the_basin(chin, chin_fit):
    "Continuing five times as many starts after the warm-up finds the same optimum"
    law, wide = chin_fit[0], fit_chinchilla(*chin, keep=1000)
    np.testing.assert_allclose(list(wide.coefs().values()), list(law.coefs().values()), rtol=1e-5)

@pytest.mark.slow
@needs_csv
def test_unpruned_grid_same_optimum(chin, chin_fit):
    "All 4,500 starts run to convergence reach the pruned fit's optimum"
    full = fit_chinchilla(*chin, keep=None)
    np.testing.assert_allclose(list(full.coefs().values()), list(chin_fit[0].coefs().values()), rtol=1e-5)
    assert full.info['objective'] >= chin_fit[0].info['objective'] * (1 - 1e-9)

@needs_csv
def test_bootstrap_intervals(chin):
    law = fit_chinchilla(*chin, n_boot=10, seed=1)
    assert law.info['boot_converged'] >= 9
    for k, v in law.coefs().items():
        lo, hi = law.ci[k]
        assert lo < hi and lo <= v * 1.05 and hi >= v * 0.95, (k, lo, v, hi)

def test_recovers_planted_t2_law():
    "Noise-free L(N, D, k) on a grid: exponents within 1%"
    planted = T2Law(E=1.7, A=300., B=900., alpha=0.32, beta=0.29, G=0.8, gamma=0.45)
    N, D, k = [a.ravel() for a in np.meshgrid(np.logspace(6, 9, 5), np.logspace(8, 11, 5), np.array([1, 2, 4, 16, 64, 256]))]
    fit = fit_t2_loss(N, D, k, planted.loss(N, D, k))
    for name in ('alpha', 'beta', 'gamma'): assert abs(getattr(fit, name) / getattr(planted, name) - 1) < 0.01, fit
    assert abs(fit.E - 1.7) < 0.01

def test_fit_errors():
    N, D = np.logspace(7, 9, 20), np.logspace(9, 11, 20)
    L = BESIROGLU_2024.loss(N, D)
    for bad in (dict(N=-N), dict(D=np.where(D > 1e10, 0, D)), dict(loss=np.nan * L)):
        args = {**dict(N=N, D=D, loss=L), **bad}
        with pytest.raises(ValueError, match='> 0'): fit_chinchilla(args['N'], args['D'], args['loss'])
    with pytest.raises(ValueError, match='same length'): fit_chinchilla(N, D[:5], L)
    with pytest.raises(ValueError, match='more than'): fit_chinchilla(N[:4], D[:4], L[:4])
    from llmlit.scaling import fit_lse_law
    with pytest.raises(RuntimeError, match='did not converge'): fit_lse_law(dict(N=N, D=D), L, max_iter=2)
    with pytest.raises(RuntimeError, match='degenerate'): fit_lse_law(dict(N=N, D=D), L, max_exponent=0.3)

def test_chinchilla_optimal_spec_values():
    o = chinchilla_optimal(5.76e23)
    assert abs(o['N'] / 7.22e10 - 1) < 0.005 and abs(o['tokens_per_param'] - 18.4) < 0.1
    o = chinchilla_optimal(2.56e19)
    assert abs(o['N'] / 4.2e8 - 1) < 0.02 and abs(o['tokens_per_param'] - 23.7) < 0.1
    r = chinchilla_optimal(np.logspace(18, 24, 13))['tokens_per_param']
    assert ((r >= 17) & (r <= 26)).all()
    assert abs(chinchilla_optimal(5.76e23, **HOFFMANN_2022.coefs())['tokens_per_param'] - 92.6) < 0.5  # rounded coefficients mislead

@pytest.mark.parametrize('C', [1e18, 2.56e19, 1e22, 5.76e23])
def test_numeric_matches_closed_form(C):
    "k independent of N (no k-term, or C_inf unbounded): the scan + golden section matches Eq. 4 within 0.5%"
    for law, C_inf in ((BESIROGLU_2024, 1e30), (T2Law(**BESIROGLU_2024.coefs(), G=0.5, gamma=0.5), np.inf)):
        assert abs(optimal_allocation(C, C_inf, law)['N'] / chinchilla_optimal(C)['N'] - 1) < 0.005

def test_spec_demonstration():
    "The spec's demonstration (Besiroglu + G/k^gamma, C_train = 2.56e19), within 5%"
    for G, C_inf, N, r, k in ((0.5, 2e9, 1.8e8, 136, 5.6), (0.5, 2e10, 3.0e8, 49, 34), (2, 2e9, 6.1e7, 1154, 16), (2, 2e10, 1.5e8, 183, 66)):
        a = optimal_allocation(2.56e19, C_inf, T2Law(**BESIROGLU_2024.coefs(), G=G, gamma=0.5))
        assert abs(a['N'] / N - 1) < 0.05 and abs(a['tokens_per_param'] / r - 1) < 0.05 and abs(a['k'] / k - 1) < 0.05, (G, C_inf, a)
        assert abs(6 * a['N'] * a['D'] / 2.56e19 - 1) < 1e-9 and abs(2 * a['N'] * a['k'] / C_inf - 1) < 1e-9

def test_inference_shifts_optimum_monotonically():
    "Scarcer inference budget -> smaller N*, more tokens per parameter; as C_inf grows, back to Chinchilla's optimum"
    law, C = T2Law(**BESIROGLU_2024.coefs(), G=0.5, gamma=0.5), 2.56e19
    chin = chinchilla_optimal(C)
    al = [optimal_allocation(C, ci, law) for ci in np.logspace(8.5, 14, 12)]
    Ns, rs = np.array([a['N'] for a in al]), np.array([a['tokens_per_param'] for a in al])
    assert (np.diff(Ns) > 0).all() and (np.diff(rs) < 0).all() and (Ns < chin['N']).all()
    assert abs(optimal_allocation(C, 1e18, law)['N'] / chin['N'] - 1) < 0.01
    # one total budget (our design): more queries -> smaller N*, more tokens per parameter
    tot = [optimal_allocation_total(1e21, law, q, 100) for q in np.logspace(3, 9, 7)]
    Nt, rt = np.array([a['N'] for a in tot]), np.array([a['tokens_per_param'] for a in tot])
    assert (np.diff(Nt) < 0).all() and (np.diff(rt) > 0).all()

def test_allocation_errors():
    law = T2Law(**BESIROGLU_2024.coefs(), G=0.5, gamma=0.5)
    with pytest.raises(ValueError, match='no N in'): optimal_allocation(2.56e19, 1e4, law)
    with pytest.raises(ValueError, match='no N in'): optimal_allocation(1e3, 2e9, law)
    with pytest.raises(ValueError, match='k_min'): optimal_allocation(2.56e19, 2e9, law, k_min=0.5)
    with pytest.raises(ValueError, match='C='): optimal_allocation_total(-1, law, 10)
    with pytest.raises(ValueError, match='no N in'): optimal_allocation_total(1e5, law, 10)
    with pytest.raises(ValueError, match='k='): inference_flops(1e9, 0)

def test_pass_at_k_unbiased_by_simulation():
    "Mean over 2e5 binomial draws (p=0.07, n=50, k=10) within 4 standard errors of the truth; the plug-in is not"
    rng = np.random.default_rng(0)
    c = rng.binomial(50, 0.07, 200_000)
    est, truth = pass_at_k(50, c, 10), 1 - 0.93**10
    se = est.std() / math.sqrt(len(c))
    assert abs(est.mean() - truth) < 4 * se
    assert abs((1 - (1 - c / 50)**10).mean() - truth) > 20 * se

def test_pass_at_k_exact_and_edges():
    rng = np.random.default_rng(1)
    n = rng.integers(1, 60, 200); c = rng.integers(0, n + 1); k = rng.integers(1, n + 1)
    ref = [1.0 if nn - cc < kk else 1 - math.comb(nn - cc, kk) / math.comb(nn, kk) for nn, cc, kk in zip(n, c, k)]
    np.testing.assert_allclose(pass_at_k(n, c, k), ref, rtol=1e-10, atol=1e-12)
    assert pass_at_k(20, 0, 5) == 0 and pass_at_k(20, 18, 3) == 1 and abs(pass_at_k(20, 7, 1) - 0.35) < 1e-12
    for bad in (dict(k=0), dict(c=21), dict(k=25), dict(k=1.5)):
        with pytest.raises(ValueError): pass_at_k(**{**dict(n=20, c=3, k=2), **bad})

def test_beta_closed_form_vs_monte_carlo():
    "a=0.3, b=2, 2e6 draws: the spec's values and |closed form - MC| < 5e-4"
    ks = np.array([1, 4, 16, 64, 256])
    cf = beta_pass_at_k(0.3, 2.0, ks)
    np.testing.assert_allclose(cf, [0.1304, 0.3063, 0.5069, 0.6675, 0.7794], atol=1e-4)
    p = np.random.default_rng(0).beta(0.3, 2.0, 2_000_000)
    mc = np.array([(-np.expm1(k * np.log1p(-p))).mean() for k in ks])
    assert np.abs(cf - mc).max() < 5e-4
    np.testing.assert_allclose(pass_at_k_from_p(p[:1000], ks), [(1 - (1 - p[:1000])**k).mean() for k in ks])

def test_task_loss():
    p = np.random.default_rng(2).uniform(0.01, 0.9, 300)
    assert abs(task_loss_k(p, 1) - (-np.log(p)).mean()) < 1e-12
    l = task_loss_k(p, np.array([1, 2, 8, 64, 4096]))
    assert (np.diff(l) < 0).all() and l[-1] < 1e-6

def test_lbfgs_batch_independent_rows():
    "Each row is its own L-BFGS run: a batch gives the same answers as the rows one by one"
    q = lambda x, rows: (((x - rows[:, None]) ** 2).sum(1) + (x**4).sum(1), 2 * (x - rows[:, None]) + 4 * x**3)
    x0 = np.random.default_rng(3).normal(size=(5, 3))
    both = lbfgs_batch(q, x0)
    for i in range(5):
        one = lbfgs_batch(lambda x, rows: q(x, rows + i), x0[i:i + 1])
        np.testing.assert_allclose(both['x'][i], one['x'][0], atol=1e-7)
    assert both['converged'].all()

def test_sweep_at_toy_size():
    "Two tiny Llamas on the addition task: token and FLOP accounting, pass@k rising in k, the teacher-forced p_i in (0, 1]"
    from llmlit.scaling import scaling_sweep
    runs = scaling_sweep([3000, 6000], [2], overtrained=[(3000, 4)], n_eval=64, batch_size=8, k_grid=(1, 4, 16), max_steps=3)
    assert [r['kind'] for r in runs] == ['chinchilla', 'chinchilla', 'overtrained']
    for r in runs:
        assert r['D'] == r['steps'] * 8 * 65 and r['flops_exact'] > r['flops_6nd'] == 6 * r['N'] * r['D']
        assert abs(r['n_params'] / (3000 if r['n_params'] < 4500 else 6000) - 1) < 0.05 and r['N'] < r['n_params']
        assert np.all(np.diff(r['pass_at_k']) > 0) and np.all(np.diff(r['task_loss']) < 0) and 0 < r['pass_at_k'][0] < 1
    with pytest.raises(ValueError, match='> 0'): scaling_sweep([3000], [0])

def test_module_imports_without_notebooks():
    import llmlit.scaling as m
    assert m.fit_chinchilla.__module__ == 'llmlit.scaling'

def test_beta_link_recovers_planted_theta():
    "Approach 2: theta of a planted loss -> Beta link from 12 runs x 20,000 questions; pass@k of the fit vs the truth within 0.01"
    from llmlit.scaling import BetaLink, fit_beta_link
    truth, L = BetaLink((-1.0, 1.5, 2.0, -0.5)), np.linspace(0.5, 2.5, 12)
    a, b = truth.beta_params(L)
    p = np.random.default_rng(7).beta(a[:, None], b[:, None], (12, 20_000))
    fit = fit_beta_link(L, p)
    np.testing.assert_allclose(fit.theta, truth.theta, atol=0.1)
    for k in (1, 8, 64): assert np.abs(fit.pass_at_k(L, k) - truth.pass_at_k(L, k)).max() < 0.01
    with pytest.raises(ValueError, match='in \\[0, 1\\]'): fit_beta_link(L, p + 1)
