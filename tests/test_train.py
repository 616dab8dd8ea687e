"""llmlit.train: resume after SIGKILL, 2 processes vs 1 (DDP and FSDP), the loss hook, and the errors on bad input.

The multi-process runs go through tests/_train_worker.py in subprocesses (plain python or torchrun with gloo on CPU)."""
import json, math, os, signal, subprocess, sys, time
from pathlib import Path
import psutil, pytest
import torch
from datasets import Dataset
from llmlit.models import tiny_llama, tiny_gpt2
from llmlit.train import TrainConfig, train_causal_lm, pack_dataset, latest_checkpoint

WORKER = Path(__file__).with_name('_train_worker.py')
ROOT = WORKER.parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(WORKER.parent))
from _train_worker import corpus, pairs, pair_loss

def _launch(out, *args, nproc=1):
    "Start the worker (under torchrun when nproc > 1) writing its losses to `out`; one thread per process"
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT), 'TOKENIZERS_PARALLELISM': 'false'}
    env.pop('IN_TEST', None)
    cmd = [sys.executable, str(WORKER)] if nproc == 1 else \
          [str(BIN/'torchrun'), '--standalone', f'--nproc_per_node={nproc}', str(WORKER)]
    return subprocess.Popen(cmd + ['--out', str(out), *map(str, args)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

def _result(proc, out, timeout=180):
    "Wait for a worker and read its JSON, showing its output if it failed"
    log, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, log[-3000:]
    return json.loads(Path(out).read_text())

def _run(tmp, name, *args, nproc=1): return _result(_launch(tmp/f'{name}.json', *args, nproc=nproc), tmp/f'{name}.json')

def _rel(a, b):
    "Largest relative difference between two loss curves of the same length"
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))

def _kill_after_checkpoint(tmp, name, ck, at, *args, nproc=1):
    "Start a checkpointing run, SIGKILL it (torchrun and its workers) once a checkpoint of step >= `at` exists; return that step"
    run = _launch(tmp/f'{name}.json', *args, '--ckpt-dir', ck, '--sleep', 0.1, nproc=nproc)
    t0 = time.time()
    while (latest_checkpoint(ck) is None or int(latest_checkpoint(ck).name[5:]) < at) and run.poll() is None:
        assert time.time() - t0 < 150, 'no checkpoint appeared'
        time.sleep(0.02)
    assert run.poll() is None, f'the run ended before it was killed:\n{run.communicate()[0][-2000:]}'
    workers = psutil.Process(run.pid).children(recursive=True)  # torchrun starts its workers in sessions of their own
    for p in [run, *workers]: p.send_signal(signal.SIGKILL)
    run.communicate(); psutil.wait_procs(workers, timeout=30)
    assert run.returncode == -signal.SIGKILL, run.returncode
    assert not (tmp/f'{name}.json').exists()
    return int(latest_checkpoint(ck).name[5:])

@pytest.fixture(scope='module')
def lm_one(tmp_path_factory):
    "The default loss on 1 process with 2 accumulation micro-steps of 4 rows: the reference of the 2-process runs"
    return _run(tmp_path_factory.mktemp('lm_one'), 'one', '--grad-accum', 2)

@pytest.fixture(scope='module')
def lm_two(tmp_path_factory):
    "The default loss on 2 processes (DDP over gloo), 4 rows each, uninterrupted"
    return _run(tmp_path_factory.mktemp('lm_two'), 'two', nproc=2)

@pytest.fixture(scope='module')
def lm_fsdp(tmp_path_factory):
    "The default loss on 2 processes sharded with FSDP, 4 rows each, uninterrupted"
    return _run(tmp_path_factory.mktemp('lm_fsdp'), 'fsdp', '--fsdp', nproc=2)

PAIR = ('--loss', 'pair', '--steps', 12)

@pytest.fixture(scope='module')
def pair_one(tmp_path_factory):
    "The pairwise loss on 1 process with 2 micro-steps of 4 pairs, uninterrupted"
    return _run(tmp_path_factory.mktemp('pair_one'), 'one', *PAIR, '--grad-accum', 2)

# --- resume -------------------------------------------------------------------------------------------------

