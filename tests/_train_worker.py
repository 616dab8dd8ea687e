"A tiny llmlit.train run for tests/test_train.py, launched as a subprocess (plain python or torchrun)"
import argparse, json, os, time
import torch
import torch.nn.functional as F
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

def pairs(n=48, T=32, vocab=48, seed=0):
    "Preference pairs: a corpus row (chosen), the same row with one rule-following token replaced at random (rejected), a 0/1 weight"
    g = torch.Generator().manual_seed(seed)
    chosen = torch.tensor(corpus(n, T, vocab, seed)['input_ids'])
    rejected = chosen.clone()
    rejected[torch.arange(n), 1 + 2 * torch.randint(0, T // 2, (n,), generator=g)] = torch.randint(4, vocab, (n,), generator=g)
    keep = (torch.rand(n, generator=g) < 0.7).long()  # processes hold different numbers of kept pairs: exercises the global mean
    return Dataset.from_dict({'chosen_ids': chosen.tolist(), 'rejected_ids': rejected.tolist(), 'keep': keep.tolist()})

def pair_loss(model, batch):
    "Summed -log sigmoid(log p(chosen) - log p(rejected)) over the kept pairs, and their number; one forward for both"
    c, r = batch['chosen_ids'], batch['rejected_ids']
    ids = torch.cat([c, r])
    logp = F.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)
    keep = batch['keep'].float()
    return (keep * -F.logsigmoid(logp[:len(c)] - logp[len(c):])).sum(), keep.sum()

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', required=True)
    ap.add_argument('--steps', type=int, default=20)
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--grad-accum', type=int, default=1)
    ap.add_argument('--ckpt-dir', default=None)
    ap.add_argument('--ckpt-every', type=int, default=0)
    ap.add_argument('--compile', action='store_true')
    ap.add_argument('--fsdp', action='store_true')
    ap.add_argument('--loss', choices=['lm', 'pair'], default='lm', help="'lm': the default loss on corpus(); 'pair': pair_loss on pairs()")
    ap.add_argument('--sleep', type=float, default=0.0, help='seconds of sleep per forward, to make a run killable')
    a = ap.parse_args()
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=48, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    if a.sleep: model.register_forward_pre_hook(lambda m, args: time.sleep(a.sleep))
    cfg = TrainConfig(steps=a.steps, lr=1e-2, batch_size=a.batch, seq_len=32, warmup=4, grad_accum=a.grad_accum, log_every=1,
                      device='cpu', compile=a.compile, ckpt_dir=a.ckpt_dir, ckpt_every=a.ckpt_every, seed=1, fsdp=a.fsdp)
    data, loss_fn = (corpus(), None) if a.loss == 'lm' else (pairs(), pair_loss)
    res = train_causal_lm(model, data, cfg, loss_fn=loss_fn)
    if int(os.environ.get('RANK', '0')) == 0:
        json.dump(dict(losses=res.losses, start_step=res.start_step, tokens=res.tokens,
                       world=int(os.environ.get('WORLD_SIZE', '1'))), open(a.out, 'w'))

if __name__ == '__main__':
    main()
    if torch.distributed.is_initialized(): torch.distributed.destroy_process_group()  # a clean gloo shutdown
