"Cross-checks of llmlit.memorization: closed forms, scipy, HF generation, llmlit.train, and bad input (the data: tests/test_data.py)"
import inspect, math
import numpy as np
import pytest
import torch
from datasets import Dataset
from scipy import optimize
from llmlit.adapters import tiny_lm_for
from llmlit.data import BIOS_SIZES, DIGITS, fact_tokenizer, make_bios, make_phonebook, phonebook_tokenizer, sample_facts, tokenize_facts, zipf_probs
from llmlit.memorization import (FactStream, LossBand, RandomSubset, capacity_curve, capacity_limit_accuracy, estimate_capacity,
                                 exposure_steps, find_plateau, value_labels, tokenize_bios, BIOS_VALUES,
                                 evaluate_facts, example_losses, fact_bits, fano_bits, generate_values,
                                 keep_fraction_for, select_by_loss)
from llmlit.train import TrainConfig, train_causal_lm

torch.set_num_threads(1)


def test_bits_of_attributes_add_up():
    "Independent attributes: the bits of the list equal the bits of one choice among the product of their sizes"
    assert fact_bits(200*300*100*263*67200) == pytest.approx(fact_bits(list(BIOS_SIZES.values())))


@pytest.mark.parametrize('M', [2, 10, 10**4])
def test_bound_against_scipy_root(M):
    H, C = math.log2(M), 500.0
    for N in [10, 100, 1000, 10**5]:
        target = min(C/N, H)
        ref = 1.0 if target >= H else optimize.brentq(lambda a: fano_bits(a, M) - target, 1/M, 1 - 1e-15, xtol=1e-13)
        assert capacity_limit_accuracy(N, H, C, n_values=M) == pytest.approx(ref, abs=1e-9)


@pytest.fixture(scope='module')
def trained():
    "A tiny model trained on 48 facts until it knows some of them but not all"
    pb = make_phonebook(48, n_digits=3, seed=1)
    tok = phonebook_tokenizer(pb)
    tf = tokenize_facts(pb, tok, n_templates=1)
    T = len(tf[0]['input_ids'])
    torch.manual_seed(0)
    m = tiny_lm_for(tok, seq_len=T, hidden_size=64, intermediate_size=256)
    res = train_causal_lm(m, FactStream(tf, 70, seed=0), TrainConfig(steps=70, batch_size=32, seq_len=T, warmup=10,
                                                                      lr=3e-3, device='cpu', log_every=20))
    return pb, tok, tf, res.model


def test_teacher_forced_equals_greedy(trained):
    pb, tok, tf, m = trained
    ev = evaluate_facts(m, tf, fact_bits(1000), tok.convert_tokens_to_ids(list(DIGITS)))
    assert 0 < ev['n_correct'] < len(pb), ev['n_correct']             # both outcomes occur
    gen = generate_values(m, tf)
    vals = [tok.convert_tokens_to_ids(list(v)) for v in pb['value']]
    np.testing.assert_array_equal(ev['correct'], np.array([g == v for g, v in zip(gen, vals)]))
    assert 0 <= ev['bits'] <= len(pb)*fact_bits(1000)


@pytest.mark.parametrize('peak', [37, 300, 1234, 9000])
@pytest.mark.parametrize('n_start', [50, 4000])
@pytest.mark.parametrize('collapse', [2.0, 0.0])
def test_estimate_capacity_brackets_the_peak(peak, n_start, collapse):
    "On a count curve that rises as N up to a peak, then collapses (or stays flat), the search finds the peak in few runs"
    calls = []
    def train(n):
        calls.append(n)
        k = n if n <= peak else max(0, peak - collapse*(n - peak))
        return dict(n_correct=k, acc=k/n)
    est = estimate_capacity(train, 13.0, n_start=n_start, n_max=10**5, growth=2.0, refine=2, n_min=8)
    assert peak / 2**0.25 <= est['facts'] <= peak                      # within growth^(2^-refine) below the peak
    assert est['found_below'] and est['passed_peak'] and est['bits'] == 13.0*est['facts']
    assert len(calls) == len(set(calls)) <= 2*math.log2(10**5/8) + 4    # no N trained twice; logarithmic


