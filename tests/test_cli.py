"The `llmlit` command on a temporary checkout with tiny method notebooks (each run starts a kernel: ~2-4 s)"
import json, re, shutil, subprocess, sys
from pathlib import Path
import nbformat, pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
from llmlit.cli import main
from llmlit import experiments
from llmlit.experiments import get_method

PARAMS = "preset = 'quick'  # 'quick' or 'full'\nn_steps = 10  # steps\nlr = 0.5  # step size\ntag = 'a'  # free text"
BODY = """PRESETS = dict(quick=dict(mult=1), full=dict(mult=100))
from llmlit.core import claim_row, preset_config, save_result
cfg = preset_config(PRESETS, preset)
score = n_steps * lr * cfg['mult']
rows = [claim_row('{name} claim', paper=2.5, ours=score, rule='ours >= paper', matches=score >= 2.5)]
save_result(dict(score=score, tag=tag, reproduction=rows), '{name}', preset, params=dict(n_steps=n_steps))"""

def make_method(nbs, name, num, fail=False, params=PARAMS, body=BODY, extra=()):
    "A tiny method notebook `nbs/{num}_{name}.ipynb`; with `fail` it raises after saving its result; `extra` cells run first"
    cells = [new_markdown_cell(f'# {name}'), new_code_cell(f'#| default_exp {name}'),
             new_code_cell(params, metadata=dict(tags=['parameters'])), *map(new_code_cell, extra),
             new_code_cell(body.replace('{name}', name) + ("\nraise RuntimeError('boom')" if fail else ''))]
    nb = new_notebook(cells=cells, metadata=dict(kernelspec=dict(name='python3', language='python', display_name='Python 3')))
    nbs.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, nbs/f'{num}_{name}.ipynb')

def cli(root, *argv, capsys=None):
    "Run `llmlit --root root ...`: (exit code, stdout, stderr)"
    code = main(['--root', str(root), *argv])
    out = capsys.readouterr()
    return code, out.out, out.err

@pytest.fixture
def root(tmp_path):
    "A checkout with one working method, `toy`, and a foundation notebook that is not a method"
    make_method(tmp_path/'nbs', 'toy', 10)
    shutil.copy(tmp_path/'nbs/10_toy.ipynb', tmp_path/'nbs/00_core.ipynb')
    return tmp_path

@pytest.fixture(scope='module')
def ran_all(tmp_path_factory):
    "`llmlit run all` on a checkout where `good` works and `bad` fails: (root, exit code, stdout)"
    root = tmp_path_factory.mktemp('all')
    make_method(root/'nbs', 'bad', 10, fail=True); make_method(root/'nbs', 'good', 20)
    code = main(['--root', str(root), 'run', 'all', '--preset', 'full'])
    return root, code

def test_list_shows_methods_and_presets(root, capsys):
    code, out, _ = cli(root, 'list', capsys=capsys)
    assert code == 0
    line = next(l for l in out.splitlines() if 'toy' in l)
    assert 'quick, full' in line and '10_toy.ipynb' in line and 'n_steps=10' in line
    assert 'core' not in out

def test_presets_from_comment_without_presets_dict(root):
    nb = nbformat.read(root/'nbs/10_toy.ipynb', as_version=4)
    nb.cells[3].source = nb.cells[3].source.replace('PRESETS =', 'CONFIGS =')
    nb.cells[2].source = nb.cells[2].source.replace("'quick' or 'full'", "'quick', 'full' or 'huge'")
    nbformat.write(nb, root/'nbs/10_toy.ipynb')
    assert get_method('toy', root).presets == ['quick', 'full', 'huge']

def test_run_with_param_writes_results(root, capsys):
    code, out, err = cli(root, 'run', 'toy', '-p', 'n_steps=3', '-p', 'tag=42', capsys=capsys)
    assert code == 0, out + err
    rec = json.loads((root/'results/toy/quick.json').read_text())
    assert rec['metrics']['score'] == pytest.approx(1.5) and rec['metrics']['tag'] == '42'
    run_dir, = (root/'runs/toy').iterdir()
    assert (run_dir/'10_toy.ipynb').exists() and (run_dir/'results/toy/quick.json').exists()
    assert json.loads((run_dir/'run.json').read_text())['params'] == dict(n_steps=3, tag='42')
    assert '1 methods: 1 ok, 0 failed' in out

@pytest.mark.parametrize('argv,msg', [
    (['-p', 'steps=3'], "unknown parameter 'steps' for method 'toy'; known parameters: preset, n_steps, lr, tag"),
    (['-p', 'n_steps=abc'], "parameter 'n_steps' of method 'toy' expects int (default 10), got 'abc' of type str"),
    (['-p', 'lr=fast'], "expects float"),
    (['--preset', 'huge'], "unknown preset 'huge' for method 'toy'; known presets: quick, full"),
    (['-p', 'n_steps'], "key=value"),
    (['-p', 'n_steps=3', '-p', 'n_steps=4'], "parameter 'n_steps' is given twice ('3' and '4'): give it once")])
