"""Longest top-level definition per export cell, and export cells over a line limit.

Usage: python tools/longest_defs.py [LIMIT]   (LIMIT defaults to 60)
Definitions: ast over alignlab/*.py, `end_lineno - lineno + 1` for top-level def/class (decorators excluded).
Cells: the `# %% ../nbs/X.ipynb N` markers nbdev writes; cell sizes: lines of each `#| export` cell's source."""
import ast, json, re, sys
from pathlib import Path

LIMIT = int(sys.argv[1]) if len(sys.argv) > 1 else 60
root = Path(__file__).resolve().parent.parent
rows = []
for py in sorted((root/"alignlab").rglob("*.py")):
    if py.name == "_modidx.py": continue
    src = py.read_text()
    markers = [(i+1, m.group(1)) for i, l in enumerate(src.splitlines()) if (m := re.match(r"# %% (\S+ #?\w+)", l))]
    def cell_of(line):
        c = None
        for ln, name in markers:
            if ln <= line: c = name
        return c
    for node in ast.parse(src).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            rows.append((node.end_lineno - node.lineno + 1, f"{py.relative_to(root)}:{node.lineno}", node.name, cell_of(node.lineno)))
rows.sort(reverse=True)
print(f"top-level definitions: {len(rows)}; over {LIMIT} lines: {sum(r[0] > LIMIT for r in rows)}")
print("longest 10:")
for n, where, name, cell in rows[:10]: print(f"  {n:4d}  {name:28s} {where:34s} {cell}")
big = []
for nb in sorted((root/"nbs").glob("*.ipynb")):
    for i, c in enumerate(json.loads(nb.read_text())["cells"]):
        s = "".join(c["source"])
        if c["cell_type"] == "code" and re.match(r"\s*#\|\s*export", s):
            n = len(s.splitlines())
            if n > LIMIT: big.append((n, f"{nb.name} cell {i}"))
print(f"export cells over {LIMIT} lines: {len(big)}")
for n, w in sorted(big, reverse=True): print(f"  {n:4d}  {w}")