def test_estimate_capacity_says_when_it_is_a_lower_bound():
    with pytest.warns(UserWarning, match='training-limited'):
        est = estimate_capacity(lambda n: dict(n_correct=1, acc=1/n), 1.0, n_start=100, n_max=400, n_min=20)
    assert not est['found_below'] and min(est['runs']) == 20
    with pytest.warns(UserWarning, match='peak was not passed'):
        est = estimate_capacity(lambda n: dict(n_correct=n, acc=1.0), 1.0, n_start=100, n_max=1000)
    assert est['facts'] == 1000 and not est['passed_peak']
    with pytest.raises(ValueError, match='n_start=5'): estimate_capacity(lambda n: {}, 1.0, n_start=5, n_max=100)
    with pytest.raises(ValueError, match='saturated=1.5'): estimate_capacity(lambda n: {}, 1.0, 10, 100, saturated=1.5)


def test_untrained_model_guesses():
    "An untrained model's cross-entropy over the digit alphabet is about the bits of a value"
    pb = make_phonebook(64, n_digits=4, seed=2); tok = phonebook_tokenizer(pb); tf = tokenize_facts(pb, tok, n_templates=1)
    torch.manual_seed(1); m = tiny_lm_for(tok, seq_len=len(tf[0]['input_ids']))
    ev = evaluate_facts(m, tf, fact_bits(10**4), tok.convert_tokens_to_ids(list(DIGITS)))
    assert ev['ce_bits'] == pytest.approx(fact_bits(10**4), rel=0.05)  # about log2 M per fact


def test_selector_sees_losses_only():
    for cls in (LossBand, RandomSubset):
        assert list(inspect.signature(cls.admit).parameters) == ['self', 'losses']
        assert list(inspect.signature(cls.active).parameters) == ['self', 'losses', 'round']
    loss = np.random.default_rng(0).random(200)
    lb = LossBand(0.3, 0.4, 0.0)
    adm = lb.admit(loss)
    assert loss[adm].max() <= np.sort(loss)[59]                       # the 60 lowest
    act = adm[lb.active(loss[adm])]
    assert loss[act].min() >= np.quantile(loss[adm], 0.4)


def test_keep_one_no_skip_is_the_baseline(trained):
    "r=1, q=0: the same index sequence and the same training curve as the baseline, same seed"
    pb, tok, tf, _ = trained
    T = len(tf[0]['input_ids']); cfg = TrainConfig(steps=30, batch_size=16, seq_len=T, warmup=3, device='cpu')
    runs = []
    for sel in (None, LossBand(keep_fraction=1.0, drop_low_quantile=0.0)):
        torch.manual_seed(0); m = tiny_lm_for(tok, seq_len=T)
        st = FactStream(tf, 30, model=m if sel else None, selector=sel, seed=4)
        runs.append((st, train_causal_lm(m, st, cfg)))
    (b, rb), (s, rs) = runs
    np.testing.assert_array_equal(np.concatenate(b.served), np.concatenate(s.served))
    assert len(s.log) > 0                                             # the selector did score the pool
    np.testing.assert_allclose(rb.losses, rs.losses, rtol=1e-6)


def test_stream_deterministic_and_subset(trained):
    pb, tok, tf, m = trained
    rows = sample_facts(zipf_probs(len(tf), 1.0), 300, seed=0)
    seqs = []
    for _ in range(2):
        st = FactStream(tf, 20, model=m, selector=LossBand(0.5, 0.3, 0.1, seed=2), rows=rows, seed=2)
        for s in range(20): st(s, 16)
        seqs.append(np.concatenate(st.served))
        assert set(st.active) <= set(st.admitted) <= set(range(len(rows)))
    np.testing.assert_array_equal(*seqs)
    assert seqs[0].max() < len(rows)


