"""Throughput of llmlit.train against a plain Hugging Face + torch.compile loop, in one process on one GPU.

Both arms train the same GPT-2-124M-shaped `GPT2LMHeadModel` (llmlit.models 'gpt2-124m': vocab 50304, 12 layers, width 768)
from the same initial weights on the same random-token batches (sequence 1024), with bf16 autocast, torch.compile,
fused AdamW (lr 6e-4, betas 0.9/0.95, weight decay 0.1) and gradient clipping at 1.0:

  baseline  the loop most people write: `model(input_ids, labels=input_ids).loss`, backward, clip, step, and `loss.item()`
            every step to log it (batches are copied from pinned memory without blocking, as in llmlit.train);
  llmlit    `train_causal_lm(model, get_batch, TrainConfig(..., compile=True))`.

Each arm runs `--warmup` steps (compilation) and then `--steps` timed steps; tokens/s is measured over the timed steps
only. MFU = tokens/s x (6N + 12 L d T) / peak, with N the matmul parameters (llmlit.train.flops_per_token), against the
dense bf16 peak of 989 TFLOP/s (H100 SXM, H200) and against the 792 TFLOP/s that the issue measured on an H200.

GPU:  python3 bench/train_bench.py --out DIR             (~2 min on an H100: two compilations, then ~10 s per arm)
      --arms baseline,llmlit,llmlit:32 adds llmlit at micro-batch 32 (one more compilation, ~40 s)
CPU:  python bench/train_bench.py --device cpu --tiny    (a smoke test of the same code with a 2-layer model)
"""
import argparse, gc, json, math, os, sys, time
from pathlib import Path
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llmlit.models import model_from_preset
from llmlit.train import TrainConfig, train_causal_lm, flops_per_token, peak_flops

PEAK_DENSE, PEAK_MEASURED_H200 = 989e12, 792e12

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--steps', type=int, default=150, help='timed steps per arm')
    ap.add_argument('--warmup', type=int, default=25, help='untimed steps per arm (compilation, allocator warm-up)')
    ap.add_argument('--batch', type=int, default=16, help='sequences per step, the same in both arms')
    ap.add_argument('--seq', type=int, default=1024, help='tokens per sequence')
    ap.add_argument('--device', default='cuda', choices=['cuda', 'cpu'])
    ap.add_argument('--tiny', action='store_true', help="the 'tiny-gpt2' shape instead of GPT-2-124M (CPU smoke test)")
    ap.add_argument('--no-compile', action='store_true', help='skip torch.compile in both arms')
    ap.add_argument('--arms', default='baseline,llmlit', help="comma-separated arms; 'llmlit:32' runs an arm at batch 32")
    ap.add_argument('--out', default=None, help='also write the JSON record into this folder')
    a = ap.parse_args(argv)
    if a.tiny and a.device == 'cpu' and '--seq' not in (argv or sys.argv): a.seq = 64
    if a.steps < 1 or a.warmup < 1 or a.batch < 1: ap.error('--steps, --warmup and --batch must be >= 1')
    return a

def make_model(a):
    "The benchmark model, seeded so that both arms start from the same weights"
    torch.manual_seed(0)
    return model_from_preset('tiny-gpt2' if a.tiny else 'gpt2-124m', n_positions=max(a.seq, 64))

def make_batches(a, vocab):
    "get_batch(step, B): rows of a fixed random-token table, the same for both arms"
    g = torch.Generator().manual_seed(1)
    table = torch.randint(0, vocab, (max(64, 4 * a.batch), a.seq), generator=g)
    return lambda step, B: dict(input_ids=table[(step * B + torch.arange(B)) % len(table)])

