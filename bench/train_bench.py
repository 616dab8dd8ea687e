"""Throughput of llmlit.train against a plain Hugging Face + torch.compile loop, in one process on one GPU.

Every arm trains the same GPT-2-124M-shaped `GPT2LMHeadModel` (llmlit.models 'gpt2-124m': vocab 50304, 12 layers, width 768,
SDPA attention) from the same initial weights on the same random-token batches (sequence 1024), with bf16 autocast,
torch.compile, fused AdamW (lr 6e-4, betas 0.9/0.95, weight decay 0.1 on matrices), llmlit's warmup + cosine schedule and
gradient clipping at 1.0, so the loss per step is comparable across arms. An arm is KIND[+FEATURE...][:BATCH]:

  baseline  the loop most people write: `model(input_ids, labels=input_ids).loss`, backward, clip, step, and `loss.item()`
            every step to log it (batches are copied from pinned memory without blocking, as in llmlit.train);
  llmlit    `train_causal_lm(model, get_batch, TrainConfig(..., compile=True, log_every=--warmup))`.
  +liger    (llmlit) loss_fn = the GPT-2 body, then liger-kernel's fused linear + cross-entropy on `lm_head.weight`
            (the (tokens, vocab) logits are never stored); skipped with a message without CUDA or liger-kernel;
  +flash, +cudnn, +efficient   SDPA restricted to that backend (torch.nn.attention.sdpa_kernel) for the whole arm;
  +bf16     (baseline) parameters and gradients in bf16, fp32 master weights and AdamW state (llmlit.train builds its own
            fp32 optimizer, so this idea can only be measured in our own loop);
  +logN     a host sync (loss to the host) every N steps instead of the kind's default (baseline 1, llmlit --warmup);
  :BATCH    micro-batch BATCH sequences instead of --batch.
Examples: llmlit:32, llmlit+liger, llmlit+liger+flash:32, baseline+bf16, llmlit+log1.

Each arm runs `--warmup` steps (compilation) and then `--steps` timed steps; tokens/s is measured over the timed steps
only (llmlit: over its log windows that start at or after the warm-up). MFU = tokens/s x (6N + 12 L d T) / peak, with N the
matmul parameters (llmlit.train.flops_per_token), against the dense bf16 peak of 989 TFLOP/s (H100 SXM, H200) and against
the 792 TFLOP/s that the issue measured on an H200. An arm that fails is reported and the run goes on.

GPU:  python3 bench/train_bench.py --out DIR             (~30 s per arm on an H200, mostly compilation)
CPU:  python bench/train_bench.py --device cpu --tiny    (a smoke test of the same code with a 2-layer model)
"""
import argparse, gc, json, re, sys, time, traceback
from contextlib import nullcontext
from pathlib import Path
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llmlit.models import model_from_preset
from llmlit.train import TrainConfig, train_causal_lm, flops_per_token, lr_at, no_decay_names, peak_flops, _param_groups

PEAK_DENSE, PEAK_MEASURED_H200 = 989e12, 792e12
SDPA = dict(flash=SDPBackend.FLASH_ATTENTION, cudnn=SDPBackend.CUDNN_ATTENTION, efficient=SDPBackend.EFFICIENT_ATTENTION)
FEATURES = dict(baseline={'bf16', *SDPA}, llmlit={'liger', *SDPA})   # and logN for both

class Skip(Exception):
    "An arm that cannot run here (no CUDA, a package missing); the run goes on without it"

def parse_args(argv=None):
    "The command line, with each arm of --arms parsed into a.arm_specs"
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--steps', type=int, default=150, help='timed steps per arm')
    ap.add_argument('--warmup', type=int, default=25, help='untimed steps per arm (compilation, allocator warm-up)')
    ap.add_argument('--batch', type=int, default=16, help="sequences per step of an arm without ':BATCH'")
    ap.add_argument('--seq', type=int, default=1024, help='tokens per sequence')
    ap.add_argument('--device', default='cuda', choices=['cuda', 'cpu'])
    ap.add_argument('--tiny', action='store_true', help="the 'tiny-gpt2' shape instead of GPT-2-124M (CPU smoke test)")
    ap.add_argument('--no-compile', action='store_true', help='skip torch.compile in every arm')
    ap.add_argument('--arms', default='baseline,llmlit', help='comma-separated arms KIND[+FEATURE...][:BATCH] (see above)')
    ap.add_argument('--out', default=None, help='also write the JSON record into this folder')
    a = ap.parse_args(argv)
    if a.tiny and a.device == 'cpu' and '--seq' not in (sys.argv if argv is None else argv): a.seq = 64
    if a.steps < 1 or a.warmup < 1 or a.batch < 1: ap.error('--steps, --warmup and --batch must be >= 1')
    try: a.arm_specs = {arm: parse_arm(arm, a.batch) for arm in a.arms.split(',')}
    except ValueError as e: ap.error(str(e))
    return a