def test_dedup_stream_serves_distinct_rows_equally(trained):
    "With dedup, the selector ranks one copy of each distinct row, and the admitted rows are served equally often"
    pb, tok, tf, m = trained
    rows = sample_facts(zipf_probs(len(tf), 1.0), 400, seed=0)
    sel = LossBand(0.5, 0.0, warmup_frac=0.0, rescore_every_frac=1.0)
    st = FactStream(tf, 10, model=m, selector=sel, rows=rows, seed=0, dedup=True)
    first = st(0, 1)                                                  # scores and admits at step 0
    x = st.x.numpy()
    distinct = np.sort(np.unique(x, axis=0, return_index=True)[1])
    assert len(st.admitted) == round(0.5*len(distinct)) and set(st.admitted) <= set(distinct)
    losses = example_losses(m, st.x[distinct], st.y[distinct]).numpy()
    np.testing.assert_array_equal(st.admitted, np.sort(distinct[np.argsort(losses, kind='stable')[:len(st.admitted)]]))
    n = len(st.active)
    for s in range(1, 10): st(s, n if s > 1 else n - 1)              # then whole epochs over the active rows
    served = np.concatenate(st.served)
    assert (np.bincount(served, minlength=len(x))[st.active] == 9).all()


def test_selection_flattens_exposures():
    "With test-side labels: after training on a Zipf pool, LossBand's stream has a lower max/mean exposure ratio"
    pb = make_phonebook(60, n_digits=3, zipf_alpha=1.2, seed=5)
    tok = phonebook_tokenizer(pb); tf = tokenize_facts(pb, tok, n_templates=1); T = len(tf[0]['input_ids'])
    rows = sample_facts(np.asarray(pb['freq'][:]), 3000, seed=0)
    torch.manual_seed(0); m = tiny_lm_for(tok, seq_len=T, hidden_size=64, intermediate_size=256)
    m = train_causal_lm(m, FactStream(tf, 80, rows=rows), TrainConfig(steps=80, batch_size=64, seq_len=T, warmup=8,
                                                                       device='cpu')).model
    def ratio(sel):
        st = FactStream(tf, 40, model=m, selector=sel, rows=rows, seed=0)
        for s in range(40): st(s, 64)
        e = st.exposures(np.asarray(tf['fact_id'][:])[rows], len(tf))
        return e.max() / e[e > 0].mean()
    assert ratio(LossBand(1.0, 0.5, 0.1, warmup_frac=0.0)) < ratio(None)


def test_below_capacity_selection_does_not_hurt():
    "Limiting case N*H << C: full training is near perfect, and LossBand (r from the budget rule = 1) is no worse"
    pb = make_phonebook(40, n_digits=3, zipf_alpha=0.5, seed=3)
    tok = phonebook_tokenizer(pb); tf = tokenize_facts(pb, tok, n_templates=1); T = len(tf[0]['input_ids'])
    rows = sample_facts(np.asarray(pb['freq'][:]), 2000, seed=1)
    r = keep_fraction_for(np.asarray(tf['input_ids'][:])[rows], max_distinct=10_000)
    assert r == 1.0
    acc = {}
    for name, sel in (('full', None), ('lossband', LossBand(r, 0.5, 0.1))):
        torch.manual_seed(0); m = tiny_lm_for(tok, seq_len=T, hidden_size=64, intermediate_size=256)
        st = FactStream(tf, 250, model=m if sel else None, selector=sel, rows=rows, seed=0)
        res = train_causal_lm(m, st, TrainConfig(steps=250, batch_size=64, seq_len=T, warmup=25, lr=3e-3, device='cpu'))
        acc[name] = evaluate_facts(res.model, tf)['acc']
    assert acc['full'] >= 0.95, acc
    assert acc['lossband'] >= acc['full'] - 0.03, acc


