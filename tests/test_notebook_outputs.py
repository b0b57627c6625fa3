"""Notebook outputs (made by `python tools/notebook_outputs.py`) stay small and clean, and which cells draw figures is
known from their source. (The notebooks are not yet committed with outputs: the checks that every figure cell
carries its figure and that executing them reproduces the figures come with the outputs.)"""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT/"nbs").glob("*.ipynb") if not p.name.startswith("_"))
MAX_BYTES = 600_000          # tools/notebook_outputs.py's limit: well under 1 MB
_PLT = {"subplots", "figure", "imshow", "plot", "show", "hist", "bar", "scatter", "matshow", "subplot"}
_FIX = "run `python tools/notebook_outputs.py` and commit the notebooks"


def _top_level_calls(nodes):
    "Calls made when the cell runs (not inside the functions and classes it defines)."
    for n in nodes:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)): continue
        if isinstance(n, ast.Call): yield n
        yield from _top_level_calls(list(ast.iter_child_nodes(n)))


def draws_figure(src:str) -> bool:
    "Whether a cell draws a figure when it runs: a `plt.subplots`-like call, or a `show_*`/`plot_*` helper."
    try: tree = ast.parse("\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("%", "!"))))
    except SyntaxError: return False
    for c in _top_level_calls(tree.body):
        f = c.func
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "plt" and f.attr in _PLT: return True
        if isinstance(f, ast.Name) and re.match(r"(show|plot)_", f.id): return True
    return False


def figure_cells(nb:dict) -> list:
    "Ids of the cells that draw a figure and are run by the outputs command (not tagged `skip-execution`)."
    return [c["id"] for c in nb["cells"] if c["cell_type"] == "code" and draws_figure("".join(c["source"]))
            and not re.search(r"^#\|\s*export", "".join(c["source"]), re.M)
            and "skip-execution" not in c.get("metadata", {}).get("tags", [])]


def image_cells(nb:dict) -> list:
    return [c["id"] for c in nb["cells"] if c["cell_type"] == "code"
            and any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]


def test_draws_figure():
    assert draws_figure("fig, axs = plt.subplots(1, 4)\nax.imshow(x)")
    assert draws_figure("show_run(folders, stim);") and draws_figure("_ax = plot_accuracy(_out)")
    assert not draws_figure("def show(x):\n    plt.imshow(x)")        # defines, does not draw
    assert not draws_figure("import matplotlib.pyplot as plt") and not draws_figure("x = show")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_outputs_small_and_clean(path):
    text = path.read_text(); nb = json.loads(text)
    assert len(text.encode()) < MAX_BYTES, f"{path.name} is {len(text.encode())/1e3:.0f} kB"
    assert set(nb["metadata"]) <= {"kernelspec", "jupytext"}, nb["metadata"].keys()
    for c in nb["cells"]:
        assert set(c.get("metadata", {})) <= {"tags"}, (path.name, c["id"], c["metadata"])
        assert "injected-parameters" not in c.get("metadata", {}).get("tags", [])
        if c["cell_type"] != "code": continue
        assert c["execution_count"] is None, (path.name, c["id"])
        for o in c["outputs"]:
            assert o["output_type"] != "error", (path.name, c["id"], o.get("ename"), o.get("evalue"))
            assert o.get("execution_count") is None
            out = "".join(o.get("text", "")) + "".join("".join(v) for k, v in o.get("data", {}).items() if k.startswith("text/"))
            assert not re.search(r"\d+%\|", out), f"{path.name} {c['id']}: a progress bar in the outputs"
            assert str(ROOT) not in out, f"{path.name} {c['id']}: the checkout's absolute path in the outputs"

