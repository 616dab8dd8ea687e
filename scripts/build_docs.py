"""Build the docs site into _docs/: nbdev-docs when Quarto is installed, else MkDocs Material + mkdocs-jupyter.

Without Quarto, the notebooks that `nbdev-proc-nbs` writes into _proc/ are cleaned and given what Quarto would do with
nbdev's cell directives (`#| echo: false`, `#| output: false|asis`, `#| hide`, `#| include: false`, front matter), then
rendered by MkDocs into _docs/ with one page per notebook (named as nbdev names it, `00_core.ipynb` -> `core.html`),
navigation in nbdev's sidebar order, KaTeX math (served from _docs/ when Debian's libjs-katex is installed),
figures and `show_doc` signatures, and site search. Markdown pages in nbs/ (e.g. reproductions.md) are included.
"""
import json, os, re, shutil, subprocess, sys, time
from pathlib import Path

import nbformat, yaml
from nbformat.v4.rwbase import rejoin_lines

ROOT = Path(__file__).resolve().parents[1]
NBS, PROC, SITE = ROOT/'nbs', ROOT/'_proc', ROOT/'_docs'
BUILD = PROC/'_mkdocs'  # generated mkdocs.yml and pages; _proc/ is git-ignored
KATEX_DIRS = [Path('/usr/share/javascript/katex'), Path('/usr/share/nodejs/katex/dist')]
KATEX_CDN = 'https://cdn.jsdelivr.net/npm/katex@0.16.4/dist'
BIN = Path(sys.executable).parent
WIDGET = 'application/vnd.jupyter.widget-view+json'
CELL_KEYS = {'cell_type', 'id', 'metadata', 'source', 'outputs', 'execution_count', 'attachments'}

def tool(name):
    "Path of a console script installed beside this Python, else the name for PATH lookup"
    p = BIN/name
    return str(p) if p.exists() else name

def directives(src):
    "Split a code cell's source into its leading `#|` directives (dict) and the remaining code"
    lines, opts = src.splitlines(), {}
    while lines and re.match(r'\s*#\|', lines[0]):
        d = re.sub(r'^\s*#\|\s*', '', lines.pop(0)).strip()
        k, _, v = d.partition(':') if ':' in d else d.partition(' ')
        opts[k.strip()] = v.strip() if v.strip() else True
    return opts, '\n'.join(lines)

def is_false(v):
    "Whether a directive value means false"
    return str(v).lower() in ('false', 'no', '0')

def fix_markdown(md, site_url):
    "Make Quarto/pandoc markdown render with plain markdown: relative site links, pandoc link attributes as HTML"
    if site_url: md = md.replace(site_url.rstrip('/') + '/', '')
    return re.sub(r'\[([^\]]+)\]\(([^)\s]+)\)\{([^}]*)\}', r'<a href="\2" \3>\1</a>', md)

def local_images(md, docs):
    "Copy images that markdown `md` links from nbs/ (e.g. ../results/x/quick-loss.png) into the site; fix the links"
    def copy(m):
        src = (NBS/m.group(2)).resolve()
        if re.match(r'[a-z]+:', m.group(2)) or not src.is_file() or ROOT not in src.parents: return m.group(0)
        rel = Path('assets')/src.relative_to(ROOT)  # not 'files/': nbconvert strips that prefix from links
        (docs/rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, docs/rel)
        return m.group(1) + rel.as_posix()
    return re.sub(r'(!\[[^\]]*\]\(|<img [^>]*src=")([^)"\s]+)', copy, md)

def md_cell(text):
    "A new markdown cell"
    return nbformat.v4.new_markdown_cell(text)

def front_matter(cells):
    "Front matter of a processed notebook (dict) and its cells without the front-matter raw cell"
    if cells and cells[0].cell_type == 'raw' and cells[0].source.lstrip().startswith('---'):
        fm = yaml.safe_load(cells[0].source.strip().strip('-')) or {}
        return fm, cells[1:]
    return {}, cells

