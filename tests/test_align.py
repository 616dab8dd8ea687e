"Cross-checks of llmlit.align: TRL's DPO and KTO losses end to end (trl 1.16), the spec's closed forms, the trainer on tiny models"
import copy, math, warnings
import pytest, torch
from llmlit.adapters import sequence_logprobs, tiny_lm_for
from llmlit.align import *
from llmlit.models import tiny_llama, word_tokenizer
from llmlit.train import TrainConfig

WORDS = 'a b c d e f g h'.split()
PROMPTS = ['a b', 'c d e', 'f', 'g h a']

def _pair_models():
    "A tiny random Llama policy and a different tiny random reference over an 8-word tokenizer, both in eval mode (no dropout)"
    tok = word_tokenizer(WORDS)
    torch.manual_seed(0); pol = tiny_lm_for(tok)
    torch.manual_seed(1); ref = tiny_lm_for(tok)
    return tok, pol.eval(), ref.eval()

def _trl_batch(kind, pol, ref, tok, ds, tmp_path):
    "A TRL 1.16 trainer of `kind` ('DPO' or 'KTO', beta 0.1, fp32 on the CPU) and its own first training batch"
    trl = pytest.importorskip('trl')
    args = getattr(trl, f'{kind}Config')(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], beta=0.1,
                                         use_cpu=True, bf16=False)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        tr = getattr(trl, f'{kind}Trainer')(model=pol, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    return tr, next(iter(tr.get_train_dataloader()))

def test_trl_version_is_the_one_compared():
    trl = pytest.importorskip('trl')
    assert trl.__version__.startswith('1.16'), f"parity was established against trl 1.16; found {trl.__version__}"

def test_dpo_matches_trl_dpotrainer(tmp_path):
    "trl 1.16 DPOTrainer.compute_loss on one batch = sequence_logprobs + dpo_loss (fp32, 1e-5)"
    from datasets import Dataset
    tok, pol, ref = _pair_models()
    ds = Dataset.from_dict(dict(prompt=PROMPTS, chosen=[' c d', ' e', ' a b c', ' d'], rejected=[' e f g', ' h h', ' b', ' c c']))  # TRL joins prompt and completion without a space
    tr, b = _trl_batch('DPO', pol, ref, tok, ds, tmp_path)
    with torch.no_grad():
        theirs = tr.compute_loss(tr.model, b).item()
        cols = (b['input_ids'], b['attention_mask'], b['completion_mask'])
        pc, pr = sequence_logprobs(pol, *cols).chunk(2)      # TRL's batch is [chosen; rejected]
        rc, rr = sequence_logprobs(ref, *cols).chunk(2)
    ours = dpo_loss(pc, pr, rc, rr, beta=0.1).mean().item()
    assert abs(ours - theirs) < 1e-5, (ours, theirs)
    assert abs(theirs - math.log(2)) > 1e-4      # the two models differ, so the check is not the trivial ln 2

def test_kto_matches_trl_ktotrainer(tmp_path):
    "trl 1.16 KTOTrainer.compute_loss on one batch = kto_loss with KL from TRL's mismatched pairs (fp32, 1e-5)"
    from datasets import Dataset
    tok, pol, ref = _pair_models()
    # make the KL term positive (it is clamped at 0) so that its use is checked: the policy is the reference with a nudged head
    pol = copy.deepcopy(ref)
    with torch.no_grad(): pol.lm_head.weight.add_(0.3 * torch.randn_like(pol.lm_head.weight))
    ds = Dataset.from_dict(dict(prompt=PROMPTS, completion=[' c d', ' h h', ' a b c', ' c c'], label=[True, False, True, False]))
    tr, b = _trl_batch('KTO', pol, ref, tok, ds, tmp_path)
    with torch.no_grad():
        theirs = tr.compute_loss(tr.model, b).item()
        cols = (b['input_ids'], b['attention_mask'], b['completion_mask'])
        kcols = (b['KL_input_ids'], b['KL_attention_mask'], b['KL_completion_mask'])
        kl = (sequence_logprobs(pol, *kcols) - sequence_logprobs(ref, *kcols)).mean()
        ours = kto_loss(sequence_logprobs(pol, *cols), sequence_logprobs(ref, *cols), b['label'], kl=kl, beta=0.1).item()
    assert abs(ours - theirs) < 1e-5, (ours, theirs)

def test_bco_has_no_trl_counterpart_in_1_16():
    "trl 1.16 ships no unpaired BCO trainer (removed from trl.experimental); BCO is checked against its formula's limits instead"
    trl = pytest.importorskip('trl')
    import importlib.util
    assert importlib.util.find_spec('trl.experimental.bco') is None
    z = torch.linspace(-30, 30, 13)
    lab = torch.arange(13) % 2 == 0
    got = bco_loss(z, torch.zeros(13), lab, delta=0.5, beta=0.2)
    manual = torch.where(lab, -torch.nn.functional.logsigmoid(0.2 * z - 0.5), -torch.nn.functional.logsigmoid(0.5 - 0.2 * z)).mean()
    assert torch.allclose(got, manual, atol=1e-6)

@pytest.mark.parametrize('alpha', [0.05, 0.39, 0.5, 0.9])
def test_preferred_term_minimised_at_log_inverse_alpha(alpha):
    z = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([z], max_iter=200, tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn='strong_wolfe')
    def closure():
        opt.zero_grad(); l = rdro_per_sample(z, torch.tensor([True]), alpha).sum(); l.backward(); return l
    opt.step(closure)
    assert abs(z.item() - math.log(1 / alpha)) < 1e-6

@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('alpha', [0.0, 0.39])
def test_gradients_finite_and_bounded(dtype, alpha):
    "dl+/dz in [-1, alpha], dl-/dz in [0, 1 - alpha] and finite for z in [-1e4, 1e4] (fp16 holds 1e4)"
    z = torch.linspace(-1e4, 1e4, 2001).to(dtype).requires_grad_(True)
    for lab, lo, hi in ((True, -1, alpha), (False, 0, 1 - alpha)):
        g, = torch.autograd.grad(rdro_per_sample(z, torch.full(z.shape, lab), alpha).sum(), z)
        tol = 1e-2 if dtype != torch.float32 else 1e-6
        assert torch.isfinite(g).all() and g.float().min() >= lo - tol and g.float().max() <= hi + tol

def test_alpha_zero_is_logistic():
    z = torch.linspace(-20, 20, 41)
    lab = torch.arange(41) % 3 == 0
    per = rdro_per_sample(z, lab, 0.0)
    assert torch.allclose(per, torch.where(lab, -torch.nn.functional.logsigmoid(z), -torch.nn.functional.logsigmoid(-z)), atol=1e-6)

@pytest.mark.parametrize('seed', range(3))
@pytest.mark.parametrize('rho', [0.3, 0.5, 0.7])
def test_free_z_minimiser_is_the_closed_form(seed, rho):
    "free-z optimum = optimal_logratio (rtol 1e-4) with p- = 1e-9 on some responses, and never above log(1/alpha)"
    alpha = [0.2, 0.39, 0.6][seed]
    task = tabular_task(30, alpha, disjoint=0.2, seed=seed)
    p_neg = task['p_neg'].clamp_min(1e-9); p_neg = p_neg / p_neg.sum()
    z = fit_tabular(task['p_pos'], p_neg, task['ref'], alpha, rho=rho, policy=False, steps=500)['z']
    want = optimal_logratio(task['p_pos'], p_neg, alpha, rho=rho)
    assert torch.allclose(z.exp(), want.exp(), rtol=1e-4)
    assert want.max() <= math.log(1 / alpha) and z.max() <= math.log(1 / alpha) + 1e-4   # the fit within the rtol above

def test_sampled_tv_falls_with_n():
    "balanced RDRO with pi_ref = q_alpha: TV(pi, p+) at n = 1e4 below TV at n = 1e2 for five seeds (fixed)"
    for s in range(5):
        task = tabular_task(30, 0.39, seed=s)
        tvs = [tv(fit_tabular(*sample_counts(task, n, seed=s), task['ref'], 0.39)['pi'], task['p_pos']) for n in (100, 10_000)]
        assert tvs[1] < tvs[0] / 3, tvs

def _unpaired(n=32, T=8, V=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, T), generator=g)
    att = torch.ones(n, T, dtype=torch.long); att[::4, -2:] = 0         # some right padding
    comp = torch.zeros(n, T, dtype=torch.long); comp[:, 3:] = 1; comp = comp * att
    return dict(input_ids=ids, attention_mask=att, completion_mask=comp, label=torch.arange(n) % 3 == 0)

