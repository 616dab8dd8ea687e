"""The method-notebook skeleton (shared/STYLE.md), checked statically on every method notebook in nbs/.

A rule is a function of (notebook, `Method`) that returns its problems as sentences. `test_rules_catch_violations`
shows each rule flagging a small notebook that breaks it, so that a pass on the real notebooks means something.
"""
import ast, io, re, tokenize
from pathlib import Path
import nbformat, pytest
from llmlit.core import VERDICTS
from llmlit.experiments import DeviceError, RunnerError, _demo_method, _literal, check_params, load_method

ROOT = Path(__file__).resolve().parents[1]

def tree(c):
    "The parsed code of a code cell (magics and shell lines dropped), or an empty module when it does not parse"
    try: return ast.parse('\n'.join(l for l in c.source.splitlines() if not l.lstrip().startswith(('%', '!'))))
    except SyntaxError: return ast.Module(body=[], type_ignores=[])

def code_cells(nb):
    "(index, cell) of every code cell"
    return [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == 'code']

def fname(f):
    "The called name: `f` for `f(...)` and `m.f(...)`"
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None

def calls(c, *names):
    "The calls of any of `names` in code cell `c`"
    return [n for n in ast.walk(tree(c)) if isinstance(n, ast.Call) and fname(n.func) in names]

def params_index(nb):
    "Index of the first cell tagged `parameters`, else the number of cells"
    return next((i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])), len(nb.cells))

def directive(c, name):
    "Whether code cell `c` starts with the directive `#| name`"
    return c.cell_type == 'code' and re.match(rf'#\|\s*{name}\b', c.source) is not None

def prose(text):
    "Whether markdown `text` has a line of plain text (not a heading, quote or blank)"
    return any(l.strip() and not l.lstrip().startswith(('#', '>')) for l in text.splitlines())

# --- the rules --------------------------------------------------------------------------------------------------

def import_line(st):
    "Whether statement `st` is an import, or nbdev's `_all_ = [...]` that re-exports imported names"
    return isinstance(st, (ast.Import, ast.ImportFrom)) or (isinstance(st, ast.Assign) and [getattr(t, 'id', None) for t in st.targets] == ['_all_'])

def rule_head(nb, m):
    "Title, `#| default_exp`, an `#| export` cell of imports, `#| hide` with fastcore.test, an intro paragraph; then the parameters"
    before, out = nb.cells[:params_index(nb)], []
    if not (nb.cells[0].cell_type == 'markdown' and re.match(r'# \S', nb.cells[0].source)):
        out.append('the first cell is not a "# Title" markdown cell')
    if not any(directive(c, 'default_exp') for c in before): out.append('no `#| default_exp` cell before the parameters')
    if not any(directive(c, 'export') and tree(c).body and all(map(import_line, tree(c).body)) for c in before):
        out.append('no `#| export` cell of imports only before the parameters')
    if not any(directive(c, 'hide') and re.search(r'^from fastcore\.test import \*\s*$', c.source, re.M) for c in before):
        out.append('no `#| hide` cell with `from fastcore.test import *` before the parameters')
    intro = [nb.cells[0].source.split('\n', 1)[-1]] + [c.source for c in before[1:] if c.cell_type == 'markdown']
    if not any(prose(t) for t in intro): out.append('no intro paragraph before the parameters')
    return out

def flat_literal(node):
    "Whether `node` is a number, string, bool, None, or a list of those"
    scalar = lambda n: (isinstance(n, ast.Constant) and not isinstance(n.value, bytes)) or (
        isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd)) and isinstance(n.operand, ast.Constant)
        and isinstance(n.operand.value, (int, float)))
    return scalar(node) or (isinstance(node, ast.List) and all(map(scalar, node.elts)))