def test_resume_after_sigkill(tmp_path):
    "Kill a checkpointing run with SIGKILL after its second checkpoint; the resumed run ends with the uninterrupted run's loss"
    steps, ck = 20, tmp_path/'ck'
    ref = _launch(tmp_path/'ref.json', '--steps', steps)
    killed_at = _kill_after_checkpoint(tmp_path, 'killed', ck, 8, '--steps', steps, '--ckpt-every', 4)
    assert 8 <= killed_at < steps
    res = _run(tmp_path, 'resumed', '--steps', steps, '--ckpt-dir', ck, '--ckpt-every', 4)
    want = _result(ref, tmp_path/'ref.json')
    assert res['start_step'] == killed_at  # it really resumed, from the last checkpoint
    assert len(res['losses']) == steps and res['tokens'] == want['tokens']
    assert abs(res['losses'][-1] - want['losses'][-1]) <= 1e-4, (res['losses'][-1], want['losses'][-1])
    assert want['losses'][-1] < want['losses'][0] - 0.5  # the run trains: equal losses are not two frozen models
    assert latest_checkpoint(ck).name == f'step_{steps:07d}'

def test_final_checkpoint_when_steps_not_a_multiple(tmp_path):
    "A run whose length is not a multiple of ckpt_every (or shorter than it) still leaves a checkpoint of its last step"
    cfg = TrainConfig(steps=3, batch_size=4, seq_len=16, warmup=1, device='cpu', ckpt_dir=str(tmp_path), ckpt_every=5)
    train_causal_lm(tiny_llama(), _ds(), cfg)
    assert latest_checkpoint(tmp_path).name == 'step_0000003'
    assert json.loads((latest_checkpoint(tmp_path)/'meta.json').read_text())['step'] == 3

def test_resume_refuses_other_settings(tmp_path):
    "A checkpoint written with one config is not silently continued with another"
    ds = Dataset.from_dict({'input_ids': [[i % 7 + 4] * 16 for i in range(8)]})
    cfg = dict(steps=2, batch_size=4, seq_len=16, warmup=1, device='cpu', ckpt_dir=str(tmp_path), ckpt_every=1, log_every=1)
    train_causal_lm(tiny_llama(), ds, TrainConfig(**cfg))
    with pytest.raises(ValueError, match=r"other settings.*'lr'"):
        train_causal_lm(tiny_llama(), ds, TrainConfig(**{**cfg, 'lr': 1e-4}))
    r = train_causal_lm(tiny_llama(), ds, TrainConfig(**cfg))  # same settings: finished already, nothing to do
    assert r.start_step == 2 and len(r.losses) == 2

# --- what a checkpoint holds, and damaged ones ------------------------------------------------------------------

class _Payload:
    "A pickle that, when loaded, creates the file `marker`: what a planted checkpoint file could do"
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (open, (self.marker, 'w'))

def _interrupted(td, steps=6, at=None, **kw):
    "Train `steps` steps with a checkpoint every 2, stopped by an exception at the eval of step `at` (None: no stop)"
    def ev(model, step):
        if step == at: raise KeyboardInterrupt(f'stopped at step {step}')
        return {}
    cfg = TrainConfig(**{**dict(steps=steps, batch_size=4, seq_len=16, warmup=1, log_every=1, device='cpu', ckpt_dir=str(td),
                               ckpt_every=2, eval_every=2), **kw})
    torch.manual_seed(0)
    try: return train_causal_lm(tiny_llama(), _ds(), cfg, eval_fn=ev)
    except KeyboardInterrupt: return None

@pytest.fixture(scope='module')
def straight():
    "The losses of 6 uninterrupted steps, the reference of the resumed runs below"
    torch.manual_seed(0)
    return train_causal_lm(tiny_llama(), _ds(), TrainConfig(steps=6, batch_size=4, seq_len=16, warmup=1, log_every=1, device='cpu')).losses

def _resume(td, **kw):
    "Resume the run of `_interrupted` on a fresh model"
    cfg = TrainConfig(**{**dict(steps=6, batch_size=4, seq_len=16, warmup=1, log_every=1, device='cpu', ckpt_dir=str(td), ckpt_every=2), **kw})
    return train_causal_lm(tiny_llama(), _ds(), cfg)