def _small(V=12):
    torch.manual_seed(0)
    return tiny_llama(vocab_size=V, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)

def _counting(model):
    "Count forward calls of `model`"
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    return calls

def test_train_unpaired_lora_caches_reference_and_learns():
    peft = pytest.importorskip('peft')
    data, ref = _unpaired(), _small()
    calls = _counting(ref)
    tc = TrainConfig(steps=30, lr=1e-2, batch_size=8, seq_len=8, warmup=0, weight_decay=0.0, device='cpu', log_every=10)
    r = train_unpaired(_small(), ref, data, AlignConfig(loss='rdro', lora_r=4, ref_batch=16), tc)
    assert len(calls) == 2                                             # 32 rows, 16 per reference forward, once
    assert isinstance(r.model, peft.PeftModel)
    assert all('lora_' in n for n, p in r.model.named_parameters() if p.requires_grad)
    assert abs(r.alpha - data['label'].float().mean().item()) < 1e-9  # alpha defaults to the preferred share
    assert len(r.history) == 30 and not any(h['nonfinite'] for h in r.history)
    assert r.history[-1]['z_pos_p50'] > r.history[0]['z_pos_p50']     # preferred log-ratios rise
    assert r.samples_per_s > 0 and r.stopped is None

@pytest.mark.parametrize('loss', list(UNPAIRED))
def test_every_unpaired_loss_trains(loss):
    tc = TrainConfig(steps=5, lr=1e-2, batch_size=8, seq_len=8, warmup=0, device='cpu', log_every=5)
    r = train_unpaired(_small(), None, _unpaired(), AlignConfig(loss=loss), tc)
    assert len(r.history) == 5 and all(math.isfinite(h['loss']) and h['grad_norm'] > 0 for h in r.history)