def parse_arm(arm, batch):
    "'llmlit+liger+flash:32' -> dict(kind='llmlit', batch=32, liger=True, sdpa='flash'); ValueError naming what is wrong"
    head, _, b = arm.partition(':')
    kind, *feats = head.split('+')
    if kind not in FEATURES: raise ValueError(f"--arms: unknown kind {kind!r} in {arm!r}; known kinds: {list(FEATURES)}")
    if b and not (b.isdigit() and int(b) > 0): raise ValueError(f"--arms: ':{b}' in {arm!r} must be a batch size >= 1")
    spec = dict(kind=kind, batch=int(b or batch))
    for f in feats:
        if (log := re.fullmatch(r'log([1-9]\d*)', f)): spec['log'] = int(log[1])
        elif f in FEATURES[kind]: spec.update({'sdpa': f} if f in SDPA else {f: True})
        else: raise ValueError(f"--arms: feature {f!r} in {arm!r} is not one of {kind}'s: {sorted(FEATURES[kind])} or logN (N >= 1)")
    return spec

def make_model(a):
    "The benchmark model, seeded so that every arm starts from the same weights"
    torch.manual_seed(0)
    return model_from_preset('tiny-gpt2' if a.tiny else 'gpt2-124m', n_positions=max(a.seq, 64))

def make_batches(a, vocab):
    "get_batch(step, B): rows of a fixed random-token table, the same for every arm"
    g = torch.Generator().manual_seed(1)
    table = torch.randint(0, vocab, (max(64, 4 * a.batch), a.seq), generator=g)
    return lambda step, B: dict(input_ids=table[(step * B + torch.arange(B)) % len(table)])

def train_config(a, spec, log_every):
    "The TrainConfig of an arm: its schedule is also the baseline loop's"
    return TrainConfig(steps=a.warmup + a.steps, lr=6e-4, batch_size=spec['batch'], seq_len=a.seq, warmup=a.warmup,
                       weight_decay=0.1, grad_clip=1.0, log_every=log_every, compile=not a.no_compile, device=a.device,
                       precision='bf16' if a.device == 'cuda' else 'fp32', peak_flops=PEAK_DENSE)

def run_baseline(a, dev, spec):
    "The plain loop (optionally bf16 weights with fp32 masters); returns tokens/s over the timed steps and the losses"
    model, B, cfg = make_model(a).to(dev).train(), spec['batch'], train_config(a, spec, spec.get('log', 1))
    get_batch = make_batches(a, model.config.vocab_size)
    groups = _param_groups(model, no_decay_names(model), cfg.weight_decay)   # llmlit.train's AdamW groups
    params = [p for g in groups for p in g['params']]
    if spec.get('bf16'):   # the optimizer steps fp32 copies; .to() keeps the Parameter objects, now bf16
        master = {p: p.detach().clone() for p in params}
        groups = [dict(g, params=[master[p] for p in g['params']]) for g in groups]
        model.to(torch.bfloat16)
    weights = [p for g in groups for p in g['params']]
    fwd = model if a.no_compile else torch.compile(model)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=dev.type == 'cuda')
    losses, pending, t0 = [], [], None
    for step in range(cfg.steps):
        if step == a.warmup: _sync(dev); t0 = time.perf_counter()
        x = get_batch(step, B)['input_ids']
        x = x.pin_memory().to(dev, non_blocking=True) if dev.type == 'cuda' else x
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == 'cuda'):
            loss = fwd(input_ids=x, labels=x).loss
        loss.backward()
        if spec.get('bf16'):
            for m, p in zip(weights, params): m.grad, p.grad = p.grad.float(), None
        torch.nn.utils.clip_grad_norm_(weights, cfg.grad_clip)
        for g in opt.param_groups: g['lr'] = lr_at(step, cfg)
        opt.step(); opt.zero_grad(set_to_none=True)
        if spec.get('bf16'):
            with torch.no_grad(): torch._foreach_copy_(params, weights)
        pending.append(loss.detach())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps: losses += torch.stack(pending).tolist(); pending = []
    _sync(dev)
    return dict(tokens_per_s=a.steps * B * a.seq / (time.perf_counter() - t0), timed_steps=a.steps, losses=losses)

def liger_loss_fn(dev):
    "loss_fn(model, batch) -> (loss_sum, n): GPT-2's body, then liger's fused LM head + summed cross-entropy; Skip if unusable"
    if dev.type != 'cuda': raise Skip("liger-kernel's fused linear + cross-entropy is a Triton kernel: it needs a CUDA device")
    try: from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        raise Skip(f"liger-kernel is not importable ({e}); carry its wheel in .whl/ (see bench/gpu_run.sh)") from None
    fused = torch.compiler.disable(LigerFusedLinearCrossEntropyLoss(reduction='sum'))  # its own kernels; the body compiles
    def loss_fn(model, batch):
        ids = batch['input_ids'].long()
        h = model.transformer(input_ids=ids, use_cache=False).last_hidden_state     # (B, T, d)
        x, y = h[:, :-1].reshape(-1, h.shape[-1]), ids[:, 1:].reshape(-1)            # (B*(T-1), d), (B*(T-1),)
        return fused(model.lm_head.weight, x, y), y.numel()
    return loss_fn

