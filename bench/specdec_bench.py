"""Decoding speed of llmlit.specdec on one GPU: transformers' generate, our CUDA-graph autoregressive loop, our speculative loop.

GPU (about 2 min on an H100, plus the compiled arms' autotuning):  PYTHONPATH=. python3 bench/specdec_bench.py
CPU smoke test (about a minute, most of it compiling):              PYTHONPATH=. python bench/specdec_bench.py --tiny

A random pair has near-zero acceptance, so the pair is trained first, briefly, on one synthetic Markov corpus (llmlit.train):
the target is `model_from_preset('llama-124m')`, the draft a 2-layer Llama of width 256 with the same vocabulary.
All loops decode greedily (temperature 0) at batch 1, so every loop must emit the same tokens up to bf16 ties; sampled
runs (temperature 1, SpS and Cactus delta=1) are timed as well. Last come the compiled arms (--compile-arms): our AR loop
with its StaticLlama step under torch.compile, `in_graph` (mode max-autotune-no-cudagraphs, the compiled kernels captured
in our own CUDA graph) and `cg` (mode max-autotune: inductor's CUDA graphs, our loop plain), each with its ratio to our
loop of the same run; the other numbers are printed before they start, so a time limit hit while autotuning loses only
them. The GPU run writes results/specdec/bench.json.
"""
import argparse, time
import torch
from llmlit.core import get_device, save_result, seed_everything
from llmlit.models import count_params, model_from_preset, tiny_llama
from llmlit.data import make_markov_corpus, markov_batches, markov_table
from llmlit.specdec import Cactus, SpS, StaticLlama, decode_static, spec_decode_static
from llmlit.train import TrainConfig, train_causal_lm

HBM = {'H100': 3.35e12, 'H200': 4.8e12}   # bytes/s of HBM bandwidth, by GPU name
COMPILED = {'in_graph': ('max-autotune-no-cudagraphs', True), 'cg': ('max-autotune', False)}   # arm: (compile mode, our graph)

def parse():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--tiny', action='store_true', help='tiny models on the CPU: a smoke test of the same code')
    ap.add_argument('--new-tokens', type=int, default=None, help='tokens per timed decode (default 256; tiny 24)')
    ap.add_argument('--ks', type=int, nargs='+', default=[4, 8], help='drafts per block')
    ap.add_argument('--train-steps', type=int, default=None, help='steps for each of target and draft (default 300; tiny 10)')
    ap.add_argument('--corpus-vocab', type=int, default=512, help='tokens the Markov corpus uses (model vocabularies are larger)')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--compile-arms', nargs='*', default=list(COMPILED), choices=list(COMPILED),
                    help='compiled decode-step arms to time (none: give the flag alone)')
    return ap.parse_args()

def tok_s(n, s): return n / s if s > 0 else float('nan')

def time_generate(model, prompt, n, **kw):
    "Tokens/s of transformers' greedy generate (after one short warm-up call)"
    args = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0, **kw)
    model.generate(prompt, max_new_tokens=4, min_new_tokens=4, **args)
    if prompt.is_cuda: torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **args)
    if prompt.is_cuda: torch.cuda.synchronize()
    return tok_s(n, time.perf_counter() - t0), out

GRAPH = {'use': None}   # None: CUDA graphs on GPUs; set to False if a capture fails, so the run still reports eager numbers

def graphed(fn, res, *args, **kw):
    "Call a static decode loop with CUDA graphs; on a capture error, record it and fall back to eager steps"
    try: return fn(*args, graph=GRAPH['use'], **kw)
    except RuntimeError as e:
        if GRAPH['use'] is False: raise
        res['graph_error'] = f'{type(e).__name__}: {e}'[:300]; GRAPH['use'] = False
        return fn(*args, graph=False, **kw)

def time_compiled(res, name, mk, target, prompt, n_new, ar_out):
    "Our AR loop with the decode step compiled as COMPILED[name] says; adds its tokens/s, ratio to our loop and agreement"
    mode, ours = COMPILED[name]
    ours = ours and prompt.is_cuda   # CUDA graphs exist on GPUs only
    key = f'ar_compiled_{name}'
    try:
        dec = torch.compile(mk(target), mode=mode, dynamic=False, fullgraph=True)
        t0 = time.perf_counter(); decode_static(dec, prompt, 8, graph=ours)      # compile and autotune both shapes
        res[f'{key}_compile_s'] = time.perf_counter() - t0
        out, s = decode_static(dec, prompt, n_new, graph=ours)
    except Exception as e:
        res[f'{key}_error'] = f'{type(e).__name__}: {e}'[:300]; return
    finally: torch._dynamo.reset()
    res[f'{key}_tok_s'] = tok_s(n_new - 1, s)
    res[f'{key}_vs_ar'] = res[f'{key}_tok_s'] / res['ar_tok_s']
    res[f'{key}_matches_ar_tokens'] = (out == ar_out).float().mean().item()

def show(res):
    "Print a result dict, one key per line"
    for k_, v in res.items(): print(f'{k_:>36}: {v:.4g}' if isinstance(v, float) else f'{k_:>36}: {v}', flush=True)

