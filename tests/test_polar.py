"Cross-checks of llmlit.polar: the VBLL head against the `vbll` package, Laplace where it is exact, PoLAR against PEFT's LoRA"
import copy, math
import numpy as np, pytest, torch
import torch.nn as nn
from llmlit.adapters import replace_linears, target_linears
from llmlit.data import MC_FIRST, MC_GROUP, MC_LABELS, MC_VOCAB, arithmetic_mc, mc_task, tokenize_mc
from llmlit.polar import (COVS, LandingAdamW, PoLARLinear, PoLARVBLL, VBLLClassifier, add_polar_adapters,
                          calibration, ece, landing_field, laplace_refine, label_token_ids, merge_polar, nll, polar_layers,
                          stiefel_error, toy_stiefel_fit)
from llmlit.models import char_tokenizer, tiny_gpt2, tiny_llama

def _pair(cov, d=6, C=3, seed=0):
    "Our head and vbll's DiscClassification with the same parameters, float64, vbll's logit noise switched off"
    vbll = pytest.importorskip('vbll')
    torch.manual_seed(seed)
    ref = vbll.DiscClassification(d, C, regularization_weight=0.1, parameterization=cov, prior_scale=1.3, cov_rank=2).double()
    ours = VBLLClassifier(d, C, cov=cov, prior_scale=1.3, cov_rank=2).double()
    with torch.no_grad():
        ref.noise_logdiag.fill_(-30.)
        ref.W_logdiag.copy_(torch.randn(C, d) * 0.3 - 1); ref.W_mean.normal_()
        ours.W_mean.copy_(ref.W_mean); ours.W_logdiag.copy_(ref.W_logdiag)
        if cov != 'diagonal':
            ref.W_offdiag.normal_(0, 0.3); ours.W_offdiag.copy_(ref.W_offdiag)
    return ours, ref

@pytest.mark.parametrize('cov', COVS)
def test_vbll_parity(cov):
    "Jensen bound, KL (vbll drops the -d/2 per class) and train loss equal vbll's for the same parameters and features"
    from vbll.layers.classification import gaussian_kl
    ours, ref = _pair(cov)
    x, y = torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 3, (9,))
    torch.testing.assert_close(ours.jensen(x, y), ref.jensen_bound(x, y), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.kl(), gaussian_kl(ref.W(), ref.prior_scale) - 3 * 6 / 2, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.covariance(), ref.W().covariance, atol=1e-10, rtol=0)
    m, v = ours.logit_moments(x)
    pred = ref.logit_predictive(x)
    torch.testing.assert_close(m, pred.mean, atol=1e-10, rtol=0); torch.testing.assert_close(v, pred.covariance_diagonal, atol=1e-8, rtol=0)

@pytest.mark.parametrize('cov', COVS)
def test_vbll_predictive(cov):
    "With the same random draws our Monte Carlo predictive equals vbll's; with many draws both approach each other"
    ours, ref = _pair(cov)
    x = torch.randn(9, 6, dtype=torch.float64)
    torch.manual_seed(5); p_ref = ref.predictive(x, n_samples=20)
    torch.manual_seed(5); p_ours = ours.predict_proba(x, n_samples=20)
    torch.testing.assert_close(p_ours, p_ref, atol=1e-6, rtol=0)

def test_probit_close_to_mc():
    "The sampling-free probit predictive stays within 0.03 of a 200k-sample Monte Carlo predictive for logit variances up to 1"
    torch.manual_seed(0)
    h = VBLLClassifier(8, 4, cov='diagonal').double()
    with torch.no_grad(): h.W_logdiag.uniform_(-3, -1.5)
    x = torch.randn(50, 8, dtype=torch.float64)
    assert h.logit_moments(x)[1].max() < 1.5
    gap = (h.predict_proba(x, n_samples=200_000) - h.predict_proba(x, method='probit')).abs().max()
    assert gap < 0.03, gap

