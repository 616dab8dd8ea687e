"Cross-checks of llmlit.data: the corpora keep the outputs they had in the method modules, and the samplers follow their laws"
import hashlib, json, platform, re, sysconfig
from pathlib import Path
import numpy as np
import pytest
import torch
from scipy import stats
import llmlit.data as data
from llmlit.models import tiny_llama
from llmlit.train import TrainConfig, train_causal_lm

torch.set_num_threads(1)
ALPHA = 1e-3   # significance of every statistical test below; fixed seeds make each outcome deterministic


def _tiny_sampler():
    "A seeded tiny Llama over 16 tokens, for sample_corpus"
    torch.manual_seed(0)
    return tiny_llama(vocab_size=16).eval()

def _sampled():
    return data.sample_corpus(_tiny_sampler(), 6, 5, torch.tensor([2, 9]), batch_size=4, seed=3)

def _bigram():
    t = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    return data.BigramLM(t)(torch.tensor([[1, 5, 7, 0]])).logits

def _facts():
    pb = data.make_phonebook(40, n_digits=3, zipf_alpha=0.7, seed=5)
    tok = data.phonebook_tokenizer(pb)
    return pb, tok, data.tokenize_facts(pb, tok, n_templates=3), data._encode(tok, ['call ka at 12'])

# case -> a call of llmlit.data with fixed seeds; each moved name is exercised by at least one case
CASES = {
    'markov': lambda: (data.markov_table(12, seed=4, support=3), data.make_markov_corpus(50, 9, V=12, seed=4)),
    'markov_batches': lambda: data.markov_batches(data.markov_table(10, seed=1), 7, seed=2)(5, 6),
    'chain_nll': lambda: data.chain_nll(*data.make_markov_corpus(40, 12, V=10, seed=1), start=3),
    'bigram': _bigram,
    'sample_corpus': _sampled,
    'zipf': lambda: (data.zipf_probs(30, 1.3), data.sample_facts(data.zipf_probs(30, 1.3), 200, seed=7),
                 data.expected_distinct(data.zipf_probs(30, 1.3), 50)),
    'constants': lambda: (data.BIOS_SIZES, data.PHONE_TEMPLATES, data.DIGITS, data.MONTHS, data.BIO_TEMPLATES),
    'names': lambda: (data.pseudo_words(30, seed=2, n_syllables=3), sorted(data._template_words(data.PHONE_TEMPLATES))),
    'phonebook': lambda: data.make_phonebook(60, n_digits=5, base=7, zipf_alpha=1.0, seed=3),
    'bios': lambda: (data.bios_fields(seed=2), data.make_bios(25, zipf_alpha=0.5, seed=2)),
    'facts': _facts,
    'fact_tokenizer': lambda: data.fact_tokenizer(data.make_bios(10, seed=1)['text']),
    'stdlib': lambda: data.stdlib_bytes(5000),
}
# sha256 (first 16 hex digits) of each case's output, computed with the functions still in llmlit.specdec, llmlit.memorization
# and llmlit.safety when they moved here (llmlit.data gave the same digests then); torch 2.13, numpy 2
DIGESTS = {'markov': 'ba657610207f5d98', 'markov_batches': '0c739f2f3764ade5', 'chain_nll': '8b30ce359c3d1bcb',
           'bigram': '95553c64ae71dd5a', 'sample_corpus': '5d33c88ad4688c78', 'zipf': '07f30618b52d0e60',
           'constants': '612221caf2b9e014', 'names': 'ed233bb045401598', 'phonebook': 'c781814b5b789364',
           'bios': '9f940d80b32687d3', 'facts': 'b7f9ba9c854bd4d5', 'fact_tokenizer': 'd0ea0ebfca31ff9f',
           'stdlib': 'c0e5e351a4b0417a'}
STDLIB_PYTHON = '3.11.7'   # the stdlib corpus depends on the exact Python release


def _plain(x):
    "A JSON-able, order-preserving form of a case's output"
    if torch.is_tensor(x): return [str(x.dtype), list(x.shape), x.detach().flatten().tolist()]
    if isinstance(x, np.ndarray): return [str(x.dtype), list(x.shape), x.ravel().tolist()]
    if isinstance(x, (np.floating, np.integer)): return x.item()
    if hasattr(x, 'column_names'): return _plain(x.to_dict())
    if hasattr(x, 'get_vocab'): return sorted(x.get_vocab().items(), key=lambda kv: kv[1])
    if isinstance(x, dict): return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)): return [_plain(v) for v in x]
    return x

def digest(x): return hashlib.sha256(json.dumps(_plain(x)).encode()).hexdigest()[:16]


@pytest.mark.parametrize('case', CASES)
def test_output_pinned(case):
    "The output for a fixed seed is the one the original produced: the methods' quick results stay put"
    if case == 'stdlib' and platform.python_version() != STDLIB_PYTHON: pytest.skip(f'the stdlib corpus was pinned on Python {STDLIB_PYTHON}')
    assert digest(CASES[case]()) == DIGESTS[case]