def run_baseline(a, dev):
    "The plain loop; returns (tokens/s over the timed steps, first loss, peak memory GiB)"
    model = make_model(a).to(dev).train()
    get_batch, B = make_batches(a, model.config.vocab_size), a.batch
    fwd = model if a.no_compile else torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=dev.type == 'cuda')
    bf16 = dev.type == 'cuda'
    losses, t0 = [], None
    for step in range(a.warmup + a.steps):
        if step == a.warmup: _sync(dev); t0 = time.perf_counter()
        x = get_batch(step, B)['input_ids']
        x = x.pin_memory().to(dev, non_blocking=True) if bf16 else x
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = fwd(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    _sync(dev)
    tps = a.steps * B * a.seq / (time.perf_counter() - t0)
    return dict(tokens_per_s=tps, first_loss=losses[0], last_loss=losses[-1], mem_gib=_mem(dev))

def run_llmlit(a, dev):
    "llmlit.train on the same model and batches; tokens/s from its log windows after the warm-up"
    model = make_model(a)
    get_batch = make_batches(a, model.config.vocab_size)
    cfg = TrainConfig(steps=a.warmup + a.steps, lr=6e-4, batch_size=a.batch, seq_len=a.seq, warmup=a.warmup,
                      weight_decay=0.1, grad_clip=1.0, log_every=a.warmup, compile=not a.no_compile,
                      device=a.device, precision='bf16' if dev.type == 'cuda' else 'fp32', peak_flops=PEAK_DENSE)
    res = train_causal_lm(model, get_batch, cfg)
    timed = [h for h in res.history if h['step'] > a.warmup]
    tok = [(h['step'] - p['step']) * a.batch * a.seq for p, h in zip(res.history, res.history[1:]) if h['step'] > a.warmup]
    tps = sum(tok) / sum(t / h['tokens_per_s'] for t, h in zip(tok, timed))
    return dict(tokens_per_s=tps, first_loss=res.losses[0], last_loss=res.losses[-1], mem_gib=_mem(dev))

def _sync(dev):
    if dev.type == 'cuda': torch.cuda.synchronize()

def _mem(dev):
    "Peak GPU memory of the arm in GiB (None on CPU), and reset the counter for the next arm"
    if dev.type != 'cuda': return None
    m = torch.cuda.max_memory_allocated() / 2**30; torch.cuda.reset_peak_memory_stats(); return m

def _cleanup(dev):
    "Free the previous arm's model, graphs and cached memory"
    torch._dynamo.reset(); gc.collect()
    if dev.type == 'cuda': torch.cuda.empty_cache()

def main(argv=None):
    a = parse_args(argv)
    if a.device == 'cuda' and not torch.cuda.is_available(): sys.exit('--device cuda: no CUDA GPU visible; use --device cpu --tiny')
    dev = torch.device(a.device)
    name = torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'
    fpt = flops_per_token(make_model(a), a.seq)
    print(f"device {name}; model {'tiny-gpt2' if a.tiny else 'gpt2-124m'}; batch {a.batch} x seq {a.seq}; "
          f"{fpt / 1e6:.1f} MFLOP/token; warm-up {a.warmup} + timed {a.steps} steps per arm", flush=True)
    runs = dict(baseline=run_baseline, llmlit=run_llmlit)
    out = {}
    for arm in a.arms.split(','):
        kind, _, batch = arm.partition(':')  # 'llmlit:32': that arm at micro-batch 32
        if kind not in runs or (batch and not batch.isdigit()):
            sys.exit(f"--arms: unknown arm {arm!r}; known arms: {list(runs)}, optionally with ':BATCH'")
        t0 = time.perf_counter()
        r = runs[kind](argparse.Namespace(**{**vars(a), 'batch': int(batch or a.batch)}), dev)
        r['batch'] = int(batch or a.batch)
        r.update(wall_s=time.perf_counter() - t0, tflops=r['tokens_per_s'] * fpt / 1e12)
        if dev.type == 'cuda':
            r.update(mfu_989=r['tokens_per_s'] * fpt / PEAK_DENSE, mfu_792=r['tokens_per_s'] * fpt / PEAK_MEASURED_H200,
                     mfu_table=r['tokens_per_s'] * fpt / peak_flops(name) if peak_flops(name) else None)
        out[arm] = r
        print(f"{arm:9s} " + '  '.join(f'{k}={v:.4g}' for k, v in r.items() if v is not None), flush=True)
        _cleanup(dev)
    base = out.get('baseline')
    for arm, r in list(out.items()):
        if base is None or arm == 'baseline': continue
        r['speedup'] = r['tokens_per_s'] / base['tokens_per_s']
        same = r['batch'] == base['batch']
        print(f"{arm} / baseline tokens/s: {r['speedup']:.3f}x (goal >= 1.25x)" +
              (f"; first-step losses differ by {abs(r['first_loss'] - base['first_loss']):.2e} (same weights and batch)" if same else ''))
    rec = dict(out, device=name, args=vars(a), flops_per_token=fpt, torch=torch.__version__)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out)/f"train_bench-{a.device}{'-tiny' if a.tiny else ''}.json").write_text(json.dumps(rec, indent=1))
    return rec

if __name__ == '__main__': main()
