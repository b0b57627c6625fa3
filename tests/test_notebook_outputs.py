"""Notebook outputs (made by `python tools/notebook_outputs.py`) stay small and clean, every figure cell carries its
figure, and executing the notebooks again succeeds and draws the same figures."""
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



@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_figure_cell_carries_its_figure(path):
    nb = json.loads(path.read_text())
    missing = set(figure_cells(nb)) - set(image_cells(nb))
    assert not missing, f"{path.name}: figure cells without a figure {sorted(missing)}: {_FIX}"


def _has_code(path) -> bool:
    return any(c["cell_type"] == "code" for c in json.loads(path.read_text())["cells"])


def test_executing_reproduces_figures(demo_chain, tmp_path):
    """Executing every notebook on its defaults succeeds and draws a figure in the same cells as the committed outputs.
    The chain's chapters are the demo chain's own executions (papermill, the defaults, figures drawn as the outputs
    command draws them: see conftest); the other notebooks run here through the outputs command."""
    subj, rec = demo_chain
    assert rec["status"] == "ok", rec
    executed = {n["notebook"]: Path(n["output"]) for n in rec["notebooks"]}
    others = [p for p in NOTEBOOKS if p.name not in executed and _has_code(p)]
    if others:
        dest = tmp_path/"nbs"
        r = subprocess.run([sys.executable, str(ROOT/"tools"/"notebook_outputs.py"), "--dest", str(dest),
                            "--out-dir", str(tmp_path/"runs"), "--only", *[p.stem for p in others]],
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
        executed |= {p.name: dest/p.name for p in others}
    assert {p.name for p in NOTEBOOKS if _has_code(p)} <= set(executed)
    for name, fresh_path in sorted(executed.items()):
        fresh, committed = json.loads(fresh_path.read_text()), json.loads((ROOT/"nbs"/name).read_text())
        assert image_cells(fresh) == image_cells(committed), f"{name}: the figures drawn differ from the committed ones: {_FIX}"