def test_jensen_below_mc():
    "The Jensen bound lies below E_q log softmax (Monte Carlo, 4 s.e.) and equals log softmax when v = 0"
    torch.manual_seed(0)
    h = VBLLClassifier(5, 3, cov='diagonal').double()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    m, v = h.logit_moments(x)
    s = torch.log_softmax(m + v.sqrt() * torch.randn(20_000, *m.shape, dtype=torch.float64), -1)[:, torch.arange(20), y]
    assert (h.jensen(x, y) <= s.mean(0) + 4 * s.std(0) / math.sqrt(20_000)).all()
    with torch.no_grad(): h.W_logdiag.fill_(-40.)
    torch.testing.assert_close(h.jensen(x, y), torch.log_softmax(m, -1)[torch.arange(20), y], atol=1e-10, rtol=0)

def test_kl_gradient_near_singular():
    "KL and its gradient stay finite for a nearly singular dense S"
    h = VBLLClassifier(4, 2)
    with torch.no_grad(): h.W_logdiag.fill_(-12.)
    h.kl().backward()
    assert torch.isfinite(h.W_logdiag.grad).all() and torch.isfinite(h.W_offdiag.grad).all()

def test_laplace_gaussian_exact():
    "Gaussian likelihood: laplace_refine gives the exact posterior (Woodbury form of Gaussian conditioning, autograd Hessian)"
    torch.manual_seed(0)
    N, d, s2, tau = 30, 5, 0.3, 2.0
    Phi, y = torch.randn(N, d, dtype=torch.float64), torch.randn(N, 1, dtype=torch.float64)
    h = VBLLClassifier(d, 1).double()
    Lam = laplace_refine(h, Phi, y, prior_prec=tau, likelihood='gaussian', sigma2=s2)
    K = Phi @ Phi.T / tau + s2 * torch.eye(N, dtype=torch.float64)                  # function-space form
    S_ref = torch.eye(d, dtype=torch.float64) / tau - Phi.T @ torch.linalg.solve(K, Phi) / tau**2
    mu_ref = Phi.T @ torch.linalg.solve(K, y) / tau
    torch.testing.assert_close(h.covariance()[0].double(), S_ref, atol=1e-8, rtol=0)
    torch.testing.assert_close(h.W_mean.T.double(), mu_ref, atol=1e-6, rtol=0)
    neg_log_post = lambda w: ((Phi @ w - y[:, 0])**2).sum() / (2 * s2) + tau * (w**2).sum() / 2
    torch.testing.assert_close(torch.autograd.functional.hessian(neg_log_post, mu_ref[:, 0]), Lam[0], atol=1e-8, rtol=0)

def test_laplace_categorical_ggn_blocks():
    "Softmax likelihood: each class's precision is the diagonal block of the exact Hessian of the NLL at μ, plus the prior"
    torch.manual_seed(0)
    h = VBLLClassifier(4, 3).double()
    Phi, y = torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,))
    Lam = laplace_refine(h, Phi, y, prior_prec=0.5)
    f = lambda W: torch.nn.functional.cross_entropy(Phi @ W.reshape(3, 4).T, y, reduction='sum')
    H = torch.autograd.functional.hessian(f, h.W_mean.detach().double().reshape(-1))
    for c in range(3): torch.testing.assert_close(Lam[c], H[4*c:4*c+4, 4*c:4*c+4] + 0.5 * torch.eye(4, dtype=torch.float64), atol=1e-8, rtol=0)

def test_polar_as_lora_matches_peft():
    "With the Stiefel constraint dropped and Θ = I, PoLAR's forward equals PEFT's LoRA forward on the same weights"
    peft = pytest.importorskip('peft')
    torch.manual_seed(0)
    base = tiny_llama().eval()
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj'])).eval()
    pol = add_polar_adapters(copy.deepcopy(base), r=4, alpha=8).eval()
    mods = dict(lora.named_modules())
    with torch.no_grad():
        for n, m in polar_layers(pol):
            lm = mods['base_model.model.' + n]
            lm.lora_B['default'].weight.normal_()
            m.X.copy_(lm.lora_B['default'].weight); m.Y.copy_(lm.lora_A['default'].weight.T); m.theta.copy_(torch.eye(4))
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad(): torch.testing.assert_close(pol(ids).logits, lora(ids).logits, atol=1e-5, rtol=1e-5)