def test_resume_never_unpickles(tmp_path, monkeypatch, straight):
    """A checkpoint holds safetensors and JSON only; pickles planted in it (accelerate's names) are never loaded, nor is
    anything else unpickled while resuming, and the resumed run gives the uninterrupted run's losses exactly"""
    import pickle
    ck = tmp_path/'ck'
    _interrupted(ck, at=6)
    path = latest_checkpoint(ck)
    assert path.name == 'step_0000004'
    assert {p.suffix for p in path.iterdir()} == {'.json', '.safetensors'}
    for f in ('custom_checkpoint_0.pkl', 'random_states_0.pkl', 'optimizer.bin', 'scheduler.bin', 'pytorch_model.bin'):
        (path/f).write_bytes(pickle.dumps(_Payload(tmp_path/f'ran-{f}')))
    def refuse(*a, **k): raise AssertionError('something was unpickled while resuming')
    for mod, name in [(pickle, 'load'), (pickle, 'loads'), (pickle, 'Unpickler'), (torch, 'load')]: monkeypatch.setattr(mod, name, refuse)
    r = _resume(ck)
    assert not list(tmp_path.glob('ran-*'))
    assert r.start_step == 4 and r.losses == straight  # measured: equal to the last bit

@pytest.mark.parametrize('damage', ['model.safetensors', 'optimizer.safetensors', 'meta.json', 'config', 'missing'])
def test_damaged_checkpoint_falls_back(tmp_path, caplog, straight, damage):
    """The last two checkpoints are kept; when the newest is damaged (a truncated file, a meta.json without config, a
    missing file) the run resumes from the one before it with a warning naming the damage, and ends as the uninterrupted run"""
    ck = tmp_path/'ck'
    (ck/'.tmp-step_0000001').mkdir(parents=True)  # what a save killed long ago left
    _interrupted(ck, at=6)
    assert [p.name for p in sorted(ck.iterdir())] == ['step_0000002', 'step_0000004']
    new = ck/'step_0000004'
    if damage == 'config': (new/'meta.json').write_text(json.dumps({k: v for k, v in json.loads((new/'meta.json').read_text()).items() if k != 'config'}))
    elif damage == 'missing': (new/'optimizer.safetensors').unlink()
    else: (new/damage).write_bytes((new/damage).read_bytes()[:100])
    with caplog.at_level('WARNING', 'llmlit.train'): r = _resume(ck)
    assert r.start_step == 2 and r.losses == straight
    why = {'model.safetensors': 'model.safetensors is unreadable', 'optimizer.safetensors': 'optimizer.safetensors is unreadable',
           'meta.json': 'meta.json is unreadable', 'config': "meta.json lacks some of", 'missing': 'optimizer.safetensors is missing'}[damage]
    assert any('step_0000004 is damaged' in m and why in m for m in caplog.messages), caplog.messages

def test_all_checkpoints_damaged(tmp_path):
    "When no checkpoint loads, the run stops naming each one's damage instead of silently starting again from step 0"
    from llmlit.train import DamagedCheckpoint
    _interrupted(tmp_path, at=6)
    for p in tmp_path.glob('step_*/model.safetensors'): p.write_bytes(b'')
    with pytest.raises(DamagedCheckpoint, match=r'no checkpoint .* can be loaded \(step_0000004: model.safetensors is unreadable.*step_0000002'):
        _resume(tmp_path)

def test_old_format_checkpoint_is_not_loaded(tmp_path):
    "A checkpoint of accelerate's format (pickles) from an older llmlit is refused by name, never loaded"
    from llmlit.train import DamagedCheckpoint
    d = tmp_path/'step_0000002'; d.mkdir()
    (d/'meta.json').write_text(json.dumps(dict(step=2, history=[], evals=[], losses=[1., 1.], tokens=128, config={})))
    (d/'custom_checkpoint_0.pkl').write_bytes(b'x')
    with pytest.raises(DamagedCheckpoint, match=r'in format 1, not 2: an older llmlit .* pickles, which are never loaded'):
        _resume(tmp_path)

@pytest.mark.parametrize('change,msg', [(dict(betas=(0.8, 0.95)), "'betas'"), (dict(precision='bf16'), "'precision'"),
                                        (dict(steps=8), r"'steps'.*set extend_steps=True")])
def test_resume_refuses_other_settings_by_name(tmp_path, change, msg):
    "Every setting that shapes the run is part of the checkpoint's fingerprint: a mismatch is refused, naming the field"
    _interrupted(tmp_path, at=6)
    with pytest.raises(ValueError, match=rf'other settings.*{msg}'): _resume(tmp_path, **change)

def test_resume_refuses_other_data(tmp_path):
    "A checkpoint records a hash of the first global batch: resuming it on other data is refused"
    _interrupted(tmp_path, at=6)
    other = Dataset.from_dict({'input_ids': [[4 + (2 * i + t) % 20 for t in range(16)] for i in range(8)]})
    with pytest.raises(ValueError, match='trained on other data: the first global batch hashes'):
        train_causal_lm(tiny_llama(), other, TrainConfig(steps=6, batch_size=4, seq_len=16, warmup=1, device='cpu',
                                                         ckpt_dir=str(tmp_path), ckpt_every=2))