def param_line(line):
    "(name, value) of a parameters-cell line `name = <flat literal>  # comment`, or a sentence saying what is wrong"
    try: toks = list(tokenize.generate_tokens(io.StringIO(line).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError): return f'{line.strip()!r} is not a one-line statement'
    com = next((t for t in toks if t.type == tokenize.COMMENT), None)
    if com is None or not com.string.lstrip('#').strip(): return f'{line.strip()!r} has no comment'
    try: st = ast.parse(line[:com.start[1]].strip()).body
    except SyntaxError: return f'{line.strip()!r} is not a one-line statement'
    if not (len(st) == 1 and isinstance(st[0], ast.Assign) and len(st[0].targets) == 1 and isinstance(st[0].targets[0], ast.Name)):
        return f'{line.strip()!r} is not `name = value`'
    if not flat_literal(st[0].value): return f'{line.strip()!r}: the value is not a flat literal (number, string, bool, None, list of those)'
    return st[0].targets[0].id, ast.literal_eval(st[0].value)

def rule_params(nb, m):
    "One parameters cell of `name = <flat literal>  # comment` lines, `preset = 'quick'` first; `smoke`, if any, defaults to False"
    tagged = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
    if len(tagged) != 1: return [f'{len(tagged)} cells tagged parameters (one expected)']
    if tagged[0].cell_type != 'code': return ['the parameters cell is not a code cell']
    parsed = [param_line(l) for l in tagged[0].source.splitlines() if l.strip()]
    out = [p for p in parsed if isinstance(p, str)]
    values = [p for p in parsed if isinstance(p, tuple)]
    if values[:1] != [('preset', 'quick')]: out.append("the first parameter is not `preset = 'quick'`")
    if dict(values).get('smoke', False) is not False: out.append('`smoke` must default to False')
    out += [f'papermill does not read parameter {k!r} (an `=` in its comment hides it), so `-p {k}=...` is refused'
            for k, _ in values if k not in m.params]
    return out

def rule_presets(nb, m):
    "Next code cell: `PRESETS` (quick and full, literals) and `preset_config(PRESETS, preset, k=k, ...)`; preset keys default to None, passed"
    cell = next((c for c in nb.cells[params_index(nb) + 1:] if c.cell_type == 'code'), None)
    assign = [s for s in (tree(cell).body if cell else []) if isinstance(s, ast.Assign)
              and any(isinstance(t, ast.Name) and t.id == 'PRESETS' for t in s.targets)]
    if not assign: return ['the first code cell after the parameters does not assign PRESETS']
    try: presets = _literal(assign[0].value)
    except (ValueError, TypeError, SyntaxError): return ['PRESETS is not made of literals (numbers, strings, lists, dict(...))']
    out = []
    if not (isinstance(presets, dict) and {'quick', 'full'} <= set(presets) and all(isinstance(v, dict) for v in presets.values())):
        out.append('PRESETS is not a dict of presets, with quick and full among them, each a dict of settings')
        presets = {}
    cfg = [c for c in calls(cell, 'preset_config') if [getattr(a, 'id', None) for a in c.args[:2]] == ['PRESETS', 'preset']]
    if not cfg: out.append('no `preset_config(PRESETS, preset, ...)` call in the PRESETS cell')
    passed = {k.arg for c in cfg for k in c.keywords if isinstance(k.value, ast.Name) and k.value.id == k.arg}
    for k in {s for p in presets.values() for s in p} & set(m.params):
        if m.params[k].default is not None: out.append(f'{k!r} is a preset setting, so the parameter must default to None')
        if k not in passed: out.append(f'{k!r} is a preset setting but is not passed as {k}={k} to preset_config')
    return out

def rule_order(nb, m):
    "`## Reproduction`, then the claim_row cells, then the one save_result cell, then committed_results/compare_presets(..., current=)"
    head = [i for i, c in enumerate(nb.cells) if c.cell_type == 'markdown' and re.search(r'^##\s+Reproduction\b', c.source, re.M)]
    rows = [i for i, c in code_cells(nb) if calls(c, 'claim_row')]
    saves = [i for i, c in code_cells(nb) if calls(c, 'save_result')]
    sides = [i for i, c in code_cells(nb) if any(k.arg == 'current' for n in calls(c, 'committed_results', 'compare_presets')
                                                for k in n.keywords)]
    out = (['no "## Reproduction" heading'] if not head else []) + (['no claim_row(...) call'] if not rows else []) + (
           [f'{len(saves)} cells call save_result (one expected)'] if len(saves) != 1 else [])
    if out: return out
    if min(rows) < head[0]: out.append('a claim_row cell comes before the "## Reproduction" heading')
    if max(rows) > saves[0]: out.append('a claim_row cell comes after the save_result cell')
    if not any(i > saves[0] for i in sides):
        out.append('no committed_results(NAME, current=rec) or compare_presets(NAME, ..., current=rec) after save_result')
    return out

def number_literal(node):
    "Whether `node` is a number typed by hand: a numeric literal, or a string literal with a digit in it"
    if isinstance(node, ast.UnaryOp): node = node.operand
    if isinstance(node, ast.JoinedStr) and not any(isinstance(v, ast.FormattedValue) for v in node.values):
        return any(re.search(r'\d', v.value) for v in node.values)
    return isinstance(node, ast.Constant) and (isinstance(node.value, (int, float)) and not isinstance(node.value, bool)
                                               or isinstance(node.value, str) and re.search(r'\d', node.value) is not None)

def rule_verdicts(nb, m):
    "No verdict typed by hand: no verdict strings, no `verdict=` keyword or 'verdict' key; claim_row's `ours` no literal number"
    out = []
    for i, c in code_cells(nb):
        for n in ast.walk(tree(c)):
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.strip().lower() in VERDICTS:
                out.append(f'cell {i}: the verdict {n.value!r} typed as a string')
            elif isinstance(n, ast.keyword) and n.arg == 'verdict': out.append(f'cell {i}: a verdict= keyword')
            elif (isinstance(n, ast.Dict) and 'verdict' in [getattr(k, 'value', None) for k in n.keys]) or (
                  isinstance(n, ast.Subscript) and isinstance(n.ctx, ast.Store) and getattr(n.slice, 'value', None) == 'verdict'):
                out.append(f"cell {i}: a 'verdict' key set by hand")
            elif isinstance(n, ast.Call) and fname(n.func) == 'claim_row':
                ours = next((k.value for k in n.keywords if k.arg == 'ours'), n.args[2] if len(n.args) > 2 else None)
                if ours is not None and number_literal(ours): out.append(f'cell {i}: claim_row(..., ours=<a literal>)')
    return out

def rule_runner(nb, m):
    "`-p name=<default>` of every parameter is accepted by the runner under every preset"
    out, pp = [], m.preset_param
    for preset in m.presets:
        for k, p in m.params.items():
            if k == pp: continue
            try: check_params(m, {pp: preset, k: p.default})
            except DeviceError: pass   # a CUDA preset on a machine without a GPU: refused for the device, not the parameter
            except RunnerError as e: out.append(str(e))
    return out

RULES = [rule_head, rule_params, rule_presets, rule_order, rule_verdicts, rule_runner]

# --- every method notebook --------------------------------------------------------------------------------------

NOTEBOOKS = sorted((ROOT/'nbs').glob('[1-9]*_*.ipynb'))
METHODS = [p for p in NOTEBOOKS if load_method(p)]

def problems(rule, path):
    "The problems `rule` finds in notebook `path`"
    return rule(nbformat.read(path, as_version=4), load_method(path))

def test_there_are_methods():
    assert METHODS, 'no method notebooks found (nbs/[1-9]*_*.ipynb with #| default_exp and a parameters cell)'

@pytest.mark.parametrize('rule', RULES, ids=[r.__name__ for r in RULES])
@pytest.mark.parametrize('path', METHODS, ids=[p.stem for p in METHODS])
def test_method_notebook_skeleton(path, rule):
    found = problems(rule, path)
    assert not found, f'{path.name} breaks "{rule.__doc__}":\n- ' + '\n- '.join(found)

@pytest.mark.parametrize('path', [p for p in NOTEBOOKS if p not in METHODS], ids=lambda p: p.stem)
def test_companions_run_under_papermill(path):
    "A numbered notebook that saves no result is a library companion; it still has a parameters cell, as papermill needs"
    nb = nbformat.read(path, as_version=4)
    assert params_index(nb) < len(nb.cells), f'{path.name} has no code cell tagged parameters'
    assert not [i for i, c in code_cells(nb) if calls(c, 'save_result')], f'{path.name} saves a result but is not a method'

SMOKED = [p for p in METHODS if 'smoke' in load_method(p).params]

@pytest.mark.slow
@pytest.mark.parametrize('path', SMOKED, ids=[p.stem for p in SMOKED])
def test_full_preset_smoke(path, tmp_path, monkeypatch):
    "The full preset's code path at toy size on the CPU, as a GPU run would execute it; saves nothing"
    import papermill as pm
    monkeypatch.setenv('IN_TEST', '1'); monkeypatch.setenv('OMP_NUM_THREADS', '1')
    pm.execute_notebook(str(path), str(tmp_path/path.name), cwd=str(path.parent), parameters=dict(preset='full', smoke=True),
                        progress_bar=False, kernel_name='python3')

# --- each rule catches what it should -----------------------------------------------------------------------------

def sub(old, new):
    "An edit: replace `old` by `new` in the one cell that holds `old`"
    def edit(nb):
        (c,) = [c for c in nb.cells if old in c.source]
        c.source = c.source.replace(old, new)
    return edit

def drop(text):
    "An edit: remove the one cell that holds `text`"
    def edit(nb): (i,) = [i for i, c in enumerate(nb.cells) if text in c.source]; del nb.cells[i]
    return edit

def move_before(text, anchor):
    "An edit: move the cell holding `text` just before the cell holding `anchor`"
    def edit(nb):
        c = nb.cells.pop(next(i for i, c in enumerate(nb.cells) if text in c.source))
        nb.cells.insert(next(i for i, c in enumerate(nb.cells) if anchor in c.source), c)
    return edit

def insert_after(text, src):
    "An edit: a new code cell `src` right after the cell holding `text`"
    def edit(nb): nb.cells.insert(next(i for i, c in enumerate(nb.cells) if text in c.source) + 1, nbformat.v4.new_code_cell(src))
    return edit

VIOLATIONS = {  # name: (the rule that must flag it, a phrase of its message, the edit of the demo notebook)
    'no title': (rule_head, 'Title', sub('# demo\n', 'Demo\n')),
    'code in the imports cell': (rule_head, 'imports only', sub('preset_config, save_result', 'preset_config, save_result\nX = 1')),
    'no fastcore cell': (rule_head, 'fastcore', drop('from fastcore.test import *')),
    'no intro': (rule_head, 'intro', drop('The score of')),
    'param without comment': (rule_params, 'no comment', sub('lr = 0.1  # step size', 'lr = 0.1')),
    'param as expression': (rule_params, 'flat literal', sub('lr = 0.1  # step size', 'lr = 1/10  # step size')),
    'nested list param': (rule_params, 'flat literal', sub("label = 'x'  # a name", "label = [[1], [2]]  # a name")),
    'param over two lines': (rule_params, 'one-line', sub("label = 'x'  # a name", "label = [1,\n         2]  # a name")),
    'preset not first': (rule_params, 'first parameter', sub("preset = 'quick'  # 'quick' or 'full'\n", "lr2 = 1  # x\npreset = 'quick'  # 'quick' or 'full'\n")),
    'param papermill skips': (rule_params, 'papermill does not read', sub('lr = 0.1  # step size', 'lr = 0.1  # step size, x = 2 lr')),
    'smoke on by default': (rule_params, 'smoke', sub("label = 'x'  # a name", "smoke = True  # toy size")),
    'PRESETS not next': (rule_presets, 'does not assign PRESETS', insert_after("preset = 'quick'", 'x = 1')),
    'PRESETS not literal': (rule_presets, 'literals', sub('scale=1)', "scale=len('a'))")),
    'no full preset': (rule_presets, 'quick and full', sub('full=dict(', 'big=dict(')),
    'knob with a default': (rule_presets, 'default to None', sub('n_steps = None  #', 'n_steps = 3  #')),
    'knob not passed': (rule_presets, 'not passed', sub(', n_steps=n_steps)', ')')),
    'runner refuses a knob': (rule_runner, 'would be ignored', sub(', n_steps=n_steps)', ')')),
    'no reproduction heading': (rule_order, 'heading', sub('## Reproduction', '## Results')),
    'save before rows': (rule_order, 'after the save_result', move_before('rec = save_result', 'rows = [claim_row')),
    'no side by side': (rule_order, 'current=rec', drop('committed_results(')),
    'side by side without current': (rule_order, 'current=rec', sub("committed_results('demo', current=rec)", "committed_results('demo')")),
    'verdict key': (rule_verdicts, "'verdict' key", insert_after('rows = [claim_row', "rows[0]['verdict'] = v")),
    'verdict keyword': (rule_verdicts, 'verdict= keyword', insert_after('rows = [claim_row', "rows.append(dict(claim='c', verdict=v))")),
    'verdict string': (rule_verdicts, 'typed as a string', insert_after('rows = [claim_row', "v = 'same direction'")),
    'ours typed': (rule_verdicts, 'ours=', sub('ours=score', 'ours=0.5')),
    'ours typed as text': (rule_verdicts, 'ours=', sub('ours=score', "ours='0.5 (x)'")),
}

@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    "The runner's demo method notebook, which follows the skeleton"
    return nbformat.read(_demo_method(tmp_path_factory.mktemp('demo')/'nbs'), as_version=4)

def test_demo_follows_the_skeleton(demo, tmp_path):
    path = tmp_path/'10_demo.ipynb'
    nbformat.write(demo, path)
    assert {r.__name__: problems(r, path) for r in RULES} == {r.__name__: [] for r in RULES}

@pytest.mark.parametrize('name', VIOLATIONS)
def test_rules_catch_violations(demo, tmp_path, name):
    rule, phrase, edit = VIOLATIONS[name]
    nb = nbformat.from_dict(demo)
    edit(nb)
    path = tmp_path/'10_demo.ipynb'
    nbformat.write(nb, path)
    found = problems(rule, path)
    assert any(phrase in p for p in found), f'{rule.__name__} missed {name!r}: {found}'