def run_llmlit(a, dev, spec):
    "llmlit.train on the same model and batches; tokens/s from its log windows that start at or after the warm-up"
    loss_fn = liger_loss_fn(dev) if spec.get('liger') else None
    model = make_model(a)
    res = train_causal_lm(model, make_batches(a, model.config.vocab_size), train_config(a, spec, spec.get('log', a.warmup)),
                          loss_fn=loss_fn)
    wins = [(h['step'] - p['step'], h['tokens_per_s']) for p, h in zip(res.history, res.history[1:]) if p['step'] >= a.warmup]
    if not wins: raise Skip(f"no log window starts at or after step {a.warmup}: lower N of +logN or raise --steps")
    steps = sum(n for n, _ in wins)
    tps = steps * spec['batch'] * a.seq / sum(n * spec['batch'] * a.seq / t for n, t in wins)
    return dict(tokens_per_s=tps, timed_steps=steps, losses=res.losses)

def run_arm(a, dev, spec):
    "One arm under its SDPA backend; its record without the loss curve"
    if spec.get('sdpa') in ('cudnn', 'efficient') and dev.type != 'cuda': raise Skip(f"SDPA's {spec['sdpa']} backend needs CUDA")
    with sdpa_kernel(SDPA[spec['sdpa']]) if 'sdpa' in spec else nullcontext():
        r = dict(baseline=run_baseline, llmlit=run_llmlit)[spec['kind']](a, dev, spec)
    losses = r.pop('losses')
    return dict(r, batch=spec['batch'], first_loss=losses[0], last_loss=losses[-1], mem_gib=_mem(dev))

def _sync(dev):
    "Wait for the GPU's queued work (nothing to wait for on the CPU)"
    if dev.type == 'cuda': torch.cuda.synchronize()

def _mem(dev):
    "Peak GPU memory of the arm in GiB (None on CPU), and reset the counter for the next arm"
    if dev.type != 'cuda': return None
    m = torch.cuda.max_memory_allocated() / 2**30; torch.cuda.reset_peak_memory_stats(); return m

def _cleanup(dev):
    "Free the previous arm's model, graphs and cached memory"
    torch._dynamo.reset(); gc.collect()
    if dev.type == 'cuda': torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()

def measure(a, dev, spec, fpt, name):
    "Run one arm and add wall time, TFLOP/s and MFU; a Skip or an error becomes the record's 'skipped' or 'error'"
    t0 = time.perf_counter()
    try: r = run_arm(a, dev, spec)
    except Skip as e: return dict(skipped=str(e))
    except Exception as e:  # an arm that breaks on the GPU must not cost the others
        traceback.print_exc(); return dict(error=f'{type(e).__name__}: {e}'[:500])
    finally: _cleanup(dev)
    r.update(wall_s=time.perf_counter() - t0, tflops=r['tokens_per_s'] * fpt / 1e12)
    if dev.type == 'cuda':
        r.update(mfu_989=r['tokens_per_s'] * fpt / PEAK_DENSE, mfu_792=r['tokens_per_s'] * fpt / PEAK_MEASURED_H200,
                 mfu_table=r['tokens_per_s'] * fpt / peak_flops(name) if peak_flops(name) else None)
    return r

def compare(out):
    "Add each arm's speedup over the baseline and print it, with the loss gap at the same batch"
    base = out.get('baseline')
    if not base or 'tokens_per_s' not in base: return
    for arm, r in out.items():
        if arm == 'baseline' or 'tokens_per_s' not in r: continue
        r['speedup'] = r['tokens_per_s'] / base['tokens_per_s']
        same = r['batch'] == base['batch']
        print(f"{arm} / baseline tokens/s: {r['speedup']:.3f}x (goal >= 1.25x); last loss {r['last_loss']:.4f} vs "
              f"{base['last_loss']:.4f}" + (f"; first-step losses differ by {abs(r['first_loss'] - base['first_loss']):.2e}"
                                               if same else ' (another batch size)'))

def main(argv=None):
    "Run every arm, print each with its speedup, and return the record (also written under --out)"
    a = parse_args(argv)
    if a.device == 'cuda' and not torch.cuda.is_available(): sys.exit('--device cuda: no CUDA GPU visible; use --device cpu --tiny')
    dev = torch.device(a.device)
    name = torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'
    fpt = flops_per_token(make_model(a), a.seq)
    print(f"device {name}; model {'tiny-gpt2' if a.tiny else 'gpt2-124m'}; seq {a.seq}; {fpt / 1e6:.1f} MFLOP/token; "
          f"warm-up {a.warmup} + timed {a.steps} steps per arm", flush=True)
    out = {}
    for arm, spec in a.arm_specs.items():
        out[arm] = r = measure(a, dev, spec, fpt, name)
        print(f"{arm:18s} " + '  '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}'
                                         for k, v in r.items() if v is not None), flush=True)
    compare(out)
    args = {k: v for k, v in vars(a).items() if k != 'arm_specs'}
    rec = dict(out, device=name, args=args, flops_per_token=fpt, torch=torch.__version__)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out)/f"train_bench-{a.device}{'-tiny' if a.tiny else ''}.json").write_text(json.dumps(rec, indent=1))
    return rec

if __name__ == '__main__': main()