def test_extend_steps(tmp_path):
    "extend_steps=True continues a finished run to a larger `steps`; fewer steps than saved are still refused"
    done = _interrupted(tmp_path, steps=4)
    r = _resume(tmp_path, steps=6, extend_steps=True)
    assert r.start_step == 4 and len(r.losses) == 6 and r.losses[:4] == done.losses
    assert latest_checkpoint(tmp_path).name == 'step_0000006'
    with pytest.raises(ValueError, match=r"'steps': \(6, 5\)"): _resume(tmp_path, steps=5, extend_steps=True)

def test_nan_eval_stops_the_run(tmp_path):
    "An eval_fn returning NaN stops the run like a NaN loss, before the checkpoint of that step"
    cfg = TrainConfig(steps=4, batch_size=4, seq_len=16, warmup=1, eval_every=2, ckpt_every=2, ckpt_dir=str(tmp_path), device='cpu')
    with pytest.raises(FloatingPointError, match=r"eval_fn returned \{'acc': nan\} at step 4"):
        train_causal_lm(tiny_llama(), _ds(), cfg, eval_fn=lambda m, s: dict(acc=float('nan') if s == 4 else 0.5))
    assert latest_checkpoint(tmp_path).name == 'step_0000002'

# --- processes ------------------------------------------------------------------------------------------------

def test_two_processes_match_one(lm_one, lm_two):
    """torchrun with 2 CPU processes (gloo) and 1 process with 2 accumulation micro-steps, both at global batch 8,
    give the same loss curve.

    Both compute the mean cross-entropy over the same 8 rows per step, split into the same 4-row micro-batches; only the
    order of floating-point sums differs (gloo's all-reduce vs in-place accumulation), which moves fp32 losses by
    ~1e-7 relative per step (measured: 2e-7 over the 20 steps). The 1e-4 relative tolerance sits far above that and
    below real faults: normalising each process's gradient by its own target count instead of the global one (the
    rows differ in how many targets they have) moved the curve by 1.5e-3 relative, 15x the tolerance."""
    a, b = lm_one, lm_two
    assert b['world'] == 2 and a['world'] == 1 and len(a['losses']) == len(b['losses']) == 20
    assert _rel(a['losses'], b['losses']) <= 1e-4, _rel(a['losses'], b['losses'])
    assert a['losses'][-1] < a['losses'][0] - 0.5

def test_ddp_resume_after_sigkill_never_unpickles(tmp_path, lm_two):
    """2 DDP processes killed by SIGKILL after their second checkpoint resume on 2 processes to the uninterrupted run's
    losses; pickles planted in the checkpoint (accelerate's names) are not run"""
    import pickle
    ck = tmp_path/'ck'
    killed_at = _kill_after_checkpoint(tmp_path, 'killed', ck, 8, '--ckpt-every', 4, nproc=2)
    path = latest_checkpoint(ck)
    assert {p.name for p in path.iterdir()} == {'meta.json', 'model.safetensors', 'optimizer.safetensors', 'rng-00000.safetensors', 'rng-00001.safetensors'}
    for f in ('custom_checkpoint_0.pkl', 'random_states_1.pkl', 'optimizer.bin'): (path/f).write_bytes(pickle.dumps(_Payload(tmp_path/f'ran-{f}')))
    res = _run(tmp_path, 'resumed', '--ckpt-dir', ck, '--ckpt-every', 4, nproc=2)
    assert not list(tmp_path.glob('ran-*'))
    assert res['start_step'] == killed_at and res['tokens'] == lm_two['tokens']
    assert _rel(lm_two['losses'], res['losses']) <= 1e-6, _rel(lm_two['losses'], res['losses'])

def test_grad_accum_matches_full_batch():
    "Two micro-steps of 4 rows give the loss curve of one step of 8 rows (same process, same order of rows)"
    ds = corpus()
    def run(ga):
        torch.manual_seed(0)
        m = tiny_llama(vocab_size=48, hidden_size=32, intermediate_size=64)
        return train_causal_lm(m, ds, TrainConfig(steps=8, lr=1e-2, batch_size=8, seq_len=32, warmup=2, grad_accum=ga,
                                                  log_every=4, device='cpu')).losses
    a, b = run(1), run(2)
    assert max(abs(x - y) / x for x, y in zip(a, b)) <= 1e-5

