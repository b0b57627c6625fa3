"""Run every `#| hf` cell of the chapters as written, with the full-size twins standing in for the hub's weights.

    python tools/check_hf_cells.py                          # every notebook with `#| hf` cells
    python tools/check_hf_cells.py --only 01a 01_           # some of them
    python tools/check_hf_cells.py --only 04 --replace 04 n_iters=60 n_iters=1   # a CPU-sized stage 2

`#| hf` cells load Stable Diffusion v1-4 and CLIP ViT-B/32 from the hub, so `nbdev_test` skips them and
nothing else would notice when one of them breaks. This runs each such notebook the way `nbdev_test --flags
"hf cuda"` would (from its first cell, skipping the cells of the other flags, in `nbs/`), up to its last
`#| hf` cell, with one change: right before each `#| hf` cell, `load_models` is wrapped so that the paper's
ids (`MODEL_CFG.sd_id`, `MODEL_CFG.clip_id`) load the full-size twins of `write_full_size_twins` (the same
configurations and on-disk formats, seeded random weights), and `device="cuda"` means the CPU where there is
no GPU. The cell's text is not changed, except by an explicit `--replace`, which the record lists.

Random weights cannot meet every numeric check of these cells (a VAE round trip that resembles its input
needs the real VAE): a cell that stops at an `AssertionError` is reported as "ran to its numeric check",
with the check's message; any other exception is a failure (exit status 1). The cells run in this process, with
glibc's mmap threshold at 64 KiB as in `bench/stage2.py` (stage 2 at full size outgrows 24 GB on the CPU without it). The record (seconds, status,
message per cell, the machine) goes to `bench/results/hf_cells_<device>.json` unless `--out` says otherwise;
the cells of notebooks not run this time keep their earlier records.
"""
import argparse
import json
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORCED = ("hf", "cuda")  # the flags whose cells run here

WRAP = '''\
import minddiffuser.models as _hf_models, torch as _hf_torch
_hf_load = globals().get("load_models", _hf_models.load_models)
_hf_twins = {{_hf_models.MODEL_CFG.sd_id: {sd!r}, _hf_models.MODEL_CFG.clip_id: {clip!r}}}
def load_models(models="tiny", clip_model="tiny", device=None, **kw):
    "The notebook's `load_models`, with the full-size twins for the paper's hub ids (tools/check_hf_cells.py)."
    if str(device).startswith("cuda") and not _hf_torch.cuda.is_available(): device = "cpu"
    return _hf_load(_hf_twins.get(str(models), models), _hf_twins.get(str(clip_model), clip_model), device=device, **kw)
'''
UNWRAP = 'load_models = _hf_load\n'


def flags_of(cell) -> set:
    return set((getattr(cell, "directives_", None) or {}).keys())


def hf_notebooks(only=None) -> list:
    "Notebooks of `nbs/` with at least one `#| hf` cell, in name order."
    out = []
    for p in sorted((ROOT / "nbs").glob("*.ipynb")):
        if p.name.startswith("_") or (only and not any(p.name.startswith(o) for o in only)): continue
        if '"#| hf' in p.read_text(): out.append(p)
    return out


def _cell_line(exc, src:str) -> str:
    "The line of the cell where `exc` was raised (the last frame whose code is not in a file), or ''."
    tb, line = getattr(exc, "__traceback__", None), ""
    while tb is not None:
        if not os.path.exists(tb.tb_frame.f_code.co_filename) and 0 < tb.tb_lineno <= len(src.splitlines()):
            line = src.splitlines()[tb.tb_lineno - 1].strip()
        tb = tb.tb_next
    return line


