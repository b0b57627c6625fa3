"""The notebooks as people run them: JupyterLab on nbs/, 00_nsd_data opened in Debian's Chromium, its first cells
run in a real kernel until its first figure appears (screenshot in tests/output/screenshots/)."""
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from browser import ROOT, browser_context, free_port, needs_chromium, screenshot_path

NB = ROOT/"nbs"/"00_nsd_data.ipynb"
_FIGURE = re.compile(r"^(?!#\|\s*export).*\bplt\.(subplots|figure|imshow)\(", re.S)


def first_figure_cell(nb:Path) -> int:
    "Index of the first code cell that draws a matplotlib figure."
    for i, c in enumerate(json.loads(nb.read_text())["cells"]):
        if c["cell_type"] == "code" and _FIGURE.search("".join(c["source"])): return i
    raise AssertionError(f"{nb.name} draws no figure")


@pytest.fixture
def lab():
    "JupyterLab on nbs/, on a loopback port with a token, its settings in a temporary folder (autosave off)."
    pytest.importorskip("jupyterlab")
    token, port = os.urandom(12).hex(), free_port()
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        settings = td/"settings"/"@jupyterlab"/"docmanager-extension"
        settings.mkdir(parents=True)
        (settings/"plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
        nbset = td/"settings"/"@jupyterlab"/"notebook-extension"; nbset.mkdir(parents=True)
        (nbset/"tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))   # every cell in the page
        env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}   # Agg would hide the figure
        env.update(PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]),
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1",
                   JUPYTER_CONFIG_DIR=str(td/"config"), JUPYTER_RUNTIME_DIR=str(td/"runtime"))
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT/'nbs'}",
               f"--LabApp.user_settings_dir={td/'settings'}", f"--LabApp.workspaces_dir={td/'workspaces'}",
               "--allow-root", "--LabApp.news_url=None", "--LabApp.extension_manager=readonly",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        log = open(td/"lab.log", "w")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT/"nbs")
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(240):
                try:
                    urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2); break
                except OSError:
                    assert proc.poll() is None, (td/"lab.log").read_text()[-3000:]
                    time.sleep(0.5)
            else: raise AssertionError("JupyterLab did not start:\n" + (td/"lab.log").read_text()[-3000:])
            yield url, token
        finally:
            proc.terminate()
            try: proc.wait(20)
            except subprocess.TimeoutExpired: proc.kill(); proc.wait()
            log.close()


@needs_chromium
def test_lab_runs_first_cells_and_shows_figure(lab):
    url, token = lab
    before = NB.read_bytes()
    k = first_figure_cell(NB)
    with browser_context(viewport=(1400, 1000)) as ctx:
        page = ctx.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{url}/lab/tree/{NB.name}?token={token}", wait_until="domcontentloaded")
        cells = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell")
        cells.first.wait_for(timeout=120_000)
        page.locator(".jp-NotebookPanel-toolbar").get_by_text("Python 3", exact=False).first.wait_for(timeout=120_000)
        page.wait_for_function("() => document.querySelector('.jp-NotebookPanel-toolbar [data-status=\"idle\"], "
                               ".jp-Notebook-ExecutionIndicator[data-status=\"idle\"]') !== null", timeout=180_000)
        # clear what the notebook carries, so the figure seen is the kernel's
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Edit$")).click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Clear Outputs of All Cells$")).click()
        assert page.locator(".jp-Notebook .jp-OutputArea-output img").count() == 0
        cells.first.click()
        page.keyboard.press("Escape")
        for _ in range(k + 1): page.keyboard.press("Shift+Enter")
        img = cells.nth(k).locator(".jp-OutputArea-output img")
        img.first.wait_for(state="visible", timeout=300_000)
        ok = img.first.evaluate("i => i.complete && i.naturalWidth > 100 && i.naturalHeight > 50")
        img.first.scroll_into_view_if_needed()
        page.screenshot(path=str(screenshot_path("jupyterlab-00_nsd_data")))
        assert ok, "the figure did not load"
        tracebacks = page.locator(".jp-Notebook .jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
        err = [t for t in tracebacks.all_inner_texts() if "Traceback" in t or "Error" in t]
        assert not err, err
        # the cells before the figure ran in order in this kernel
        prompts = [p.strip() for p in cells.locator(".jp-InputArea-prompt").all_inner_texts()[:k + 1]]
        ran = [p for p in prompts if re.fullmatch(r"\[\d+\]:", p)]
        assert ran and ran == sorted(ran, key=lambda p: int(p[1:-2])), prompts
        assert not errors, errors
    assert NB.read_bytes() == before, "the browser session changed the notebook on disk"