def _pooled_chisquare(obs, exp, min_expected=5):
    "Chi-square p-value of counts `obs` against expected counts `exp` (rows), cells below `min_expected` pooled per row"
    stat, dof = 0.0, 0
    for o, e in zip(np.atleast_2d(obs), np.atleast_2d(exp)):
        small = e < min_expected
        o = np.append(o[~small], o[small].sum()) if small.any() else o
        e = np.append(e[~small], e[small].sum()) if small.any() else e
        stat += ((o - e)**2 / np.maximum(e, 1e-300)).sum(); dof += len(o) - 1
    return stats.chi2.sf(stat, dof)


def test_markov_transitions_follow_the_table():
    "Transition counts against the table (pooled chi-square over all rows), first tokens against uniform"
    V = 16
    ids, tab = data.make_markov_corpus(3000, 30, V=V, seed=11)
    prev, nxt = ids[:, :-1].flatten(), ids[:, 1:].flatten()
    counts = torch.bincount(prev*V + nxt, minlength=V*V).view(V, V).double().numpy()
    expected = counts.sum(1, keepdims=True) * tab.double().numpy()
    assert _pooled_chisquare(counts, expected) > ALPHA
    assert stats.chisquare(np.bincount(ids[:, 0].numpy(), minlength=V)).pvalue > ALPHA


def test_markov_batches_are_fresh_samples_of_the_chain():
    "Each step draws new sequences; pooled over steps, their transitions still follow the table"
    V, tab = 12, data.markov_table(12, seed=5)
    gb = data.markov_batches(tab, 20, seed=1)
    batches = [gb(s, 64)['input_ids'] for s in range(20)]
    assert len({tuple(b.flatten().tolist()) for b in batches}) == 20
    ids = torch.cat(batches)
    counts = torch.bincount(ids[:, :-1].flatten()*V + ids[:, 1:].flatten(), minlength=V*V).view(V, V).double().numpy()
    assert _pooled_chisquare(counts, counts.sum(1, keepdims=True) * tab.double().numpy()) > ALPHA


def test_chain_nll_is_the_entropy_rate():
    "From a burnt-in position on, the chain's own samples score its entropy rate -sum_i pi_i sum_j P_ij log P_ij"
    tab = data.markov_table(20, seed=2).double()
    w, v = torch.linalg.eig(tab.T)
    pi = v[:, w.real.argmax()].real; pi = pi / pi.sum()                     # stationary law
    H = -(pi * torch.xlogy(tab, tab).sum(1)).sum().item()
    ids, _ = data.make_markov_corpus(4000, 60, table=tab, seed=3)
    per_seq = -tab[ids[:, 29:-1], ids[:, 30:]].log().mean(1)                 # sequences are independent
    assert abs(data.chain_nll(ids, tab, 30) - H) < 4 * per_seq.std().item() / len(ids)**0.5


def test_sample_corpus_draws_from_the_model_at_temperature_one():
    "Start tokens uniform over start_ids; second tokens follow the model's full softmax without its EOS (pooled chi-square)"
    m, starts = _tiny_sampler(), torch.tensor([1, 4, 9])
    torch.manual_seed(0)
    seqs = data.sample_corpus(m, 3000, 2, starts, batch_size=1000, seed=0)
    first = seqs[:, 0]
    assert stats.chisquare([(first == s).sum().item() for s in starts]).pvalue > ALPHA
    eos = m.config.eos_token_id                     # generate's min_new_tokens keeps the model from ending early
    assert not (seqs[:, 1:] == eos).any()
    with torch.no_grad(): logits = m(starts[:, None]).logits[:, -1].double()
    probs = logits.index_fill(-1, torch.tensor([eos]), -torch.inf).softmax(-1).numpy()
    counts = np.stack([np.bincount(seqs[first == s, 1].numpy(), minlength=16) for s in starts])
    assert _pooled_chisquare(counts, counts.sum(1, keepdims=True) * probs) > ALPHA


def test_zipf_frequencies_and_distinct_count():
    "Draws follow zipf_probs (chi-square); expected_distinct equals the closed form n(1-(1-1/n)^S) when uniform"
    p = data.zipf_probs(200, 1.2)
    assert np.all(np.diff(p) < 0) and p[0]/p[9] == pytest.approx(10**1.2)
    S = 50_000
    assert _pooled_chisquare(np.bincount(data.sample_facts(p, S, seed=4), minlength=200), S*p) > ALPHA
    n, S = 300, 450
    assert data.expected_distinct(data.zipf_probs(n, 0.0), S) == pytest.approx(n*(1 - (1 - 1/n)**S), rel=1e-12)


