"""Build the docs site without Quarto: nbdev's processed notebooks rendered by nbconvert, maths by a local MathJax.

    python tools/build_docs.py                 # -> _site/ (open _site/index.html, or serve it)
    python tools/build_docs.py --out /tmp/site

Where Quarto is installed, `nbdev_docs` builds the site nbdev means (`nbs/_quarto.yml`, into `_docs/`). Here
Quarto cannot be installed, so this runs the same first step (`nbdev.serve.proc_nbs`: show_doc, doc links,
hidden cells removed, front matter from the title) into `_proc/`, then renders each processed notebook with
nbconvert's JupyterLab template: one page per notebook under the name Quarto would give it (`output-file`),
a sidebar of chapters, doc links between chapters made relative, and MathJax 2 from the `jupyter-server-mathjax`
package copied into the site, so that nothing is fetched from the internet when the site is read.
"""
import argparse
import configparser
import html
import os
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THEME = Path(__file__).resolve().parent/"docs_theme"
MATHJAX_URL = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe"
_DIRECTIVE = re.compile(r"^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$")


def _config() -> dict:
    cp = configparser.ConfigParser(); cp.read(ROOT/"settings.ini")
    return dict(cp["DEFAULT"])


def process(n_workers:int|None=None) -> Path:
    "nbdev's docs processing of every notebook (what `nbdev_docs` runs before Quarto), into `_proc/`; its path."
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    sys.path.insert(0, str(ROOT))
    cwd = os.getcwd(); os.chdir(ROOT)
    try:
        from fastcore.parallel import defaults
        from nbdev.serve import proc_nbs
        proc_nbs(path=str(ROOT/"nbs"), n_workers=defaults.cpus if n_workers is None else n_workers, force=True)
    finally: os.chdir(cwd)
    return ROOT/"_proc"


def frontmatter(nb) -> dict:
    "The YAML front matter nbdev's processing puts in the first raw cell (title, description, output-file)."
    import yaml
    for c in nb.cells:
        if c.cell_type == "raw" and c.source.lstrip().startswith("---"):
            return yaml.safe_load(c.source.strip().strip("-")) or {}
    return {}


def _directives(src:str):
    "Quarto cell options (`#| echo: false`) and the source without them."
    d, rest = {}, []
    for line in src.splitlines():
        m = _DIRECTIVE.match(line)
        if m and not rest: d[m.group(1)] = m.group(2).lower()
        else: rest.append(line)
    return d, "\n".join(rest)


def pages(proc:Path) -> list:
    "(notebook path, front matter) in the sidebar's order: the index, numbered chapters, then the rest."
    import nbformat
    out = []
    for p in sorted(proc.glob("*.ipynb"), key=lambda p: (p.stem != "index", not p.name[:1].isdigit(), p.name)):
        fm = frontmatter(nbformat.read(p, as_version=4))
        fm.setdefault("output-file", p.stem + ".html"); fm.setdefault("title", p.stem)
        out.append((p, fm))
    return out


_PANDOC_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)\{([^{}]*)\}")


def html_links(text:str) -> str:
    "Pandoc's link attributes (`[source](url){target=\"_blank\"}`, in show_doc's output), which Quarto reads, as HTML."
    return _PANDOC_LINK.sub(lambda m: f'<a href="{m.group(2)}" {m.group(3)}>{m.group(1)}</a>', text)


def relink(text:str, doc_url:str, names:dict) -> str:
    "Doc links to the published site made relative, and links to notebooks pointed at their pages."
    text = text.replace(doc_url, "")
    return re.sub(r"(\]\(|href=\")([\w.-]+)\.ipynb(#[^)\"]*)?", lambda m: m.group(1) + names.get(m.group(2), m.group(2) + ".html") + (m.group(3) or ""), text)


