"""The rhythm of ../shared/reference/style.md that a machine can check: short cells, lines of at most 120 characters,
one convention for a lesson's names (plain names, as nbdev's own notebooks; never a papermill parameter's name, which
would change what the chapter's last section runs on), and no call that passes a long row of positional arguments."""
import ast
import json
import re
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT/"nbs").glob("*.ipynb") if not p.name.startswith("_"))
MAX = 120
MAX_POSITIONAL = 8   # beyond this, a call's arguments are named
MEDIAN_LINES = 8     # short cells: the median code cell of a chapter (issue 10's bar; style.md aims at 6)
_SCOPES = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.Lambda, ast.FunctionDef, ast.ClassDef)


def _code(src:str) -> str: return "\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("%", "!")))


def _exempt(line:str) -> bool:
    "Markdown lines that cannot be wrapped: table rows, and the one-line `>` description nbdev reads."
    return line.startswith("|") or line.startswith("> ")


def long_lines(path:Path) -> list:
    "(cell index, length) of every line over MAX characters in a notebook or Python file."
    if path.suffix == ".py": return [(0, len(l)) for l in path.read_text().splitlines() if len(l) > MAX]
    out = []
    for i, c in enumerate(json.loads(path.read_text())["cells"]):
        lines = "".join(c["source"]).splitlines()
        out += [(i, len(l)) for l in lines if len(l) > MAX and not (c["cell_type"] == "markdown" and _exempt(l))]
    return out


def _stored(tree) -> set:
    "Names a cell binds at its top level (not inside its functions, classes and comprehensions)."
    out, todo = set(), list(tree.body)
    while todo:
        n = todo.pop()
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store): out.add(n.id)
        if isinstance(n, (ast.FunctionDef, ast.ClassDef)): out.add(n.name); continue
        todo += [c for c in ast.iter_child_nodes(n)
                 if not isinstance(c, _SCOPES) or isinstance(c, (ast.FunctionDef, ast.ClassDef))]
    return out


def lesson_names(nb:dict) -> tuple:
    "(names the lesson cells bind, the papermill parameters) of a notebook."
    names, params = set(), set()
    for c in nb["cells"]:
        src = "".join(c["source"])
        if c["cell_type"] != "code" or re.search(r"^#\|\s*(export|default_exp)", src, re.M): continue
        bound = _stored(ast.parse(_code(src)))
        if "parameters" in c.get("metadata", {}).get("tags", []): params |= bound
        else: names |= bound
    return names, params


def test_lesson_names_checker():
    nb = {"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": ["subject = 1"]},
                    {"cell_type": "code", "metadata": {}, "source": ["#| export\ndef _f(x): return x"]},
                    {"cell_type": "code", "metadata": {},
                     "source": ["a, _b = 1, 2\nfor k_ in []: pass\n[z for z in ()]"]}]}
    assert lesson_names(nb) == ({"a", "_b", "k_"}, {"subject"})
    assert long_lines(ROOT/"tests"/"test_style.py") == []


CHAPTERS = [p for p in NOTEBOOKS if p.stem != "index"]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_short_cells(path):
    "Code cells of a chapter: median at most MEDIAN_LINES lines (a long function is one cell, its lessons are short)."
    sizes = [len("".join(c["source"]).rstrip("\n").split("\n")) for c in json.loads(path.read_text())["cells"]
             if c["cell_type"] == "code"]
    assert statistics.median(sizes) <= MEDIAN_LINES, f"{path.name}: median code cell {statistics.median(sizes)} lines"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_lines_at_most_120(path):
    cells = sorted({i for i, _ in long_lines(path)})
    assert not cells, f"{path.name}: lines over {MAX} characters in cells {cells}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_one_convention_for_lesson_names(path):
    names, params = lesson_names(json.loads(path.read_text()))
    odd = sorted(n for n in names if n != "_" and (n.startswith("_") or n.endswith("_")))
    assert not odd, f"{path.name}: lessons use plain names (as nbdev's notebooks), not {odd}"
    assert not names & params, f"{path.name}: a lesson rebinds the papermill parameter(s) {sorted(names & params)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_long_rows_of_positional_arguments(path):
    "In every code cell (so in the package, which is exported from them): a long call names its arguments."
    calls = []
    for i, c in enumerate(json.loads(path.read_text())["cells"]):
        if c["cell_type"] != "code": continue
        tree = ast.parse(_code("".join(c["source"])))
        calls += [f"cell {i}: {ast.unparse(n.func)}({len(n.args)} positional)" for n in ast.walk(tree)
                  if isinstance(n, ast.Call) and len(n.args) > MAX_POSITIONAL]
    assert not calls, f"{path.name}: name the arguments of {calls}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_parameters_documented_on_their_line(path):
    "papermill's --help-notebook reads a parameter's inline comment only: no comment-only continuation lines."
    for c in json.loads(path.read_text())["cells"]:
        if "parameters" in c.get("metadata", {}).get("tags", []):
            lone = [l.strip() for l in "".join(c["source"]).splitlines() if l.lstrip().startswith("#")]
            assert not lone, f"{path.name}: parameter comments continued on their own line: {lone}"
