"A tiny llmlit.train run for tests/test_train.py, launched as a subprocess (plain python or torchrun)"
import argparse, json, os, time
import torch
from datasets import Dataset
from llmlit.models import tiny_llama
from llmlit.train import TrainConfig, train_causal_lm

def corpus(n=48, T=32, vocab=48, seed=0):
    "Rows where every odd token is a fixed function of the one before, and a random prefix of each row has no targets"
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(4, vocab, (n, T), generator=g)
    x[:, 1::2] = 4 + (x[:, ::2] * 7) % (vocab - 4)
    labels = x.clone()
    cut = torch.randint(0, T // 2, (n, 1), generator=g)
    labels[torch.arange(T) < cut] = -100  # rows differ in their number of targets: exercises the global token mean
    return Dataset.from_dict({'input_ids': x.tolist(), 'labels': labels.tolist()})

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', required=True)
    ap.add_argument('--steps', type=int, default=20)
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--grad-accum', type=int, default=1)
    ap.add_argument('--ckpt-dir', default=None)
    ap.add_argument('--ckpt-every', type=int, default=0)
    ap.add_argument('--compile', action='store_true')
    ap.add_argument('--sleep', type=float, default=0.0, help='seconds of sleep per forward, to make a run killable')
    a = ap.parse_args()
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=48, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    if a.sleep: model.register_forward_pre_hook(lambda m, args: time.sleep(a.sleep))
    cfg = TrainConfig(steps=a.steps, lr=1e-2, batch_size=a.batch, seq_len=32, warmup=4, grad_accum=a.grad_accum,
                      log_every=1, device='cpu', compile=a.compile, ckpt_dir=a.ckpt_dir, ckpt_every=a.ckpt_every, seed=1)
    res = train_causal_lm(model, corpus(), cfg)
    if int(os.environ.get('RANK', '0')) == 0:
        json.dump(dict(losses=res.losses, start_step=res.start_step, tokens=res.tokens,
                       world=int(os.environ.get('WORLD_SIZE', '1'))), open(a.out, 'w'))

if __name__ == '__main__':
    main()
    if torch.distributed.is_initialized(): torch.distributed.destroy_process_group()  # a clean gloo shutdown