def prepare(nb, fm:dict, doc_url:str, names:dict):
    "The processed notebook as the page shows it: title block, Quarto options applied, links made local."
    import nbformat
    cells = []
    for c in nb.cells:
        if c.cell_type == "raw":
            if c.source.lstrip().startswith("---"):
                head = f"# {fm['title']}" + (f"\n\n> {fm['description']}" if fm.get("description") else "")
                cells.append(nbformat.v4.new_markdown_cell(relink(head, doc_url, names)))
            continue
        if c.cell_type == "markdown":
            c.source = relink(c.source, doc_url, names); cells.append(c); continue
        d, c.source = _directives(c.source)
        if d.get("include") == "false": continue
        if d.get("output") == "false": c.outputs = []
        tags = set(c.metadata.get("tags", []))
        if d.get("echo") == "false" or not c.source.strip(): tags.add("remove_input")
        c.metadata["tags"] = sorted(tags)
        for o in c.get("outputs", []):
            for k, v in o.get("data", {}).items():
                if k in ("text/markdown", "text/html"): o["data"][k] = html_links(relink(v, doc_url, names))
        if c.source.strip() or c.get("outputs"): cells.append(c)
    nb.cells = cells
    nb.metadata.pop("widgets", None)       # widget state would load a widget manager from a CDN
    return nb


def nav(entries:list, current:str) -> str:
    "The sidebar: site title and one link per page."
    active = lambda fm: ' class="active"' if fm["output-file"] == current else ""
    items = "\n".join(f'<li><a href="{fm["output-file"]}"{active(fm)}>{html.escape(str(fm["title"]))}</a></li>'
                      for _, fm in entries)
    return f'<nav class="md-sidebar" aria-label="chapters"><a class="md-home" href="index.html">minddiffuser</a><ol>{items}</ol></nav>'


def lower_anchors(page:str) -> str:
    "Quarto's anchors are lower-case (`ridge.html#ridgeconfig`): add them beside nbconvert's heading ids."
    ids = set(re.findall(r'id="([^"]+)"', page))
    def add(m):
        i = m.group(2)
        return (f'<a id="{i.lower()}" class="md-anchor"></a>' if i.lower() != i and i.lower() not in ids else "") + m.group(0)
    return re.sub(r'<h([1-6]) id="([^"]+)"', add, page)


def build(out:Path, proc:Path|None=None) -> list:
    "Render the site into `out`; return the pages written."
    import nbformat
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import TagRemovePreprocessor
    import jupyter_server_mathjax
    proc = proc or process()
    cfg = _config()
    doc_url = cfg["doc_host"].rstrip("/") + "/" + cfg.get("doc_baseurl", "").strip("/") + "/"
    entries = pages(proc)
    names = {p.stem: fm["output-file"] for p, fm in entries}
    if out.exists(): shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copytree(Path(jupyter_server_mathjax.__file__).parent/"static", out/"mathjax")
    shutil.copy(THEME/"site.css", out/"site.css")
    ex = HTMLExporter(template_name="lab", extra_template_paths=[str(THEME)], template_file="page.html.j2",
                      mathjax_url=MATHJAX_URL, anchor_link_text="¶",
                      exclude_input_prompt=True, exclude_output_prompt=True)
    ex.register_preprocessor(TagRemovePreprocessor(remove_input_tags=("remove_input",), enabled=True), enabled=True)
    written = []
    for p, fm in entries:
        nb = prepare(nbformat.read(p, as_version=4), fm, doc_url, names)
        body, _ = ex.from_notebook_node(nb, resources={"metadata": {"name": str(fm["title"])},
                                                       "md_nav": nav(entries, fm["output-file"])})
        dest = out/fm["output-file"]
        dest.write_text(lower_anchors(body), encoding="utf-8")
        written.append(dest)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT/"_site"), help="site folder (replaced)")
    ap.add_argument("--n-workers", type=int, default=None, help="processes for nbdev's docs processing")
    a = ap.parse_args(argv)
    written = build(Path(a.out), process(a.n_workers))
    for w in written: print(w)
    print(f"{len(written)} pages in {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