# --- the loss hook --------------------------------------------------------------------------------------------

def test_pair_loss_two_processes_match_one(tmp_path, pair_one):
    """A pairwise loss on dict batches (chosen_ids, rejected_ids, keep) gives the same curve on 2 processes as on 1.

    n_items is the number of kept pairs, which differs between the processes' halves of a batch, so the curve depends
    on dividing by the global count. 1 process with 2 micro-steps and 2 processes with 1 each see the same 4-pair
    micro-batches; their curves differ by float rounding that grows with the steps (measured: 6e-6 relative over 12
    steps, 2e-5 over 20), against 0.5 when each process divides by its own count."""
    two = _run(tmp_path, 'two', *PAIR, nproc=2)
    assert two['world'] == 2 and len(two['losses']) == 12
    assert _rel(pair_one['losses'], two['losses']) <= 1e-4, _rel(pair_one['losses'], two['losses'])
    assert pair_one['losses'][-1] < pair_one['losses'][0] / 2  # it learns: equal curves are not two frozen models
    assert two['tokens'] == 12 * 8 * 32 * 2  # chosen_ids and rejected_ids are both counted

def test_pair_loss_resume_after_sigkill(tmp_path, pair_one):
    "A pairwise-loss run killed by SIGKILL after its second checkpoint resumes to the uninterrupted run's losses"
    ck = tmp_path/'ck'
    killed_at = _kill_after_checkpoint(tmp_path, 'killed', ck, 8, *PAIR, '--grad-accum', 2, '--ckpt-every', 4)
    assert 8 <= killed_at < 12
    res = _run(tmp_path, 'resumed', *PAIR, '--grad-accum', 2, '--ckpt-dir', ck, '--ckpt-every', 4)
    assert res['start_step'] == killed_at and res['tokens'] == pair_one['tokens']
    assert _rel(pair_one['losses'], res['losses']) <= 1e-6, _rel(pair_one['losses'], res['losses'])

def _tiny(): return tiny_llama(vocab_size=48, hidden_size=32, intermediate_size=64)

def _cfg(**kw): return TrainConfig(**{**dict(steps=2, batch_size=4, seq_len=32, warmup=1, log_every=1, device='cpu'), **kw})

@pytest.mark.parametrize('ret,err,msg', [
    (lambda l, n: l.item(), TypeError, 'must return \\(loss_sum, n_items\\)'),
    (lambda l, n: (l.item(), n), TypeError, "loss_fn's loss_sum must be a scalar float tensor.*got float"),
    (lambda l, n: (l.expand(3), n), TypeError, "loss_fn's loss_sum must be a scalar float tensor.*shape \\(3,\\)"),
    (lambda l, n: (l.detach(), n), ValueError, 'does not depend on any trainable parameter'),
    (lambda l, n: (l, n.expand(2)), TypeError, "loss_fn's n_items must be a number or a scalar tensor"),
    (lambda l, n: (l, 0 * n), ValueError, "loss_fn's n_items sum to 0.0 over all processes at step 1")])
def test_loss_fn_errors(ret, err, msg):
    "A loss_fn returning something else than (scalar loss_sum with a gradient, scalar n_items > 0) is refused, naming loss_fn"
    def bad(model, batch):
        l, n = pair_loss(model, batch)
        return ret(l, n)
    with pytest.raises(err, match=msg): train_causal_lm(_tiny(), pairs(), _cfg(), loss_fn=bad)

def test_dict_batch_errors():
    "Dict batches: a key with another number of rows, a value that is not a tensor, a text column are refused by name"
    def fn(extra):
        return lambda s, B: dict(chosen_ids=torch.full((B, 32), 5), rejected_ids=torch.full((B, 32), 6), keep=torch.ones(B), **extra)
    with pytest.raises(ValueError, match=r"returned 'mask' with 3 rows \(first dimension\); expected 4"):
        train_causal_lm(_tiny(), fn(dict(mask=torch.ones(3, 32))), _cfg(), loss_fn=pair_loss)
    with pytest.raises(TypeError, match=r"returned 'ids' as list"):
        train_causal_lm(_tiny(), fn(dict(ids=[1, 2, 3, 4])), _cfg(), loss_fn=pair_loss)
    with pytest.raises(TypeError, match=r"column 'text' does not hold numbers.*remove_columns"):
        train_causal_lm(_tiny(), pairs().add_column('text', ['a'] * 48), _cfg(), loss_fn=pair_loss)
    ragged = Dataset.from_dict({'chosen_ids': [[5] * 32, [5] * 30], 'rejected_ids': [[6] * 32] * 2, 'keep': [1, 1]})
    with pytest.raises(ValueError, match=r"column 'chosen_ids' have lengths from 30 to 32; pad them"):
        train_causal_lm(_tiny(), ragged, _cfg(batch_size=2), loss_fn=pair_loss)
    with pytest.raises(ValueError, match=r"'chosen_ids' has a sequence of length 300 exceeds"):
        train_causal_lm(_tiny(), Dataset.from_dict({'chosen_ids': [[5] * 300] * 4}), _cfg(), loss_fn=pair_loss)

