"Cross-checks of llmlit.ecology: the spec's closed forms and theorems on planted finite ecologies, a frozen tiny Llama"
import itertools, math, os
import numpy as np, pytest, torch
from llmlit.data import language_tables, sample_languages
from llmlit.ecology import *
from llmlit.models import tiny_llama


def planted(seed, n=6):
    "A random ecology of n worlds with an exact copy, a training-hidden copy and a zero-mass context"
    return random_ecology(n, 3, 4, seed=seed, copies=[(0, 1)], hidden=[(2, 3)])

def H(*p): return -sum(x * math.log(x) for x in p if x > 0)

@pytest.mark.parametrize('seed', range(3))
def test_decomposition_all_partitions_of_six(seed):
    eco = planted(seed)
    floor = entropy_floor(eco)
    assert max(abs(bayes_loss(eco, p) - floor - js_excess(eco, p)) for p in all_partitions(6)) < 1e-12

@pytest.mark.parametrize('seed', range(3))
def test_zero_excess_iff_refines_quotient(seed):
    eco = planted(seed)
    q = quotient(eco)
    assert q[0] == q[1] and q[2] == q[3] and len(set(q.tolist())) == 4      # the zero-mass difference counts as equivalent
    assert all((abs(excess(eco, p)) < 1e-12) == refines(p, q) for p in all_partitions(6))

def test_minimum_complexity_is_the_quotient():
    eco = planted(4)
    q = quotient(eco)
    zero = [p for p in all_partitions(6) if abs(excess(eco, p)) < 1e-12]
    best = min(zero, key=lambda p: complexity(eco, p))
    np.testing.assert_array_equal(best, q)
    cond = sum(eco.prior[q == k].sum() * H(*(eco.prior[q == k] / eco.prior[q == k].sum())) for k in np.unique(q))
    assert abs(complexity(eco, range(6)) - complexity(eco, q) - cond) < 1e-12

@pytest.mark.parametrize('beta', [0, .05, .1, .2, .4])
def test_split_identity(beta):
    eco = random_ecology(5, 2, 3, seed=11)
    p = np.array([0, 0, 0, 1, 1])
    for A in ([0], [1], [2], [0, 1]):
        B = [w for w in (0, 1, 2) if w not in A]
        q = p.copy(); q[A] = 2
        lam = eco.prior[A].sum() / eco.prior[[0, 1, 2]].sum()
        lhs = objective(eco, p, beta) - objective(eco, q, beta)
        assert abs(lhs - eco.prior[[0, 1, 2]].sum() * (split_gain(eco, A, B) - beta * H(lam, 1 - lam))) < 1e-12

def test_toy_vector_closed_form():
    eco = FiniteEcology([.5, .5], [1.], [[[.9, .1]], [[.5, .5]]])
    js = H(.7, .3) - (H(.9, .1) + H(.5, .5)) / 2
    assert abs(split_gain(eco, [0], [1]) - js) < 1e-15 and abs(split_beta(eco, [0], [1]) - js / math.log(2)) < 1e-15
    assert round(js, 7) == 0.1017492 and round(js / math.log(2), 7) == 0.1467931

@pytest.mark.parametrize('seed', range(4))
def test_beta_min_threshold(seed):
    eco = planted(seed, n=5)
    q, b = quotient(eco), beta_min(eco)
    assert is_local_min(eco, q, b - 1e-9) and not is_local_min(eco, q, b + 1e-9)

def test_merge_order_follows_local_rule_on_families():
    "Two families of near-copies: greedy merges (within families first, then across) match the global optimum"
    rng = np.random.default_rng(0)
    base = rng.dirichlet(np.ones(4), size=(2, 3))
    P = np.stack([(1 - e) * base[f] + e * rng.dirichlet(np.ones(4), size=3) for f, e in ((0, .05), (0, .1), (1, .05), (1, .1), (1, .2))])
    eco = FiniteEcology(np.full(5, .2), np.full(3, 1 / 3), P)
    assert all(follows_local_rule(eco))
    assert greedy_merges(eco)[-2]['labels'] == [0, 0, 1, 1, 1]     # the families are the last two cells

def test_off_ecology_bound_holds_and_is_tight():
    tr = planted(2)
    dep = FiniteEcology(tr.prior, np.full(4, .25), tr.next_token)
    for p in all_partitions(6):
        p = np.array(p)
        for i, j in itertools.combinations(range(6), 2):
            if p[i] == p[j]: assert js_excess(dep, p) >= off_ecology_bound(dep, i, j) - 1e-12
    two = np.array([0, 1, 2, 2, 3, 4])
    assert abs(js_excess(dep, two) - off_ecology_bound(dep, 2, 3)) < 1e-12

