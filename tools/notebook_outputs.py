"""Execute the chapter notebooks on their default parameters and keep their outputs, small and clean.

    python tools/notebook_outputs.py                    # every notebook in nbs/, in place
    python tools/notebook_outputs.py --only 00 02       # some of them
    python tools/notebook_outputs.py --dest /tmp/x      # write the executed copies elsewhere (CI's check)

The notebooks run in order (numbered chapters first, then the others), under papermill, in one shared
artifacts folder, so a chapter finds what the earlier ones wrote: by default the notebooks' own `out_dir`
("runs" under the checkout, as `minddiffuser run --subject 1` uses), or `--out-dir`, injected into the
notebooks that declare it. Whatever data and models the defaults resolve to (today the synthetic NSD tree
and tiny random-weight twins; a configured NSD and the trained models once they exist) are what the
outputs show. Cells tagged `skip-execution` (real weights, a GPU) are not run and keep no output.

What is kept: figures as PNGs at most `MAX_WIDTH` pixels wide, re-encoded; no progress bars (`TQDM_DISABLE=1`);
no widget state; no papermill or execution metadata; no execution counts (nbdev_clean's form, the metadata
keys of `settings.ini`); the checkout's path turned into a relative one. A notebook over `MAX_BYTES` is an error.
"""
import argparse
import base64
import configparser
import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_WIDTH = 900          # pixels: wider figures are scaled down
MAX_BYTES = 600_000      # one notebook with its outputs
DROP_MIME = ("application/vnd.jupyter.widget-view+json", "application/vnd.jupyter.widget-state+json")


def notebooks(nbs:Path, only=None) -> list:
    "The notebooks with code, numbered chapters first in the chain's order, then the others (`_scratch` ones never)."
    out = []
    for p in sorted(nbs.glob("*.ipynb"), key=lambda p: (not p.name[:1].isdigit(), p.name)):
        if p.name.startswith("_") or (only and not any(p.name.startswith(o) for o in only)): continue
        if any(c["cell_type"] == "code" for c in json.loads(p.read_text())["cells"]): out.append(p)
    return out


def _settings() -> dict:
    cp = configparser.ConfigParser(); cp.read(ROOT/"settings.ini")
    d = cp["DEFAULT"]
    return dict(allowed_metadata_keys=d.get("allowed_metadata_keys", "").split(),
                allowed_cell_metadata_keys=d.get("allowed_cell_metadata_keys", "").split())


def small_png(b64:str, max_width:int=MAX_WIDTH) -> str:
    "A PNG (base64) at most `max_width` pixels wide, in 256 colours if that is smaller (plots and small images lose nothing visible)."
    from PIL import Image
    raw = base64.b64decode(b64)
    im = Image.open(io.BytesIO(raw)); im.load()
    wide = im.width > max_width
    if wide: im = im.resize((max_width, round(im.height * max_width / im.width)), Image.LANCZOS)
    best = raw if not wide else None
    for cand in (im, im.convert("RGBA").quantize(256, method=Image.Quantize.FASTOCTREE)):
        buf = io.BytesIO(); cand.save(buf, "PNG", optimize=True)
        if best is None or buf.tell() < len(best): best = buf.getvalue()
    return base64.b64encode(best).decode() + "\n"


def _relative(text:str, subs:list) -> str:
    for a, b in subs: text = text.replace(a, b)
    return text


_PROGRESS = re.compile(r"\d+%\|.*\|.*\]|\d+/\d+ \[\d")


def _keep(o:dict) -> bool:
    "Not a progress bar: no widget view (tqdm.auto's bar) and no text of tqdm's form."
    data = o.get("data", {})
    if any(k in data for k in DROP_MIME): return False
    text = "".join(o.get("text", data.get("text/plain", "")))
    return not (o["output_type"] in ("stream", "display_data") and _PROGRESS.search(text))


