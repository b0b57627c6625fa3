"""The papermill chain runner: order, pick-up of new notebooks, records, failure reports, and the full demo chain."""
import json
import shutil
import subprocess
import sys

import nbformat
import pytest

from conftest import NBS
from minddiffuser.chain import ChainError, chain_notebooks, main, run_chain


def _nb(path, params_src, body_src):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "python3", "language": "python", "name": "python3"}
    p = nbformat.v4.new_code_cell(params_src); p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell(body_src)]
    nbformat.write(nb, path)


def test_new_notebooks_join_without_edits(synth_root, tmp_path):
    nbs = tmp_path/"nbs"; nbs.mkdir()
    shutil.copy(NBS/"00_nsd_data.ipynb", nbs)
    _nb(nbs/"02a_extra.ipynb", "subject = 1\nout_dir = 'runs'", "from pathlib import Path\n"
        "p = Path(out_dir)/f'subj{subject:02d}'/'extra.txt'; p.write_text(str(subject))")
    _nb(nbs/"01_notparams.ipynb", "", "raise SystemExit")        # no parameters tag: not a step
    (nbs/"01_notparams.ipynb").write_text((nbs/"01_notparams.ipynb").read_text().replace('"parameters"', '"other"'))
    assert [p.name for p in chain_notebooks(nbs)] == ["00_nsd_data.ipynb", "02a_extra.ipynb"]
    rec = run_chain(1, data_root=synth_root, out_dir=tmp_path/"runs", nbs=nbs, progress=False)
    assert [n["status"] for n in rec["notebooks"]] == ["ok", "ok"]
    assert (tmp_path/"runs/subj01/extra.txt").read_text() == "1"
    saved = json.loads((tmp_path/"runs/subj01/chain.json").read_text())
    assert saved["status"] == "ok" and "git_revision" in saved and all("seconds" in n for n in saved["notebooks"])
    assert saved["notebooks"][1]["parameters"] == {"subject": 1, "out_dir": str(tmp_path/"runs")}  # only declared ones


def test_failure_names_notebook_and_cell(synth_root, tmp_path):
    nbs = tmp_path/"nbs"; nbs.mkdir()
    _nb(nbs/"00_ok.ipynb", "subject = 1", "x = 1")
    _nb(nbs/"01_bad.ipynb", "subject = 1", "y = 2\nraise ValueError('planted failure')")
    _nb(nbs/"02_never.ipynb", "subject = 1", "open('never', 'w')")
    with pytest.raises(ChainError, match=r"01_bad.ipynb failed at cell \[3\] \('y = 2'\): ValueError: planted failure"):
        run_chain(1, data_root=synth_root, out_dir=tmp_path/"runs", nbs=nbs, progress=False)
    rec = json.loads((tmp_path/"runs/subj01/chain.json").read_text())
    assert [n["status"] for n in rec["notebooks"]] == ["ok", "failed"] and rec["status"] == "failed"
    assert main(["run", "--subject", "1", "--data-root", str(synth_root), "--out-dir", str(tmp_path/"r2"), "--nbs", str(nbs)]) == 1


def test_cli_entry_point(tmp_path):
    out = subprocess.run(["minddiffuser", "run", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--subject" in out.stdout
    out = subprocess.run(["minddiffuser", "download", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--data-root" in out.stdout


def test_demo_chain_runs_end_to_end(demo_chain):
    "The whole chain on the synthetic NSD with the trained world, at the demo's own sizes (the claims: test_world)."
    subj, rec = demo_chain
    assert rec["status"] == "ok"
    assert [n["notebook"][:2] for n in rec["notebooks"]] == sorted(n["notebook"][:2] for n in rec["notebooks"])
    assert {"00", "01", "02", "03", "04", "05", "06"} <= {n["notebook"][:2] for n in rec["notebooks"]}