def test_injection_linear_and_threshold():
    tr = planted(3)
    ev = FiniteEcology(tr.prior, np.full(4, .25), tr.next_token)
    s0, s1 = task_distances(tr), task_distances(ev)
    for a in (0, .3, .7, 1): np.testing.assert_allclose(task_distances(mix(tr, ev, a)), (1 - a) * s0 + a * s1, atol=1e-14)
    eps = s1[2, 3] / 3
    a_star = injection_threshold(s0[2, 3], s1[2, 3], eps)
    assert (2, 3) in rescued(tr, ev, eps, a_star + 1e-9)[0] and (2, 3) not in rescued(tr, ev, eps, a_star - 1e-9)[0]

def test_frozen_model_separation_set():
    "Two obs tokens with identical embedding rows are indistinguishable for every prompt; one gradient step on a task separates them"
    torch.manual_seed(0)
    m = tiny_llama(vocab_size=16, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4).eval()
    with torch.no_grad(): m.model.embed_tokens.weight[5] = m.model.embed_tokens.weight[4]
    prompts = torch.randint(0, 16, (8, 6))
    out = lambda obs: m(torch.cat([prompts, torch.full((8, 1), obs)], 1)).logits
    with torch.no_grad(): assert torch.equal(out(4), out(5))
    loss = -out(4)[:, -1].log_softmax(-1)[:, 0].mean()      # a task that needs only obs 4's continuation
    loss.backward()
    with torch.no_grad():
        for q in m.parameters():
            if q.grad is not None: q -= 0.5 * q.grad
        assert not torch.allclose(out(4), out(5))

def test_induced_partition_joins_planted_copies():
    T = language_tables(4, 9, copies=[(0, 1)], seed=3)
    tables = T.clamp_min(1e-30).log().float()
    class Chain(torch.nn.Module):
        def __init__(self, t): super().__init__(); self.t = torch.nn.Parameter(t, requires_grad=False)
        def forward(self, input_ids, **kw): return type('O', (), dict(logits=self.t[input_ids % self.t.shape[0]]))
    laws = np.stack([model_laws(Chain(tables[w]), sample_languages(T[w:w + 1], 400, 8, seed=w)[0], [3, 5, 8], 9) for w in range(4)])
    D, tau = behavioural_distances(laws), calibrate_tau(laws, seed=0)
    p = induced_partition(D, tau)
    assert tau > 0 and p[0] == p[1] and len(set(p.tolist())) == 3

@pytest.mark.parametrize('bad, match', [
    (lambda: FiniteEcology([.5, .5 + 1e-8], [1.], np.full((2, 1, 2), .5)), 'prior must sum'),
    (lambda: FiniteEcology([.5, .5], [1.], np.full((2, 1, 2), .5) + [0, 1e-8]), 'next_token must sum'),
    (lambda: FiniteEcology([.5, .5], [1.], np.full((3, 1, 2), .5)), 'expected'),
    (lambda: FiniteEcology([.5, .5], [.5, .5], np.full((2, 1, 2), .5)), 'expected'),
    (lambda: FiniteEcology([[.5, .5]], [1.], np.full((2, 1, 2), .5)), 'axes'),
    (lambda: objective(planted(0), range(6), -0.1), 'beta'),
    (lambda: bayes_loss(planted(0), [0, 0, 1]), 'cover every world'),
    (lambda: split_gain(planted(0), [0, 1], [1, 2]), 'disjoint'),
    (lambda: split_gain(planted(0), [], [1]), 'non-empty'),
    (lambda: refines([0, 1], [0, 0, 1]), 'different sizes'),
    (lambda: all_partitions(0), 'n='),
    (lambda: quotient(planted(0), atol=-1), 'atol'),
    (lambda: injection_threshold(.2, .1, .15), 'eps'),
])
def test_bad_input(bad, match):
    with pytest.raises(ValueError, match=match): bad()

def test_module_imports_without_notebooks():
    import llmlit.ecology as m
    assert m.FiniteEcology.__module__ == 'llmlit.ecology'

def test_price_term_is_the_expected_parent_shift():
    "Mean over Wright-Fisher draws of the selected parents' mean minus the population mean = Cov(f, z)/fbar, within 4 standard errors"
    rng = np.random.default_rng(0)
    z, f = rng.uniform(0, 1, 12), rng.uniform(0.2, 1, 12)
    shifts = np.array([z[wright_fisher(f, rng)].mean() - z.mean() for _ in range(20000)])
    assert abs(shifts.mean() - price_selection(z, f)) < 4 * shifts.std() / math.sqrt(len(shifts))

def test_evaluation_fitness_is_nondecreasing_in_a():
    tok = random_ecology(5, 3, 3, seed=7, hidden=[(2, 3), (3, 4)])
    ev = FiniteEcology(tok.prior, np.full(4, .25), tok.next_token)
    f = eval_fitness(tok, ev, 1e-3)(np.linspace(0, 1, 41))
    assert (np.diff(f) >= -1e-12).all() and f[-1] > f[0]