def test_train_paired_one_forward_per_step():
    data = _unpaired(16)
    pairs = {f'{p}{c}': data[c][i::2] for p, i in (('chosen_', 0), ('rejected_', 1)) for c in ('input_ids', 'attention_mask', 'completion_mask')}
    pol = _small(); calls = _counting(pol)
    tc = TrainConfig(steps=6, lr=1e-2, batch_size=4, seq_len=8, warmup=0, device='cpu', log_every=3)
    r = train_paired(pol, _small(), pairs, AlignConfig(loss='dpo'), tc)
    assert len(calls) == 6 and len(r.history) == 6
    assert r.history[-1]['loss'] < r.history[0]['loss']

def test_bad_inputs_name_the_argument():
    data = _unpaired()
    tc = TrainConfig(steps=2, batch_size=8, seq_len=8, device='cpu')
    with pytest.raises(ValueError, match='vocab_size 13 but the policy has 12'): train_unpaired(_small(), _small(13), data, None, tc)
    with pytest.raises(ValueError, match='labels must be booleans'): train_unpaired(_small(), None, data | dict(label=torch.rand(32)), None, tc)
    empty = data | dict(completion_mask=torch.zeros(32, 8, dtype=torch.long))
    with pytest.raises(ValueError, match='needs a completion'): train_unpaired(_small(), None, empty, None, tc)
    with pytest.raises(ValueError, match=r'alpha=1\b'): AlignConfig(alpha=1)
    with pytest.raises(ValueError, match='use train_unpaired'): train_paired(_small(), None, {}, AlignConfig(loss='rdro'), tc)
    with pytest.raises(ValueError, match='outside the policy'): train_unpaired(_small(), None, data | dict(input_ids=data['input_ids'] + 20), None, tc)

_DDP_WORKER = '''
import json, sys, torch
from llmlit.align import AlignConfig, train_unpaired
from llmlit.models import tiny_llama
from llmlit.train import TrainConfig
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, 12, (32, 8), generator=g)
comp = torch.zeros(32, 8, dtype=torch.long); comp[:, 3:] = 1
data = dict(input_ids=ids, attention_mask=torch.ones(32, 8, dtype=torch.long), completion_mask=comp, label=torch.arange(32) % 3 == 0)
torch.manual_seed(0)
m = tiny_llama(vocab_size=12, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
tc = TrainConfig(steps=8, lr=1e-2, batch_size=8, seq_len=8, warmup=0, weight_decay=0.0, device='cpu', log_every=4)
json.dump(train_unpaired(m, None, data, AlignConfig(loss='rdro', alpha=0.3), tc).train.losses, open(sys.argv[1], 'w'))
'''

@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    "train_unpaired under torchrun (2 CPU processes, DDP) gives the single-process losses of pooled RDRO (fp32, 1e-5)"
    import json, os, subprocess, sys
    from pathlib import Path
    (tmp_path/'w.py').write_text(_DDP_WORKER)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(root), 'TOKENIZERS_PARALLELISM': 'false'}
    env.pop('IN_TEST', None)
    runs = {1: [sys.executable, str(tmp_path/'w.py')], 2: [str(Path(sys.executable).parent/'torchrun'), '--standalone', '--nproc_per_node=2', str(tmp_path/'w.py')]}
    for k, cmd in runs.items():
        p = subprocess.run(cmd + [str(tmp_path/f'{k}.json')], env=env, cwd=root, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    one, two = (json.loads((tmp_path/f'{k}.json').read_text()) for k in runs)
    assert len(one) == 8 and max(abs(a - b) for a, b in zip(one, two)) < 1e-5