# --- FSDP -------------------------------------------------------------------------------------------------------

def test_fsdp_matches_one_process(lm_one, lm_fsdp):
    """2 processes sharded with FSDP2 (gloo) give the 1-process loss curve at the same global batch (measured: 2e-7
    relative; 1.4e-3 when each process divides by its own target count)"""
    assert lm_fsdp['world'] == 2 and len(lm_fsdp['losses']) == 20
    assert _rel(lm_one['losses'], lm_fsdp['losses']) <= 1e-4, _rel(lm_one['losses'], lm_fsdp['losses'])
    assert lm_fsdp['losses'][-1] < lm_fsdp['losses'][0] - 0.5

def test_fsdp_sharded_checkpoint_and_resume(tmp_path, lm_fsdp):
    """An FSDP run writes a sharded checkpoint of safetensors (every layer's weight split over both processes' files, no
    full model file, no DCP pickle), is killed by SIGKILL, and resumes on 2 processes to the uninterrupted FSDP run's losses"""
    from safetensors import safe_open
    ck = tmp_path/'ck'
    killed_at = _kill_after_checkpoint(tmp_path, 'killed', ck, 8, '--fsdp', '--ckpt-every', 4, nproc=2)
    path = latest_checkpoint(ck)
    assert 8 <= killed_at < 20 and (path/'meta.json').exists()
    assert {p.name for p in path.iterdir()} == {'meta.json', *(f'{k}-{r:05d}.safetensors' for k in ('model', 'optimizer', 'rng') for r in (0, 1))}
    w = 'model.layers.0.mlp.up_proj.weight'
    shapes = [safe_open(str(path/f'model-{r:05d}.safetensors'), 'pt').get_slice(w).get_shape() for r in (0, 1)]
    assert shapes == [[32, 32], [32, 32]], shapes  # (64, 32) split in halves
    opt = safe_open(str(path/'optimizer-00000.safetensors'), 'pt').keys()
    assert any(k.endswith('.exp_avg') for k in opt) and any(k.endswith('.exp_avg_sq') for k in opt)  # Adam's moments are in the shards too
    res = _run(tmp_path, 'resumed', '--fsdp', '--ckpt-dir', ck, '--ckpt-every', 4, nproc=2)
    assert res['start_step'] == killed_at and res['tokens'] == lm_fsdp['tokens']
    assert _rel(lm_fsdp['losses'], res['losses']) <= 1e-6, _rel(lm_fsdp['losses'], res['losses'])

@pytest.mark.slow
def test_fsdp_compile_matches_eager(tmp_path):
    "compile=True under FSDP (each decoder layer compiled before sharding) gives the eager FSDP curve; slow: ~1 min of compilation per process"
    eager = _launch(tmp_path/'eager.json', '--fsdp', '--steps', 6, nproc=2)
    comp = _run(tmp_path, 'compiled', '--fsdp', '--compile', '--steps', 6, nproc=2)
    assert _rel(_result(eager, tmp_path/'eager.json')['losses'], comp['losses']) <= 1e-5

def test_fsdp_needs_two_processes():
    "fsdp=True on one process is refused rather than silently trained unsharded"
    with pytest.raises(ValueError, match='fsdp=True needs 2 or more processes'):
        train_causal_lm(_tiny(), corpus(), _cfg(fsdp=True))

def test_accelerate_fsdp_without_fsdp_field(monkeypatch):
    "A launch that asked accelerate for FSDP, with TrainConfig.fsdp=False, is refused instead of silently running DDP"
    monkeypatch.setenv('ACCELERATE_USE_FSDP', 'true')
    with pytest.raises(ValueError, match=r'set TrainConfig\(fsdp=True\)'):
        train_causal_lm(_tiny(), corpus(), _cfg())