def code_cells(cell, site_url):
    "The cells that show one code cell the way Quarto would: directives applied, `output: asis` markdown as markdown"
    opts, src = directives(cell.source)
    if 'hide' in opts or is_false(opts.get('include', True)): return []
    echo = not is_false(opts.get('echo', True))
    outs = [] if is_false(opts.get('output', True)) else cell.get('outputs', [])
    asis = opts.get('output') == 'asis'
    res, kept = [], []
    for o in outs:
        o.get('data', {}).pop(WIDGET, None)  # no widget state on a static page: show the text fallback
        if 'data' in o and not o['data']: continue
        if 'data' in o and 'text/markdown' in o['data']:
            o['data']['text/markdown'] = fix_markdown(''.join(o['data']['text/markdown']), site_url)
        if asis and 'text/markdown' in o.get('data', {}): res.append(md_cell(o['data']['text/markdown']))
        else: kept.append(o)
    if not echo and not kept: return res
    tags = [] if echo else ['remove_input']
    code = nbformat.v4.new_code_cell(src, outputs=kept, execution_count=cell.get('execution_count'),
                                     metadata=dict(tags=tags) if tags else {})
    return [code] + res

def clean_cells(cells, site_url, docs):
    "Cells as the page shows them: directives applied, nbdev's markers and non-standard keys removed"
    res = []
    for c in cells:
        if c.cell_type == 'code': res += code_cells(c, site_url)
        elif c.cell_type == 'markdown':
            if re.fullmatch(r'\s*<!--.*?-->\s*', c.source, re.S): continue
            m = md_cell(local_images(fix_markdown(c.source, site_url), docs))
            if c.get('attachments'): m['attachments'] = c['attachments']
            res.append(m)
    return res

def strip_keys(nb):
    "Drop cell keys and metadata that nbformat rejects or that only nbdev and Quarto use (has_sd, execution, ...)"
    for c in nb['cells']:
        for k in set(c) - CELL_KEYS: del c[k]
        c['metadata'] = {k: v for k, v in c.get('metadata', {}).items() if k == 'tags'}
    nb['metadata'] = {k: v for k, v in nb.get('metadata', {}).items() if k in ('kernelspec', 'language_info')}
    return nb

def page_from_nb(path, site_url, out_dir):
    "Write the cleaned page notebook for processed notebook `path`; return (page file name, title)"
    raw = json.loads(path.read_text(encoding='utf-8'))
    nb = rejoin_lines(nbformat.from_dict(strip_keys(raw)))
    fm, cells = front_matter(nb.cells)
    title = str(fm.get('title') or path.stem)
    head = f'# {title}' + (f'\n\n> {fix_markdown(str(fm["description"]), site_url)}' if fm.get('description') else '')
    nb.cells = [md_cell(head)] + clean_cells(cells, site_url, out_dir)
    for i, c in enumerate(nb.cells): c['id'] = f'c{i}'
    nbformat.validate(nb)
    name = Path(fm.get('output-file') or re.sub(r'^\d+[a-zA-Z0-9]*_', '', path.name.lower())).with_suffix('.ipynb').name
    nbformat.write(nb, out_dir/name)
    return name, title

def page_from_md(path, site_url, out_dir):
    "Copy markdown page `path` (links fixed); return (page file name, title)"
    text = local_images(fix_markdown(path.read_text(encoding='utf-8'), site_url), out_dir)
    m = re.match(r'---\n(.*?)\n---\n', text, re.S)
    fm = (yaml.safe_load(m.group(1)) or {}) if m else {}
    h1 = re.search(r'^# (.+)$', text, re.M)
    title = str(fm.get('title') or (h1.group(1).strip() if h1 else path.stem.replace('_', ' ').capitalize()))
    if not h1: text = f'# {title}\n\n' + (text[m.end():] if m else text)
    (out_dir/path.name).write_text(text, encoding='utf-8')
    return path.name, title

