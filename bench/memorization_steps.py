"""Is the memorization capacity estimate limited by optimizer steps? A CPU study at equal training tokens.

Every run trains a fresh copy of the memorization notebook's small Llama (2 layers, width 64, about 180k parameters
with the embeddings) on an 8-digit phone book (H = 26.58 bits per fact, 16,000 facts) for 400k sequences, through
llmlit.train, and counts the facts it then knows exactly. The same budget comes in two shapes: 195 steps of 2,048
sequences (few large steps, like the first `full` preset's 600 steps of 8,192) and 1,562 steps of 256.

  uniform   the first N facts, uniform epochs: n_correct(N) for each shape;
  zipf      a pool of 160,000 draws with p_i ~ i^-1 over all 16,000 facts, at 1,562 x 256: full training, a random
            subset, LossBand (q = 0.5, rho = 0.1), LossBand with `dedup` and q = 0, the same with q = 0.5
            (`lossband_dedup_skip`), and the top-K oracle, with K the most facts a uniform run memorized.

One run takes about 90 s on one core. Results go to results/memorization/studies/steps.json and a table is printed.

  python bench/memorization_steps.py --jobs 2        (about 17 min on 2 cores)
"""
import argparse, json, sys, time
from multiprocessing import Pool
from pathlib import Path
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llmlit.core import atomic_write, results_dir, seed_everything
from llmlit.adapters import tiny_lm_for
from llmlit.data import DIGITS, make_phonebook, phonebook_tokenizer, sample_facts, tokenize_facts
from llmlit.memorization import FactStream, LossBand, RandomSubset, evaluate_facts, fact_bits, keep_fraction_for
from llmlit.train import TrainConfig, train_causal_lm

BOOK, POOL, SEQS, DIGITS_PER_VALUE = 16_000, 160_000, 400_000, 8
UNIFORM = [(n, 2048) for n in (250, 500, 1000, 2000)] + [(n, 256) for n in (250, 500, 1000, 2000, 4000, 8000, 16000)]
SELECTION = dict(lossband=(False, 0.5), lossband_dedup=(True, 0.0), lossband_dedup_skip=(True, 0.5))  # (dedup, q)

def run(job):
    "Train one arm: job = (arm, n_facts or K, batch); returns its counts and loss curve"
    arm, n, batch = job
    torch.set_num_threads(1)
    book = make_phonebook(BOOK, n_digits=DIGITS_PER_VALUE, zipf_alpha=1.0, seed=0)
    tok = phonebook_tokenizer(book); table = tokenize_facts(book, tok, n_templates=1)
    H, T, freq = fact_bits(10**DIGITS_PER_VALUE), len(table[0]['input_ids']), np.asarray(book['freq'][:])
    pool = sample_facts(freq, POOL, seed=1)
    dedup, q = SELECTION.get(arm, (False, 0.5))
    r = keep_fraction_for(np.asarray(table['input_ids'][:])[pool], n, distinct=dedup)
    data, rows, sel = dict(uniform=(table.select(range(n)), None, None), full=(table, pool, None),
                           random=(table, pool, RandomSubset(r)), oracle=(table, np.arange(n), None)
                           ).get(arm, (table, pool, LossBand(r, q, 0.1)))
    steps = SEQS // batch
    seed_everything(0)
    model = tiny_lm_for(tok, seq_len=T, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4)
    stream = FactStream(data, steps, model if sel else None, sel, rows, score_batch=4096, dedup=dedup)
    t0 = time.time()
    res = train_causal_lm(model, stream, TrainConfig(steps=steps, lr=3e-3, batch_size=batch, seq_len=T,
                                                     warmup=steps//10, log_every=max(1, steps//20), device='cpu'))
    ev = evaluate_facts(res.model, data, H, tok.convert_tokens_to_ids(list(DIGITS)))
    return dict(arm=arm, n=n, batch=batch, steps=steps, keep_fraction=r, n_correct=ev['n_correct'], acc=ev['acc'],
                bits=ev['bits'], params=sum(p.numel() for p in model.parameters()), wall_s=time.time() - t0,
                loss_curve=[[h['step'], h['loss']] for h in res.history])

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--jobs', type=int, default=2, help='runs in parallel, one core each')
    args = ap.parse_args(argv)
    with Pool(args.jobs) as pool:
        uniform = pool.map(run, [('uniform', n, b) for n, b in UNIFORM])
        K = max(r['n_correct'] for r in uniform)
        zipf = pool.map(run, [(arm, K, 256) for arm in (*SELECTION, 'full', 'random', 'oracle')])
    out = results_dir() / 'memorization' / 'studies' / 'steps.json'
    rec = dict(book=BOOK, pool=POOL, sequences=SEQS, n_digits=DIGITS_PER_VALUE, K=K, runs=uniform + zipf)
    atomic_write(out, lambda tmp: tmp.write_text(json.dumps(rec, indent=1)))
    print(f"{'arm':>9} {'N or K':>7} {'batch':>6} {'steps':>6} {'correct':>8} {'acc':>6} {'bits':>8}")
    for r in uniform + zipf:
        print(f"{r['arm']:>9} {r['n']:>7} {r['batch']:>6} {r['steps']:>6} {r['n_correct']:>8} {r['acc']:>6.3f} {r['bits']:>8.0f}")
    print(f"written {out}")

if __name__ == '__main__':
    main()