def test_launch_that_accelerate_missed(monkeypatch):
    "Processes a launcher started that accelerate set up as one each would train alone: refused"
    from types import SimpleNamespace
    from accelerate.utils import DistributedType
    from llmlit.train import _check_parallel
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(RuntimeError, match=r'started 2 processes \(WORLD_SIZE\) but accelerate set up 1'):
        _check_parallel(TrainConfig(), SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO))

# --- bad input ------------------------------------------------------------------------------------------------

def _ds(n=8, T=16): return Dataset.from_dict({'input_ids': [[4 + (i + t) % 20 for t in range(T)] for i in range(n)]})

def test_too_long_dataset_rows():
    "Rows longer than the model's context are refused before training, naming both lengths"
    with pytest.raises(ValueError, match=r'length 64 exceeds .*max_position_embeddings=32'):
        train_causal_lm(tiny_llama(max_position_embeddings=32), _ds(T=64), TrainConfig(steps=1, batch_size=4, seq_len=64))
    with pytest.raises(ValueError, match=r'length 64 exceeds .*n_positions=32'):
        train_causal_lm(tiny_gpt2(n_positions=32), _ds(T=64), TrainConfig(steps=1, batch_size=4, seq_len=64))

def test_too_long_batch_function():
    "A batch function returning sequences past the context is refused at its first batch"
    fn = lambda step, B: dict(input_ids=torch.randint(4, 100, (B, 300)))
    with pytest.raises(ValueError, match=r"get_batch\(step=0\) returned a 'input_ids' sequence of length 300 exceeds .*=256"):
        train_causal_lm(tiny_llama(), fn, TrainConfig(steps=1, batch_size=4, seq_len=64))

def test_seq_len_past_context():
    with pytest.raises(ValueError, match=r'TrainConfig.seq_len 512 exceeds .*=256'):
        train_causal_lm(tiny_llama(), lambda s, B: dict(input_ids=torch.zeros(B, 8, dtype=torch.long)),
                        TrainConfig(steps=1, batch_size=4, seq_len=512))

def test_ragged_and_mismatched_rows():
    ragged = Dataset.from_dict({'input_ids': [[5] * 16, [6] * 12]})
    with pytest.raises(ValueError, match=r'pack_dataset'):
        train_causal_lm(tiny_llama(), ragged, TrainConfig(steps=1, batch_size=2, seq_len=16))
    with pytest.raises(ValueError, match=r'length 16 but TrainConfig.seq_len=32'):
        train_causal_lm(tiny_llama(), _ds(), TrainConfig(steps=1, batch_size=4, seq_len=32))
    with pytest.raises(ValueError, match=r"'input_ids' column"):
        train_causal_lm(tiny_llama(), _ds().rename_column('input_ids', 'x'), TrainConfig(steps=1, batch_size=4, seq_len=16))
    with pytest.raises(TypeError, match='datasets.Dataset or a function'):
        train_causal_lm(tiny_llama(), [[1, 2, 3]], TrainConfig(steps=1))

@pytest.mark.parametrize('bad_step', [1, 3])
def test_nan_loss_names_the_step(bad_step):
    "A model whose output turns NaN at forward `bad_step` stops the run with FloatingPointError naming that step"
    m = _nan_from(tiny_llama(), bad_step)
    with pytest.raises(FloatingPointError, match=rf'nan at step {bad_step} '):
        train_causal_lm(m, _ds(), TrainConfig(steps=6, batch_size=4, seq_len=16, log_every=4, device='cpu'))

def test_divergent_lr_raises():
    "A learning rate far too large makes the loss non-finite within a few steps: the run stops with FloatingPointError"
    with pytest.raises(FloatingPointError, match='at step'):
        train_causal_lm(tiny_llama(), _ds(), TrainConfig(steps=30, lr=1e30, batch_size=4, seq_len=16, warmup=0,
                                                         grad_clip=0, weight_decay=0, log_every=5, device='cpu'))

def _nan_from(model, first):
    "Make `model`'s output NaN from its forward number `first` on (1-based)"
    calls = [0]
    def hook(mod, args, out):
        calls[0] += 1
        return out * float('nan') if calls[0] >= first else out
    model.model.norm.register_forward_hook(hook)
    return model

