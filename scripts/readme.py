"""Write README.md from nbs/index.ipynb's markdown cells (what `nbdev-readme` does with Quarto); `--check` only compares."""
import sys
from pathlib import Path
import nbformat

root = Path(__file__).resolve().parent.parent

def readme_text():
    "README.md's text: the index notebook's markdown cells, front matter as title and quote"
    nb = nbformat.read(root/'nbs'/'index.ipynb', as_version=4)
    return '\n\n'.join(c.source.strip() for c in nb.cells if c.cell_type == 'markdown') + '\n'

if __name__ == '__main__':
    txt, f = readme_text(), root/'README.md'
    if '--check' in sys.argv:
        if not f.exists() or f.read_text() != txt: sys.exit('README.md differs from nbs/index.ipynb: run `.venv/bin/python scripts/readme.py`')
    else: f.write_text(txt)