def test_bad_params_exit_2_before_running(root, capsys, argv, msg):
    code, _, err = cli(root, 'run', 'toy', *argv, capsys=capsys)
    assert code == 2 and msg in err, err
    assert not (root/'runs').exists() and not (root/'results').exists()

@pytest.mark.skipif(__import__('torch').cuda.is_available(), reason='a CUDA GPU is visible: the preset may run')
@pytest.mark.parametrize('name', ['toy', 'all'])
def test_cuda_preset_refused_without_gpu(tmp_path, capsys, name):
    "A preset whose PRESETS entry says device='cuda' is refused at once, exit 2, where no GPU is visible; smoke=True may run it"
    make_method(tmp_path/'nbs', 'toy', 10, body=BODY.replace('full=dict(mult=100)', "full=dict(mult=100, device='cuda')"))
    code, _, err = cli(tmp_path, 'run', name, '--preset', 'full', capsys=capsys)
    assert code == 2 and "preset 'full' of method 'toy' runs on CUDA" in err and not (tmp_path/'runs').exists(), err
    m = get_method('toy', tmp_path)
    experiments.check_params(m, dict(preset='quick'))
    with pytest.raises(experiments.DeviceError, match='no CUDA GPU'): experiments.check_params(m, dict(preset='full'))

def test_python_m_cli(root):
    "`python -m llmlit.cli` is the same command as `llmlit`"
    p = subprocess.run([sys.executable, '-m', 'llmlit.cli', '--root', str(root), 'run', 'nope'], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and 'known methods: toy' in p.stderr, p.stderr

def test_unknown_method(root, capsys):
    code, _, err = cli(root, 'run', 'nope', capsys=capsys)
    assert code == 2 and "unknown method 'nope'; known methods: toy" in err, err

def test_console_script_exit_code(root):
    exe = Path(sys.executable).parent/'llmlit'
    if not exe.exists(): pytest.skip('console script not installed (pip install -e .)')
    p = subprocess.run([str(exe), '--root', str(root), 'run', 'nope'], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and 'known methods: toy' in p.stderr, p.stderr

def test_run_all_keeps_results_of_the_others(ran_all):
    root, code = ran_all
    assert code == 1
    assert json.loads((root/'results/good/full.json').read_text())['metrics']['score'] == pytest.approx(500.0)
    assert not (root/'results/bad').exists()  # saved inside its run folder, never published
    assert next((root/'runs/bad').glob('*/results/bad/full.json')).exists()
    bad_run = json.loads(next((root/'runs/bad').glob('*/run.json')).read_text())
    assert bad_run['ok'] is False and 'RuntimeError: boom' in bad_run['error']

def test_report_has_reproduction_rows(ran_all, capsys):
    root, _ = ran_all
    code, out, _ = cli(root, 'report', capsys=capsys)
    assert code == 0
    row = next(l for l in out.splitlines() if 'good claim' in l)
    assert [c.strip() for c in row.strip('|').split('|')] == ['matches', 'good', 'full', 'good claim', '2.5', '500']
    board = next(l for l in out.splitlines() if l.startswith('| good'))
    assert [c.strip() for c in board.strip('|').split('|')] == ['good', 'full', '1', '0', '0']
    page = (root/'nbs/reproductions.md').read_text()
    assert page.startswith('---\ntitle: Reproductions\n') and 'bad claim' not in page
    assert ('<div class="llmlit-claim"><p><span class="llmlit-v llmlit-matches">matches</span> <strong>good claim</strong></p>'
            '<dl class="llmlit-details"><dt>paper</dt><dd>2.5</dd><dt>ours</dt><dd>500</dd><dt>rule</dt><dd>ours &gt;= paper</dd></dl>'
            '</div>') in page, page
    assert '<span class="llmlit-v llmlit-matches">1 matches</span>' in page

def test_report_skips_temporary_files(ran_all):
    "A write killed inside atomic_write leaves `.full.json.XXXX.json`; a folder may be named x.json: the report reads neither"
    root, _ = ran_all
    proj, d = experiments.Project(root), root/'results'/'good'
    recs = experiments.gather_results(proj)
    (d/'.full.json.ab12.json').write_text('{"trunc'); (d/'x.json').mkdir()
    try: assert experiments.gather_results(proj) == recs
    finally: (d/'.full.json.ab12.json').unlink(); (d/'x.json').rmdir()

KNOB = "preset = 'quick'  # 'quick' or 'full'\nn_steps = None  # steps (None: the preset's)\nlr = 0.5  # step size\ntag = 'a'  # free text"
KNOB_BODY = """PRESETS = dict(quick=dict(n_steps=2, mult=1), full=dict(n_steps=20, mult=100))
from llmlit.core import preset_config, save_result
cfg = preset_config(PRESETS, preset, n_steps=n_steps)
save_result(dict(score=cfg['n_steps'] * lr * cfg['mult']), '{name}', preset)"""

def test_knob_holds_under_every_preset(tmp_path, capsys):
    make_method(tmp_path/'nbs', 'knob', 10, params=KNOB, body=KNOB_BODY)
    code, out, err = cli(tmp_path, 'run', 'knob', '--preset', 'full', '-p', 'n_steps=3', capsys=capsys)
    assert code == 0, out + err
    assert json.loads((tmp_path/'results/knob/full.json').read_text())['metrics']['score'] == pytest.approx(150.0)

@pytest.mark.parametrize('argv,preset', [([], 'quick'), (['--preset', 'full'], 'full'), (['-p', 'preset=full'], 'full')])
def test_preset_overriding_a_param_is_refused(tmp_path, capsys, argv, preset):
    make_method(tmp_path/'nbs', 'lax', 10, params=KNOB, body=KNOB_BODY.replace(', n_steps=n_steps)', ')'))
    code, _, err = cli(tmp_path, 'run', 'lax', *argv, '-p', 'n_steps=3', capsys=capsys)
    assert code == 2 and f"parameter 'n_steps' of method 'lax' would be ignored under preset '{preset}'" in err, err
    assert 'n_steps=n_steps to preset_config' in err and not (tmp_path/'runs').exists()
    code, _, err = cli(tmp_path, 'run', 'lax', '-p', 'n_steps=abc', capsys=capsys)
    assert code == 2 and "'n_steps' of method 'lax' expects int (default None)" in err, err  # a knob's type: its presets' values

@pytest.mark.parametrize('drop', ['parameters cell', 'save_result'])
def test_companion_is_not_a_method(root, capsys, drop):
    "A numbered notebook without a parameters cell, or one that saves no result, is not listed or run"
    nb = nbformat.read(root/'nbs/10_toy.ipynb', as_version=4)
    keep = (lambda c: 'parameters' not in c.metadata.get('tags', [])) if drop == 'parameters cell' else (lambda c: 'save_result' not in c.source)
    nb.cells = [c for c in nb.cells if keep(c)]
    nbformat.write(nb, root/'nbs/11_toy_lib.ipynb')
    code, out, _ = cli(root, 'list', capsys=capsys)
    assert code == 0 and '10_toy.ipynb' in out and '11_toy_lib' not in out
    code, _, err = cli(root, 'run', '11_toy_lib', capsys=capsys)
    assert code == 2 and "unknown method '11_toy_lib'; known methods: toy" in err, err

def test_run_reports_progress(root, capsys, monkeypatch):
    "Off a terminal, `llmlit run` writes which cell runs and for how long every PROGRESS_EVERY seconds"
    monkeypatch.setattr(experiments, 'PROGRESS_EVERY', 0.5)
    make_method(root/'nbs', 'slow', 20, extra=['import time; time.sleep(3)'])
    code, out, err = cli(root, 'run', 'slow', capsys=capsys)
    assert code == 0, out + err
    during_sleep = re.findall(r'^slow \(quick\): cell 3 of 4, (\d+) s$', out, re.M)  # default_exp, parameters, sleep, body
    assert len(during_sleep) >= 2 and int(during_sleep[-1]) >= 2, out

# --- reliability: damaged records, failed publishes, Ctrl-C ------------------------------------------------------

DAMAGED = {'list': ('[1, 2]', 'it holds list, not an object'), 'null': ('null', 'it holds NoneType, not an object'),
           'name': ('{"name": 3, "metrics": {}}', "'name' is int, not text"),
           'metrics': ('{"metrics": null}', "'metrics' is NoneType, not an object"),
           'method key': ('{"metrics": {"reproduction": [{"claim": "c", "paper": 1, "ours": 1, "verdict": "matches", "method": "x"}]}}',
                          "reproduction row 0 has the keys ['method']"),
           'time': ('{"time": 5, "metrics": {}}', "'time' is int, not text"),
           'bytes': (b'{"metrics": {"a": "\xff\xfe"}}', 'not readable JSON (UnicodeDecodeError'),
           'deep': ('[' * 100_000 + ']' * 100_000, 'not readable JSON (RecursionError'),
           'missing keys': ('{"metrics": {"reproduction": [{"claim": "c"}]}}', "reproduction row 0 lacks ['paper', 'ours', 'verdict']")}

@pytest.mark.parametrize('kind', list(DAMAGED))
def test_report_skips_damaged_records(ran_all, capsys, kind):
    "A damaged record is skipped with a one-line warning naming the file and the problem (exit 0), or refused with --strict (exit 2)"
    root, _ = ran_all
    text, why = DAMAGED[kind]
    f = root/'results'/'damaged'/'quick.json'; f.parent.mkdir(exist_ok=True)
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    try:
        code, out, err = cli(root, 'report', '--no-write', capsys=capsys)
        assert code == 0 and 'good claim' in out and 'Traceback' not in err, err
        warn, = [l for l in err.splitlines() if l.startswith('llmlit: warning:')]
        assert f'skipped {f}: {why}' in warn, warn
        code, out, err = cli(root, 'report', '--no-write', '--strict', capsys=capsys)
        assert code == 2 and f'llmlit: error: {f}: {why}' in err, err
    finally: shutil.rmtree(f.parent)

def test_report_passes_over_folders_and_dangling_links(ran_all, capsys):
    "A folder named x.json and a dangling symlink are not records: the report passes over them, strict or not"
    root, _ = ran_all
    d = root/'results'/'odd'; (d/'x.json').mkdir(parents=True); (d/'gone.json').symlink_to(d/'nowhere.json')
    try:
        for strict in ([], ['--strict']):
            code, out, err = cli(root, 'report', '--no-write', *strict, capsys=capsys)
            assert code == 0 and 'good claim' in out and not err, err
    finally: shutil.rmtree(d)

def test_failed_publish_keeps_results(root, capsys, monkeypatch):
    "A run whose publish fails (a full disk while copying) leaves the previous results intact and says so in one line"
    import errno
    code, out, err = cli(root, 'run', 'toy', capsys=capsys)
    assert code == 0, out + err
    before = {p.name: p.read_bytes() for p in (root/'results/toy').iterdir()}
    def full(*a, **k): raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(shutil, 'copy2', full)
    code, out, err = cli(root, 'run', 'toy', '-p', 'n_steps=3', capsys=capsys)
    assert code == 1
    line, = [l for l in out.splitlines() if l.startswith('toy (quick): FAILED')]
    assert 'could not publish' in line and 'No space left on device' in line and 'its previous results are intact' in line, line
    assert {p.name: p.read_bytes() for p in (root/'results/toy').iterdir()} == before
    assert sorted(p.name for p in (root/'results').iterdir()) == ['toy']

def test_ctrl_c_is_one_line(root, capsys, monkeypatch):
    "Ctrl-C during `llmlit run` ends with exit 130 and one line naming the method, the cell and the partial notebook"
    def interrupted(src, dst, on_cell=None, **kw):
        Path(dst).write_text('{}'); on_cell(2, 3); raise KeyboardInterrupt
    monkeypatch.setattr(experiments.pm, 'execute_notebook', interrupted)
    code, out, err = cli(root, 'run', 'toy', capsys=capsys)
    run_dir, = (root/'runs/toy').iterdir()
    assert code == 130 and err.count('\n') == 1 and 'Traceback' not in err, err
    assert err.startswith(f'llmlit: interrupted: toy (quick) stopped in cell 2 of 3 after ') and err.strip().endswith(
        f'nothing was published; the partial notebook is {run_dir/"10_toy.ipynb"}'), err
    assert not (root/'results').exists() and json.loads((run_dir/'run.json').read_text())['ok'] is False

@pytest.mark.slow
def test_ctrl_c_real_kernel(root):
    "SIGINT to the whole process group (what Ctrl-C in a terminal sends) while a cell sleeps: one line, exit 130, no kernel left"
    import os, signal, time, psutil
    make_method(root/'nbs', 'slow', 20, extra=['import time; time.sleep(120)'])
    p = subprocess.Popen([sys.executable, '-m', 'llmlit.cli', '--root', str(root), 'run', 'slow'], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    t0 = time.time()
    while not list(root.glob('runs/slow/*/20_slow.ipynb')):
        assert time.time() - t0 < 120 and p.poll() is None, p.communicate()
        time.sleep(0.2)
    time.sleep(8)  # the kernel starts and reaches the sleeping cell
    kids = psutil.Process(p.pid).children(recursive=True)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.count('\n') == 1 and 'Traceback' not in err, err
    assert 'llmlit: interrupted: slow (quick) stopped in cell' in err and 'the partial notebook is' in err, err
    psutil.wait_procs(kids, timeout=30)
    assert not [k for k in kids if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]

def test_method_name_must_be_plain(tmp_path, capsys):
    "A notebook whose default_exp is not a plain name (`..`) is refused before a run folder is made outside runs/"
    make_method(tmp_path/'nbs', '..', 10)
    code, _, err = cli(tmp_path, 'run', '..', capsys=capsys)
    assert code == 2 and "10_...ipynb: method name='..' must be a plain name" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['nbs']  # runs/.. would have put the run folder here