def test_nan_stops_before_checkpoint(tmp_path):
    "A checkpoint is never written after a non-finite loss: the sync before it catches the NaN"
    m = _nan_from(tiny_llama(), 3)
    with pytest.raises(FloatingPointError, match='step 3 '):
        train_causal_lm(m, _ds(), TrainConfig(steps=8, batch_size=4, seq_len=16, log_every=10, ckpt_every=2,
                                              ckpt_dir=str(tmp_path), device='cpu'))
    assert latest_checkpoint(tmp_path).name == 'step_0000002'

@pytest.mark.parametrize('field,value', [('steps', 0), ('steps', 1.5), ('lr', 0.0), ('lr', -1.0), ('lr', float('inf')),
    ('lr', float('nan')), ('batch_size', 0), ('seq_len', 1), ('warmup', -1), ('weight_decay', -0.1), ('grad_clip', -1.0),
    ('grad_accum', 0), ('log_every', 0), ('eval_every', -1), ('precision', 'fp8'), ('min_lr_ratio', 1.5),
    ('device', 'tpu'), ('ckpt_every', 10), ('betas', (0.9, 1.0)), ('fsdp', 'yes')])
def test_config_validation(field, value):
    "Each out-of-range field is refused, naming the field, its value and the accepted range"
    with pytest.raises(ValueError, match=rf'TrainConfig\.{field}=.* is invalid: expected'):
        TrainConfig(**{field: value})

def test_batch_not_divisible():
    with pytest.raises(ValueError, match='TrainConfig.batch_size=6 is invalid: expected a multiple of grad_accum=4'):
        TrainConfig(batch_size=6, grad_accum=4)

def test_pack_dataset_bad_input():
    with pytest.raises(ValueError, match='seq_len=1'): pack_dataset(_ds(), 1)
    with pytest.raises(ValueError, match='fewer than seq_len=1000'): pack_dataset(_ds(), 1000)
    with pytest.raises(TypeError, match='datasets.Dataset'): pack_dataset([[1, 2]], 4)

# --- the loop's bookkeeping -------------------------------------------------------------------------------------

def test_eval_callback_and_history():
    "eval_fn runs every eval_every steps and at the end, on the unwrapped model in eval mode"
    seen = []
    def ev(model, step):
        seen.append((step, model.training)); return dict(score=step / 10)
    r = train_causal_lm(tiny_llama(), _ds(), TrainConfig(steps=5, batch_size=4, seq_len=16, warmup=1, eval_every=2,
                                                         log_every=2, device='cpu'), eval_fn=ev)
    assert seen == [(2, False), (4, False), (5, False)] and r.model.training
    assert [e['step'] for e in r.evals] == [2, 4, 5] and r.evals[-1]['score'] == 0.5
    assert [h['step'] for h in r.history] == [2, 4, 5]
    assert all(h['tokens_per_s'] > 0 and h['mfu'] is None for h in r.history)
    assert math.isclose(r.history[-1]['loss'], r.losses[-1])
    assert r.tokens == 5 * 4 * 16

def test_schedule_reaches_optimizer():
    "Each optimizer step runs at lr_at(step): warmup 1/2, 2/2 of the peak, then the cosine down to lr*min_lr_ratio"
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    from llmlit.train import lr_at
    cfg = TrainConfig(steps=6, lr=1e-3, batch_size=2, seq_len=8, warmup=2, log_every=6, device='cpu')
    seen = []
    h = register_optimizer_step_pre_hook(lambda opt, args, kw: seen.append([g['lr'] for g in opt.param_groups]))
    try: train_causal_lm(tiny_llama(), lambda s, B: dict(input_ids=torch.full((B, 8), 5 + s)), cfg)
    finally: h.remove()
    want = [lr_at(s, cfg) for s in range(6)]
    assert seen == [[w, w] for w in want]
    assert want[:2] == pytest.approx([5e-4, 1e-3]) and want[-1] == pytest.approx(1e-4)

@pytest.mark.slow
def test_compile_matches_eager():
    "compile=True (one inductor graph for forward and loss) gives the eager loss curve on CPU; slow: ~1 min of compilation"
    def run(c):
        torch.manual_seed(0)
        cfg = TrainConfig(steps=6, lr=1e-2, batch_size=8, seq_len=32, warmup=2, log_every=3, device='cpu', compile=c)
        return train_causal_lm(tiny_gpt2(vocab_size=48, n_positions=64), corpus(), cfg).losses
    a, b = run(False), run(True)
    assert max(abs(x - y) / x for x, y in zip(a, b)) <= 1e-5