def test_select_by_loss(trained):
    pb, tok, tf, m = trained
    ds = Dataset.from_dict(dict(input_ids=[r[:6 + i % 4] for i, r in enumerate(tf['input_ids'][:])]))
    out = select_by_loss(ds, m, keep_fraction=0.5, drop_low_quantile=0.25)
    allx = example_losses(m, torch.tensor([r + [0]*(9 - len(r)) for r in ds['input_ids'][:]]),
                          torch.tensor([r + [-100]*(9 - len(r)) for r in ds['input_ids'][:]])).numpy()
    band = np.sort(allx)[:24]
    assert len(out) == 24 - 6
    np.testing.assert_allclose(sorted(out['loss'][:]), band[6:], rtol=1e-5)


def test_select_by_loss_dedup(trained):
    "dedup: duplicated rows are scored once; the kept rows are the lowest-loss distinct ones, each once"
    pb, tok, tf, m = trained
    rows = tf['input_ids'][:]
    ds = Dataset.from_dict(dict(input_ids=[rows[i] for i in sample_facts(zipf_probs(len(rows), 1.0), 200, seed=1)]))
    distinct = np.unique(np.asarray(ds['input_ids'][:]), axis=0)
    out = select_by_loss(ds, m, keep_fraction=0.25, dedup=True)
    assert len(out) == round(0.25*len(distinct)) == len({tuple(r) for r in out['input_ids'][:]})
    ref = np.sort(example_losses(m, torch.tensor(distinct)).numpy())[:len(out)]
    np.testing.assert_allclose(sorted(out['loss'][:]), ref, rtol=1e-5)


# Bad input: each gets a clear error naming the argument


@pytest.mark.parametrize('r', [0, -0.2, 1.01, 2])
def test_bad_keep_fraction(r, trained):
    with pytest.raises(ValueError, match=rf'keep_fraction={r} must lie in \(0, 1\]'): LossBand(keep_fraction=r)
    with pytest.raises(ValueError, match='keep_fraction'): RandomSubset(keep_fraction=r)
    ds = Dataset.from_dict(dict(input_ids=[[1, 4, 5, 2]]*4))
    with pytest.raises(ValueError, match='keep_fraction'): select_by_loss(ds, trained[3], keep_fraction=r)


def test_bad_other_fractions():
    with pytest.raises(ValueError, match='drop_low_quantile'): LossBand(drop_low_quantile=1.0)
    with pytest.raises(ValueError, match='replay_fraction'): LossBand(replay_fraction=-0.1)
    with pytest.raises(ValueError, match='warmup_frac'): LossBand(warmup_frac=1.0)


# Capacity in bits per parameter (issue 15)


@pytest.fixture(scope='module')
def cap_book():
    "A 4-digit phone book with value-only labels, its tokenizer and digit ids"
    pb = make_phonebook(256, n_digits=4, seed=3); tok = phonebook_tokenizer(pb)
    return tok, value_labels(tokenize_facts(pb, tok, n_templates=1)), tok.convert_tokens_to_ids(list(DIGITS))


def _factory(tok, facts, width):
    return lambda: tiny_lm_for(tok, seq_len=len(facts[0]['input_ids']), hidden_size=width, intermediate_size=4*width,
                               num_attention_heads=2, num_key_value_heads=2, initializer_range=0.1)


def test_capacity_monotone_in_model_size(cap_book):
    "At a fixed N past the small model's reach, the wider model stores more bits (both counts)"
    tok, facts, dig = cap_book
    out = {w: capacity_curve(_factory(tok, facts, w), facts, [192], 40, fact_bits(10**4), dig, batch_size=32, lr=3e-2)
           for w in (8, 32)}
    small, big = out[8]['runs'][0], out[32]['runs'][0]
    assert out[32]['params'] > out[8]['params']
    assert big['bits_loss'] > small['bits_loss'] and big['bits_em'] >= small['bits_em'], (small, big)
    for r in (small, big): assert r['exposures_min'] == r['exposures_max'] == 40