def test_theta_zero_merge_unmerge_exact():
    "Θ = 0: logits equal the base model's bit for bit, also after merge and unmerge"
    torch.manual_seed(0)
    base = tiny_llama().eval(); pol = add_polar_adapters(copy.deepcopy(base), r=4).eval()
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        ref = base(ids).logits
        assert torch.equal(pol(ids).logits, ref)
        merge_polar(pol); assert torch.equal(pol(ids).logits, ref)
        merge_polar(pol, merge=False); assert torch.equal(pol(ids).logits, ref)
        for _, m in polar_layers(pol): m.theta.normal_()
        before = pol(ids).logits; merge_polar(pol); torch.testing.assert_close(pol(ids).logits, before, atol=1e-4, rtol=1e-4)

def test_orthogonality_spec():
    "Spec test 1: 2000 steps keep ‖XᵀX − I‖_F <= 2e-2 with λ = 1, <= 1e-5 with QR, and drift without the landing term"
    assert toy_stiefel_fit(lam=1.0)['stiefel_error'] <= 2e-2
    assert toy_stiefel_fit(lam=1.0, retraction='qr')['stiefel_error'] <= 1e-5
    assert toy_stiefel_fit(lam=0.0)['stiefel_error'] > 1.0

def test_landing_optimizer_only_touches_stiefel_groups():
    "LandingAdamW replaces the gradient of stiefel groups only; Θ's gradient stays Euclidean"
    torch.manual_seed(0)
    lay = PoLARLinear(nn.Linear(6, 8), 2, 2)
    with torch.no_grad(): lay.theta.normal_()
    (lay(torch.randn(5, 6))**2).sum().backward()
    X0, gX, gT = lay.X.detach().clone(), lay.X.grad.clone(), lay.theta.grad.clone()
    opt = LandingAdamW([dict(params=[lay.X, lay.Y], stiefel=True, weight_decay=0.3), dict(params=[lay.theta])], lam=0.7)
    opt.step()
    torch.testing.assert_close(lay.X.grad, landing_field(X0, gX, 0.7), rtol=0, atol=0)
    assert torch.equal(lay.theta.grad, gT) and opt.param_groups[0]['weight_decay'] == 0.0
    with pytest.raises(ValueError, match='retraction'): LandingAdamW([lay.X], retraction='cayley')

def test_alternating_steps_are_separate():
    "A head step leaves the adapters as they were; an adapter step leaves the head; a small head step does not lower the ELBO"
    torch.manual_seed(0)
    pv = PoLARVBLL(tiny_llama(vocab_size=MC_VOCAB), MC_LABELS, r=4)
    b = mc_task(16, seed=3)
    ad = [p.detach().clone() for p in pv.adapter_params()]
    phi = pv.features(b['input_ids'])
    opt = torch.optim.SGD(pv.head.parameters(), lr=1e-3)
    e0 = pv.head.elbo(phi.detach(), b['labels'], 256)
    (-e0).backward(); opt.step()
    assert all(torch.equal(a, p) for a, p in zip(ad, pv.adapter_params()))
    assert pv.head.elbo(phi.detach(), b['labels'], 256) >= e0
    hd = [p.detach().clone() for p in pv.head.parameters()]
    pv.fit(lambda s: b, 1, 256, n_head=0)                      # one adapter step only
    assert all(torch.equal(a, p) for a, p in zip(hd, pv.head.parameters()))
    assert not all(torch.equal(a, p) for a, p in zip(ad, pv.adapter_params()))

def _ece_loop(P, y, n_bins=15):
    "A second, loop-based ECE over bins (lo, hi]"
    conf, pred = P.max(1), P.argmax(1)
    tot = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        k = (conf > lo) & (conf <= hi)
        if k.any(): tot += k.sum() * abs((pred[k] == y[k]).mean() - conf[k].mean())
    return tot / len(y)