def check_notebook(fn:Path, sd:str, clip:str, skip:set, replace:list) -> list:
    "Run `fn` up to its last `#| hf` cell; one record per `#| hf` cell."
    from execnb.shell import CaptureShell
    from fastcore.xtras import working_directory
    from nbdev.process import NBProcessor
    from nbdev.frontmatter import FrontmatterProc
    nb = NBProcessor(fn, procs=FrontmatterProc, process=True).nb
    hf = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "hf" in flags_of(c)]
    shell, records = CaptureShell(fn), []
    with working_directory(fn.parent):
        for i, cell in enumerate(nb.cells[:hf[-1] + 1]):
            if cell.cell_type != "code" or "nbdev_export(" in cell.source: continue
            f = flags_of(cell)
            if (f & skip) - set(FORCED): continue
            if i not in hf:
                shell.run(cell.source)
                if shell.exc: raise RuntimeError(f"{fn.name} cell {i} (before the hf cells) failed") from shell.exc
                continue
            src, changed = cell.source, []
            for nb_prefix, old, new in replace:
                if fn.name.startswith(nb_prefix) and old in src: src, changed = src.replace(old, new), changed + [f"{old} -> {new}"]
            shell.run(WRAP.format(sd=sd, clip=clip))
            if shell.exc: raise RuntimeError("could not wrap load_models") from shell.exc
            t0 = time.time()
            outs = shell.run(src)
            exc, secs = shell.exc, round(time.time() - t0, 1)
            printed = "".join("".join(o.get("text", "")) for o in outs if o.get("output_type") == "stream" and o.get("name") == "stdout")
            shell.run(UNWRAP)
            status = "passed" if exc is None else ("ran to its numeric check" if isinstance(exc, AssertionError) else "failed")
            where = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:]) if exc is not None else ""
            where, printed = (re.sub(r"\x1b\[[0-9;]*m", "", t) for t in (where, printed))  # IPython's colours
            line = _cell_line(exc, src)
            records.append(dict(notebook=fn.name, cell=i, flags=sorted(flags_of(cell)), seconds=secs, status=status,
                                replaced=changed, printed=printed.strip()[-2000:], exception=where.strip()[-2000:], line=line))
            print(f"{fn.name}[{i}] {status} in {secs:.0f} s" + (f" ({', '.join(changed)})" if changed else ""), flush=True)
            if status == "failed": print(where, file=sys.stderr)
    return records


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="notebook name prefixes")
    ap.add_argument("--twins", help="folder of write_full_size_twins (default: runs/full_size_twins, written if absent)")
    ap.add_argument("--replace", nargs=3, action="append", default=[], metavar=("NOTEBOOK", "OLD", "NEW"),
                    help="change OLD to NEW in the hf cells of notebooks starting with NOTEBOOK (listed in the record)")
    ap.add_argument("--out", help="the record's JSON file (default: bench/results/hf_cells_<device>.json)")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TQDM_DISABLE", "1")
    if platform.system() == "Linux":  # glibc: return freed activation buffers (see bench/stage2.py); the cells run in this process
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD = 64 KiB
    import configparser
    import torch
    from minddiffuser.artifacts import save_json
    from minddiffuser.models import write_full_size_twins
    cfg = configparser.ConfigParser(); cfg.read(ROOT / "settings.ini")
    skip = set(cfg["DEFAULT"].get("tst_flags", "").split())
    sd, clip = write_full_size_twins(a.twins)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    records = []
    for fn in hf_notebooks(a.only): records += check_notebook(fn, str(sd), str(clip), skip, a.replace)
    out = Path(a.out or ROOT / "bench" / "results" / f"hf_cells_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    ran = {r["notebook"] for r in records}
    kept = [r for r in json.loads(out.read_text())["cells"] if r["notebook"] not in ran] if out.exists() else []
    rec = dict(device=device, cpu_threads=torch.get_num_threads(), machine=platform.machine(), torch=torch.__version__,
               twins=dict(models=Path(sd).name, clip_model=Path(clip).name),
               cells=sorted(kept + records, key=lambda r: (r["notebook"], r["cell"])))
    save_json(out, rec)
    print(f"record: {out}")
    return 1 if any(r["status"] == "failed" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