def tidy(executed:dict, source:dict, subs:list) -> dict:
    "`source` with the outputs of `executed` (matched by cell id), small and in nbdev_clean's form; nothing else changes."
    from nbdev.clean import clean_nb
    outputs = {c["id"]: c.get("outputs", []) for c in executed["cells"] if c["cell_type"] == "code"}
    nb = json.loads(json.dumps(source))
    for c in nb["cells"]:
        if c["cell_type"] != "code": continue
        outs = []
        for o in outputs.get(c["id"], []):
            if not _keep(o): continue
            if o["output_type"] == "stream" and o.get("name") == "stderr":
                o["text"] = "".join(l for l in "".join(o["text"]).splitlines(keepends=True) if not _PROGRESS.search(l))
                if not o["text"].strip(): continue
            data = o.get("data", {})
            if "image/png" in data: data["image/png"] = small_png("".join(data["image/png"]))
            for k, v in data.items():
                if k.startswith("text/"): data[k] = _relative("".join(v) if isinstance(v, list) else v, subs)
            if "text" in o: o["text"] = _relative("".join(o["text"]) if isinstance(o["text"], list) else o["text"], subs)
            outs.append(o)
        c["outputs"] = outs
    s = _settings()
    metadata = nb["metadata"]
    clean_nb(nb, clear_all=False, allowed_metadata_keys=s["allowed_metadata_keys"],
             allowed_cell_metadata_keys=s["allowed_cell_metadata_keys"], clean_ids=True)
    nb["metadata"] = metadata
    for c in nb["cells"]:   # nbformat's lists of lines, as Jupyter and nbdev_clean write them
        for o in c.get("outputs", []):
            for k, v in o.get("data", {}).items():
                if isinstance(v, str) and not k.endswith("json"): o["data"][k] = v.splitlines(keepends=True)
            if isinstance(o.get("text"), str): o["text"] = o["text"].splitlines(keepends=True)
    return nb


def dumps(nb:dict) -> str:
    "The notebooks' on-disk form (indent 1, UTF-8 as is)."
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def kernel_env(out_dir=None) -> None:
    "The environment the kernels inherit: this checkout's package, offline hubs, no progress bars, inline figures."
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    os.environ.update(TQDM_DISABLE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    os.environ.pop("MPLBACKEND", None)     # Agg would hide every figure: the kernel's inline backend must draw them


def execute(nb:Path, dest:Path, out_dir=None, timeout:int=3600) -> dict:
    "Run one notebook under papermill (cwd: its folder) and write its tidied copy to `dest`; return a short record."
    import papermill as pm
    declared = pm.inspect_notebook(str(nb))
    params = {"out_dir": str(out_dir)} if out_dir is not None and "out_dir" in declared else {}
    subs = [(str(Path(out_dir).resolve()), "runs")] if out_dir is not None else []
    subs += [(str(ROOT) + os.sep, ""), (str(ROOT), ".")]
    t0 = time.time()
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)/nb.name
        pm.execute_notebook(str(nb), str(tmp), parameters=params, cwd=str(nb.parent), progress_bar=False,
                            log_output=False, execution_timeout=timeout, kernel_name="python3")
        out = tidy(json.loads(tmp.read_text()), json.loads(nb.read_text()), subs)
    text = dumps(out)
    size = len(text.encode())
    dest.parent.mkdir(parents=True, exist_ok=True); dest.write_text(text)
    n_img = sum("image/png" in o.get("data", {}) for c in out["cells"] for o in c.get("outputs", []))
    return dict(notebook=nb.name, seconds=round(time.time() - t0, 1), kB=round(size/1e3), figures=n_img)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nbs", default=str(ROOT/"nbs"), help="notebooks folder")
    ap.add_argument("--only", nargs="*", default=None, help="notebook name prefixes, e.g. 00 02")
    ap.add_argument("--dest", default=None, help="write the executed notebooks here (default: in place)")
    ap.add_argument("--out-dir", default=None, help="shared artifacts folder (default: the notebooks' own, runs/)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    a = ap.parse_args(argv)
    kernel_env(a.out_dir)
    nbs = notebooks(Path(a.nbs), a.only)
    if not nbs: ap.error(f"no notebooks matched {a.only} in {a.nbs}")
    if a.out_dir is not None: Path(a.out_dir).mkdir(parents=True, exist_ok=True)
    big = []
    for nb in nbs:
        dest = Path(a.dest)/nb.name if a.dest else nb
        print(f"[outputs] {nb.name} ...", flush=True)
        r = execute(nb, dest, a.out_dir, a.timeout)
        print(f"[outputs] {r['notebook']}: {r['figures']} figures, {r['kB']} kB, {r['seconds']} s -> {dest}", flush=True)
        if r["kB"] * 1e3 > MAX_BYTES: big.append(r["notebook"])
    if big: print(f"[outputs] over {MAX_BYTES/1e3:.0f} kB with outputs: {big}: make their figures smaller or show less", file=sys.stderr)
    return 1 if big else 0


if __name__ == "__main__":
    sys.exit(main())