def sidebar_order():
    "Source page names in nbdev's sidebar order (flattened), index first, then any page the sidebar omits"
    sb = PROC/'sidebar.yml'
    names = []
    def walk(items):
        for it in items or []:
            if isinstance(it, str): names.append(it)
            elif isinstance(it, dict): walk(it.get('contents', []))
    if sb.exists(): walk((yaml.safe_load(sb.read_text()) or {}).get('website', {}).get('sidebar', {}).get('contents'))
    found = sorted(p.name for p in PROC.glob('*.ipynb')) + sorted(p.name for p in md_sources())
    order = list(dict.fromkeys([n for n in names if n in found] + found))
    return [n for n in order if n == 'index.ipynb'] + [n for n in order if n != 'index.ipynb']

def md_sources():
    "Markdown pages: nbs/*.md (their _proc copies when present), not starting with '_'"
    return [PROC/p.name if (PROC/p.name).exists() else p for p in sorted(NBS.glob('*.md')) if not p.name.startswith(('_', '.'))]

def site_meta():
    "Site title, description and URL from nbdev's generated nbdev.yml"
    f = PROC/'nbdev.yml'
    w = (yaml.safe_load(f.read_text()) or {}).get('website', {}) if f.exists() else {}
    return w.get('title', 'llmlit'), w.get('description', ''), w.get('site-url', '')

def katex_assets(docs):
    "Copy KaTeX into the site when installed locally; return the URL prefix for its files"
    src = next((d for d in KATEX_DIRS if (d/'katex.min.js').exists()), None)
    if src is None:
        print('build_docs: KaTeX not installed locally (apt-get install libjs-katex); math loads from a CDN at view time')
        return KATEX_CDN
    shutil.copytree(src, docs/'assets'/'katex', symlinks=False, dirs_exist_ok=True)
    return 'assets/katex'

KATEX_INIT = r"""function llmlitMath() {
  if (!window.renderMathInElement) return;  // no KaTeX (offline, no local copy): the TeX source stays readable
  renderMathInElement(document.body, {throwOnError: false, delimiters: [
    {left: '$$', right: '$$', display: true}, {left: '\\[', right: '\\]', display: true},
    {left: '$', right: '$', display: false}, {left: '\\(', right: '\\)', display: false}]});
}
if (window.document$) document$.subscribe(llmlitMath); else document.addEventListener('DOMContentLoaded', llmlitMath);
"""

CSS = """.jupyter-wrapper .jp-InputArea-prompt, .jupyter-wrapper .jp-OutputArea-prompt { display: none; }
.md-typeset blockquote:first-of-type { font-size: 1.1em; color: var(--md-default-fg-color--light); }
.jupyter-wrapper .jp-RenderedImage img { max-width: 100%; height: auto; }
"""

def write_assets(docs):
    "Write the site's own CSS and JS, and KaTeX; return extra_css, extra_javascript for mkdocs.yml"
    (docs/'assets').mkdir(parents=True, exist_ok=True)
    (docs/'assets'/'llmlit.css').write_text(CSS)
    (docs/'assets'/'math.js').write_text(KATEX_INIT)
    (docs/'assets'/'no-mathjax.js').write_text('// KaTeX renders the math (assets/math.js)\n')
    k = katex_assets(docs)
    return [f'{k}/katex.min.css', 'assets/llmlit.css'], [f'{k}/katex.min.js', f'{k}/contrib/auto-render.min.js'
            if k == KATEX_CDN else f'{k}/contrib/auto-render.js', 'assets/math.js']

def mkdocs_config(nav, docs, css, js):
    "The mkdocs.yml settings"
    title, desc, _ = site_meta()
    return dict(
        site_name=title, site_description=desc, docs_dir=str(docs), site_dir=str(SITE), use_directory_urls=False,
        theme=dict(name='material', font=False, features=['navigation.top', 'search.highlight', 'search.suggest',
                   'toc.follow', 'content.code.copy'], palette=dict(primary='indigo', accent='indigo')),
        plugins=['search', {'mkdocs-jupyter': dict(include=['*.ipynb'], no_prompt=True, include_requirejs=False,
                 custom_mathjax_url='assets/no-mathjax.js', remove_tag_config=dict(remove_input_tags=['remove_input']),
                 cache=False)}],
        markdown_extensions=['admonition', 'attr_list', 'tables', 'md_in_html', {'toc': dict(permalink=True)},
                             {'pymdownx.arithmatex': dict(generic=True)}, 'pymdownx.superfences', 'pymdownx.highlight'],
        extra_css=css, extra_javascript=js, nav=nav)