def test_capacity_same_seed_same_curve(cap_book):
    "Same seed: the same loss curves and bits on the CPU; another seed: another curve"
    tok, facts, dig = cap_book
    run = lambda seed: capacity_curve(_factory(tok, facts, 16), facts, [32, 64], 8, fact_bits(10**4), dig,
                                      batch_size=32, seed=seed)['runs']
    a, b, c = run(0), run(0), run(1)
    assert [r['loss_curve'] for r in a] == [r['loss_curve'] for r in b]
    assert [r['bits_loss'] for r in a] == [r['bits_loss'] for r in b]
    assert [r['loss_curve'] for r in a] != [r['loss_curve'] for r in c]


def test_find_plateau_ignores_grid_order():
    rng = np.random.default_rng(0)
    n = np.array([50, 100, 200, 400, 800, 1600]); b = np.minimum(n, 380)*10.0 + rng.normal(0, 5, len(n))
    ref = find_plateau(n, b)
    for _ in range(5):
        p = rng.permutation(len(n))
        assert find_plateau(n[p], b[p]) == ref
    assert ref['n_start'] == 400 and ref['visible']


def test_value_labels_train_on_values_only(cap_book):
    "With value-only labels the training loss is the mean value-token cross-entropy that evaluate_facts counts"
    tok, facts, dig = cap_book
    m = _factory(tok, facts, 16)()
    x, y = torch.tensor(facts['input_ids'][:8]), torch.tensor(facts['labels'][:8])
    loss = m(input_ids=x, labels=y).loss.item()
    ev = evaluate_facts(m, facts.select(range(8)))                   # full-vocabulary cross-entropy, bits per fact
    assert loss == pytest.approx(ev['ce_bits']*math.log(2)/4, rel=1e-4)


def test_capacity_bad_input(cap_book):
    tok, facts, dig = cap_book
    f = _factory(tok, facts, 8)
    with pytest.raises(ValueError, match='batch_size=32'): capacity_curve(f, facts, [33], 4, 13.0, dig, batch_size=32)
    with pytest.raises(ValueError, match=r'n_facts_grid=\[999\]'): capacity_curve(f, facts, [999], 4, 13.0, dig)
    with pytest.raises(ValueError, match='n_jobs=2'): capacity_curve(f, facts, [32], 4, 13.0, dig, batch_size=32, n_jobs=2, device='cuda')
    with pytest.raises(ValueError, match='exposures=1.5'): exposure_steps(10, 1.5, 5)
    with pytest.raises(ValueError, match='tol=1'): find_plateau([1, 2], [1, 2], tol=1)


@pytest.mark.parametrize('seed', [0, 5])
def test_tokenize_bios_masks_exactly_the_attributes(seed):
    "Every biography: the masked tokens spell its five attributes and nothing else; the rest of the text is kept unmasked"
    bios = make_bios(200, seed=seed); tok = fact_tokenizer(bios['text']); tb = tokenize_bios(bios, tok)
    ids, m = np.asarray(tb['input_ids'][:]), np.asarray(tb['value_mask'][:]) == 1
    for j, row in enumerate(bios):
        assert tok.decode(ids[j][m[j]]).replace(' ', '') == ''.join(row[k] for k in BIOS_VALUES).replace(' ', '')
        kept = ids[j][(ids[j] != tok.pad_token_id)][1:-1]      # text tokens between <bos> and <eos>
        assert tok.decode(kept).replace(' ', '') == row['text'].replace(' ', '')
    lab = np.asarray(value_labels(tb)['labels'][:])
    assert (lab[m] == ids[m]).all() and (lab[~m] == -100).all()