def main():
    a = parse()
    dev = get_device('cpu' if a.tiny else None)
    dtype = torch.bfloat16 if dev.type == 'cuda' else torch.float32
    n_new = a.new_tokens or (24 if a.tiny else 256)
    steps = a.train_steps if a.train_steps is not None else (10 if a.tiny else 300)
    seed_everything(a.seed)
    if a.tiny:
        target = tiny_llama(vocab_size=a.corpus_vocab)
        draft = tiny_llama(vocab_size=a.corpus_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    else:
        target = model_from_preset('llama-124m')
        V = target.config.vocab_size
        draft = tiny_llama(vocab_size=V, hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True)
    target, draft = target.to(dev), draft.to(dev)
    table = markov_table(a.corpus_vocab, a.seed, support=3, sharpness=3.0)
    cfg = TrainConfig(steps=steps, lr=2e-3, batch_size=32, seq_len=128 if not a.tiny else 32, warmup=min(30, steps),
                      log_every=50, seed=a.seed, device=str(dev))
    t0 = time.perf_counter()
    target = train_causal_lm(target, markov_batches(table, cfg.seq_len, a.seed), cfg).model
    draft = train_causal_lm(draft, markov_batches(table, cfg.seq_len, a.seed + 1), cfg).model
    train_s = time.perf_counter() - t0
    target, draft = target.to(dtype).eval(), draft.to(dtype).eval()
    prompt = make_markov_corpus(1, 16, table=table, seed=a.seed + 99)[0].to(dev)
    T0, kmax = prompt.shape[1], max(a.ks)
    mk = lambda m: StaticLlama(m, T0 + n_new + kmax + 2)
    res = dict(device=torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu', dtype=str(dtype), new_tokens=n_new,
               target_params=count_params(target), draft_params=count_params(draft), train_s=train_s)
    n_hf = min(n_new, 64)
    res['hf_generate_tok_s'], hf_out = time_generate(target, prompt, n_hf)
    try: res['hf_generate_static_tok_s'] = time_generate(target, prompt, n_hf, cache_implementation='static', disable_compile=True)[0]
    except Exception as e: res['hf_generate_static_error'] = f'{type(e).__name__}: {e}'[:200]
    graphed(decode_static, res, mk(target), prompt, 8)                     # warm-up: kernels, allocator
    ar_out, ar_s = graphed(decode_static, res, mk(target), prompt, n_new)
    res['ar_tok_s'] = tok_s(n_new - 1, ar_s)
    res['ar_vs_hf'] = res['ar_tok_s'] / res['hf_generate_tok_s']
    res['ar_matches_hf_tokens'] = (ar_out[:, :T0 + n_hf] == hf_out).float().mean().item()
    bw = next((v for k_, v in HBM.items() if k_ in res['device']), None)
    if bw:   # every decoded token reads every weight once: params * 2 bytes in bf16
        res['ar_bandwidth_limit_tok_s'] = bw / (2 * res['target_params'])
        res['ar_fraction_of_bandwidth_limit'] = res['ar_tok_s'] / res['ar_bandwidth_limit_tok_s']
    for k in a.ks:
        so, s = graphed(spec_decode_static, res, mk(target), mk(draft), prompt, n_new, SpS(), k=k)
        res[f'spec_k{k}_tok_s'] = tok_s(n_new, s)
        res[f'spec_k{k}_vs_ar'] = res[f'spec_k{k}_tok_s'] / res['ar_tok_s']
        res[f'spec_k{k}_AL'] = sum(so.accepted_per_step) / len(so.accepted_per_step)
        res[f'spec_k{k}_matches_ar_tokens'] = (so.sequences == ar_out).float().mean().item()
    k = a.ks[-1]
    torch.manual_seed(a.seed); _, s_ar1 = graphed(decode_static, res, mk(target), prompt, n_new, temperature=1.0)
    res['ar_T1_tok_s'] = tok_s(n_new - 1, s_ar1)
    for name, rule in (('sps', SpS()), ('cactus1', Cactus(1.0))):
        so, s = graphed(spec_decode_static, res, mk(target), mk(draft), prompt, n_new, rule, k=k, temperature=1.0)
        res[f'spec_T1_{name}_k{k}_tok_s'] = tok_s(n_new, s)
        res[f'spec_T1_{name}_k{k}_vs_ar'] = tok_s(n_new, s) / res['ar_T1_tok_s']
        res[f'spec_T1_{name}_k{k}_AL'] = sum(so.accepted_per_step) / len(so.accepted_per_step)
    best = max(res[f'spec_k{k_}_vs_ar'] for k_ in a.ks)
    res['cuda_graphs'] = dev.type == 'cuda' and GRAPH['use'] is not False
    res['goal_ar_10x_hf'] = bool(res['ar_vs_hf'] >= 10)
    res['goal_spec_1p8x_ar'] = bool(best >= 1.8)
    show(res)
    n0 = len(res)
    for name in a.compile_arms: time_compiled(res, name, mk, target, prompt, n_new, ar_out)
    show(dict(list(res.items())[n0:]))
    if not a.tiny: save_result(res, 'specdec', 'bench', params=vars(a), seed=a.seed, device=str(dev))   # the CPU smoke test only prints

if __name__ == '__main__':
    main()