def home_page(docs, pages):
    "A fallback home page listing the pages, for a project without nbs/index.ipynb"
    title, desc, _ = site_meta()
    links = '\n'.join(f'- [{t}]({n.rsplit(".", 1)[0]}.html)' for n, t in pages)
    (docs/'index.md').write_text(f'# {title}\n\n{desc}\n\n{links}\n')
    return 'index.md', title

def build_pages(docs):
    "Write every page into `docs`; return [(file name, title)] in navigation order"
    _, _, site_url = site_meta()
    pages = []
    for name in sidebar_order():
        src = PROC/name if (PROC/name).exists() else NBS/name
        make = page_from_nb if src.suffix == '.ipynb' else page_from_md
        pages.append(make(src, site_url, docs))
    if not any(n.split('.')[0] == 'index' for n, _ in pages): pages.insert(0, home_page(docs, pages))
    return pages

def tidy_search_index():
    "Drop the pilcrow that notebook headings carry from the search index's titles"
    f = SITE/'search'/'search_index.json'
    idx = json.loads(f.read_text())
    for d in idx['docs']: d['title'] = d['title'].rstrip('¶')
    f.write_text(json.dumps(idx))

def build_mkdocs():
    "Render _proc/ with MkDocs Material into _docs/, and list its pages (file, title) in _docs/pages.json"
    if BUILD.exists(): shutil.rmtree(BUILD)
    docs = BUILD/'docs'
    docs.mkdir(parents=True)
    pages = build_pages(docs)
    css, js = write_assets(docs)
    nav = [{t: n} for n, t in pages]
    cfg = BUILD/'mkdocs.yml'
    cfg.write_text(yaml.safe_dump(mkdocs_config(nav, docs, css, js), sort_keys=False))
    env = dict(os.environ, NO_MKDOCS_2_WARNING='1')
    subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '--quiet', '--clean', '-f', str(cfg)], check=True, cwd=BUILD, env=env)
    tidy_search_index()
    write_manifest(pages)

def page_title(src):
    "Title of a processed page: its front matter's, else its file name"
    if src.suffix != '.ipynb': return src.stem
    return str(front_matter(nbformat.read(src, as_version=4).cells)[0].get('title', src.stem))

def write_manifest(pages):
    "List the site's pages, [(source file name, title)], in _docs/pages.json for the browser check"
    manifest = [dict(page=re.sub(r'^\d+[a-zA-Z0-9]*_', '', Path(n).stem.lower() if n.endswith('.ipynb') else Path(n).stem)
                     + '.html', title=t) for n, t in pages]
    (SITE/'pages.json').write_text(json.dumps(manifest, indent=1))

def proc_nbs():
    "Run nbdev-proc-nbs (writes _proc/), without its attempt to download and install Quarto: the site builds offline"
    import nbdev.quarto as q
    os.chdir(ROOT)
    if not shutil.which('quarto'): q._ensure_quarto = lambda: None
    try: q.nbdev_proc_nbs.__wrapped__()
    except Exception as e:
        sys.exit(f'docs: nbdev-proc-nbs failed.\n{e}\nTo build show_doc output nbdev runs only the exported '
                 'cells and the cells that contain an import, so such a cell cannot use names set in other cells (e.g. '
                 'the parameters): keep imports in cells of their own (shared/STYLE.md).')

def main():
    "Process the notebooks, then render the site with Quarto if present, else with MkDocs"
    t0 = time.time()
    proc_nbs()
    if shutil.which('quarto'):
        subprocess.run([tool('nbdev-docs')], check=True, cwd=ROOT)
        write_manifest([(n, page_title(PROC/n)) for n in sidebar_order()])
        return print(f'docs: built with Quarto into {SITE} in {time.time()-t0:.0f} s')
    build_mkdocs()
    print(f'docs: built with MkDocs into {SITE}/index.html in {time.time()-t0:.0f} s')

if __name__ == '__main__': main()