def test_calibration_metrics():
    "ECE against a loop implementation; a calibrated predictor has ECE < 0.02 at n = 1e4 (spec 0.0105 ± 0.003); NLL against torch"
    rng = np.random.default_rng(0)
    P = rng.dirichlet(np.ones(4) * 0.7, 10_000)
    y = (rng.random(10_000)[:, None] > P.cumsum(1)).sum(1)               # y ~ P, row by row
    assert abs(ece(P, y) - _ece_loop(P, y)) < 1e-12
    assert ece(P, y) < 0.02
    sharp = np.exp(3 * np.log(P)); sharp /= sharp.sum(1, keepdims=True)   # overconfident: logits x 3
    assert ece(sharp, y) > 0.1
    ref = torch.nn.functional.nll_loss(torch.tensor(P).log(), torch.tensor(y))
    assert abs(nll(P, y) - float(ref)) < 1e-10
    assert set(calibration(P, y)) == {'acc', 'ece', 'nll', 'brier'}

def test_bad_input():
    tok = char_tokenizer('AB')
    with pytest.raises(ValueError, match='not single tokens'): label_token_ids(tok, ['A', 'AB'])
    assert len(label_token_ids(tok, ['A', 'B'])) == 2
    with pytest.raises(ValueError, match='match no nn.Linear'): add_polar_adapters(tiny_llama(), target_modules=['qkv'])
    with pytest.raises(ValueError, match='r=0'): add_polar_adapters(tiny_llama(), r=0)
    with pytest.raises(ValueError, match='NaN'): VBLLClassifier(3, 2).elbo(torch.tensor([[float('nan'), 0., 1.]]), torch.tensor([0]), 10)
    with pytest.raises(ValueError, match='cov'): VBLLClassifier(3, 2, cov='kron')

def test_package_import():
    import llmlit.polar as m
    assert callable(m.add_polar_adapters) and callable(m.laplace_refine)

def test_mc_task_rule_and_noise():
    "The planted majority rule recovers the clean labels; with 20% noise it scores 0.8 + 0.2/4 on the noisy ones (3 s.e.)"
    t = mc_task(20_000, label_noise=0.2, seed=4)
    counts = torch.nn.functional.one_hot((t['input_ids'][:, :-2] - MC_FIRST) // MC_GROUP, 4).sum(1)
    assert torch.equal(counts.argmax(-1), t['clean'])
    acc = float((t['clean'] == t['labels']).float().mean())
    assert abs(acc - 0.85) < 3 * math.sqrt(0.85 * 0.15 / 20_000)

def test_arithmetic_mc_tokenized():
    "Right padding keeps every prompt's last real token the ':' of 'Answer:'; the labelled option is the sum"
    tok = char_tokenizer('0123456789ABCD.+?:QuestionWhatisAnswer \n')
    tok.pad_token = tok.pad_token or '<pad>'
    q = arithmetic_mc(30, 2, seed=7)
    enc = tokenize_mc(tok, q)
    last = enc['input_ids'][torch.arange(30), enc['attention_mask'].sum(1) - 1]
    assert (last == tok.convert_tokens_to_ids(':')).all() and len(set(enc['attention_mask'].sum(1).tolist())) > 1
    for p, l in zip(q['prompts'], q['labels']):
        a, b = map(int, p.split('What is ')[1].split('?')[0].split(' + '))
        assert int(p.split('\n')[1 + int(l)].split('. ')[1]) == a + b

def test_injection_helpers():
    "target_linears follows PEFT's suffix rule and skips GPT-2's Conv1D; replace_linears swaps in place"
    m = tiny_llama()
    assert target_linears(m, 'self_attn.q_proj') == target_linears(m, 'q_proj')
    with pytest.raises(ValueError, match='match no nn.Linear'): target_linears(tiny_gpt2(), 'c_attn')
    replace_linears(m, target_linears(m, 'up_proj'), lambda n, l: PoLARLinear(l, 2, 4))
    assert isinstance(m.model.layers[0].mlp.up_proj, PoLARLinear)