def test_phonebook_names_values_and_frequencies():
    "Unique names made of the given lists, base-b digits uniform (chi-square), freq = zipf_probs"
    pb = data.make_phonebook(1500, n_digits=6, base=7, zipf_alpha=0.8, seed=9)
    names = pb['name'][:]
    assert len(set(names)) == 1500 and all(re.fullmatch(r'([bdfgklmnprstvz][aeiou])+ ([bdfgklmnprstvz][aeiou])+', n) for n in names)
    digits = np.array([int(c) for v in pb['value'] for c in v])
    assert len(digits) == 1500*6 and digits.max() < 7
    assert stats.chisquare(np.bincount(digits, minlength=7)).pvalue > ALPHA
    np.testing.assert_allclose(pb['freq'][:], data.zipf_probs(1500, 0.8))
    first, last = ['ka', 'lo', 'mi'], ['nu', 'pe']
    own = data.make_phonebook(6, first_names=first, last_names=last, seed=1)
    assert sorted(own['name']) == sorted(f'{a} {b}' for a in first for b in last)


def test_bios_attributes_are_consistent():
    "Every attribute comes from its field list, the employer fixes the employer's city, and the text states them all"
    b, f = data.make_bios(300, seed=4), data.bios_fields(seed=4)
    city_of = dict(zip(f['employer'], f['employer_city']))
    for r in b:
        for k in ('birth_city', 'university', 'major', 'employer'): assert r[k] in f[k]
        assert r['employer_city'] == city_of[r['employer']]
        month, day, _, year = r['birth_date'].split()
        assert month in data.MONTHS and 1 <= int(day) <= 28 and 1900 <= int(year) < 2100
        assert all(r[k] in r['text'] for k in data.BIO_TEMPLATES) and r['text'].startswith(r['name'])
    assert len({r['birth_city'] for r in b}) > 150   # 300 draws among 200 cities cover about 155 of them


def test_tokenized_facts_round_trip():
    "Unpadded tokens decode to the template sentence; the value mask covers exactly the value's digits"
    pb = data.make_phonebook(30, n_digits=4, seed=2)
    tok = data.phonebook_tokenizer(pb)
    tf = data.tokenize_facts(pb, tok)
    for r in tf:
        ids = [i for i, l in zip(r['input_ids'], r['labels']) if l != -100]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        text = data.PHONE_TEMPLATES[r['template']].format(name=pb[r['fact_id']]['name'], value=pb[r['fact_id']]['value'])
        assert tok.decode(ids[1:-1]).split() == text.replace(pb[r['fact_id']]['value'], ' '.join(pb[r['fact_id']]['value'])).split()
        assert tok.convert_ids_to_tokens([i for i, m in zip(r['input_ids'], r['value_mask']) if m]) == list(pb[r['fact_id']]['value'])


def test_stdlib_bytes_are_the_sorted_stdlib_files():
    "The corpus is the first bytes of the standard library's .py files in sorted path order"
    files = sorted(p for p in Path(sysconfig.get_paths()['stdlib']).rglob('*.py')
                   if 'site-packages' not in p.parts and 'dist-packages' not in p.parts)
    head = b''.join(f.read_bytes() for f in files[:3])
    assert bytes(data.stdlib_bytes(len(head)).tolist()) == head


def test_stream_batches_windows():
    "Rows are windows of the stream at offsets drawn by the (seed, step) generator, uniform over the valid range"
    ids, T = torch.arange(5000) * 3, 32
    gb = data.stream_batches(ids, T, seed=4)
    x = gb(7, 50)['input_ids']
    s = torch.randint(0, len(ids) - T - 1, (50,), generator=torch.Generator().manual_seed(4*1_000_003 + 7))
    assert torch.equal(x, torch.stack([ids[i:i + T] for i in s.tolist()]))
    offsets = torch.cat([gb(k, 100)['input_ids'][:, 0] // 3 for k in range(100)]).numpy()
    assert offsets.min() >= 0 and offsets.max() <= len(ids) - T - 2
    assert stats.chisquare(np.histogram(offsets, bins=20, range=(0, len(ids) - T - 1))[0]).pvalue > ALPHA


@pytest.mark.parametrize('source', ['markov_dataset', 'stream_batches'])
def test_llmlit_train_accepts_the_corpora(source):
    "A Dataset view and a get_batch view both train a tiny model with llmlit.train"
    cfg = TrainConfig(steps=3, batch_size=4, seq_len=12, lr=1e-3, warmup=1, log_every=1, device='cpu')
    src = data.markov_dataset(40, 12, V=16) if source == 'markov_dataset' else data.stream_batches(data.stdlib_bytes(4000) % 16, 12)
    res = train_causal_lm(tiny_llama(vocab_size=16), src, cfg)
    assert len(res.history) >= 1 and np.isfinite(res.history[-1]['loss'])
