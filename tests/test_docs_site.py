"""The docs as people read them: nbdev's docs processing on every notebook, the offline site it builds, and that
site in a real browser (every page, figure, formula and link between chapters; screenshots in tests/output/)."""
import ast
import functools
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlparse

import pytest

from browser import ROOT, browser_context, needs_chromium, screenshot_path

NBS = ROOT/"nbs"
CHAPTERS = sorted(p for p in NBS.glob("*.ipynb") if not p.name.startswith("_"))


def _imports(tree) -> bool:
    return any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree))


@pytest.mark.parametrize("nb", CHAPTERS, ids=lambda p: p.stem)
def test_imports_in_import_only_cells(nb):
    "nbdev's docs processing runs every cell holding an import, whatever its flags: such a cell must hold nothing else."
    for i, c in enumerate(json.loads(nb.read_text())["cells"]):
        src = "".join(c["source"])
        if c["cell_type"] != "code" or re.search(r"^#\|\s*(export|exports|exporti|exec_doc|eval:\s*false)", src, re.M | re.I): continue
        tree = ast.parse("\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("%", "!"))))
        if _imports(tree):
            other = [type(s).__name__ for s in tree.body if not isinstance(s, (ast.Import, ast.ImportFrom))]
            assert not other, f"{nb.name} cell {i} mixes imports with {other}: move the imports into an import-only cell\n{src}"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    "The site as `tools/build_docs.py` builds it (nbdev's processing of every notebook, then nbconvert)."
    if os.environ.get("MINDDIFFUSER_TEST_SITE"): return Path(os.environ["MINDDIFFUSER_TEST_SITE"])  # a site built already
    out = tmp_path_factory.mktemp("site")/"_site"
    r = subprocess.run([sys.executable, str(ROOT/"tools"/"build_docs.py"), "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, f"docs build failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return out


def test_docs_processing_and_build(site):
    "Every notebook went through nbdev's docs processing and became a page named as Quarto names it."
    proc = sorted((ROOT/"_proc").glob("*.ipynb"))
    assert [p.name for p in proc] == [p.name for p in CHAPTERS]
    pages = {p.name for p in site.glob("*.html")}
    assert "index.html" in pages and len(pages) == len(CHAPTERS), pages
    for p in proc:
        fm = re.search(r"output-file: (\S+)", "".join(json.loads(p.read_text())["cells"][0]["source"]))
        assert fm and fm.group(1) in pages, (p.name, fm)
    assert (site/"mathjax"/"MathJax.js").exists()


@pytest.fixture(scope="module")
def served(site):
    "The site on a loopback port."
    handler = functools.partial(_Quiet, directory=str(site))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}/"
    srv.shutdown()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


def _figures(nb:Path) -> int:
    "Image outputs the notebook carries (what its page must show)."
    return sum(any(k.startswith("image/") for k in o.get("data", {}))
               for c in json.loads(nb.read_text())["cells"] for o in c.get("outputs", []))


_WAIT_MATH = "() => new Promise(r => (window.MathJax && MathJax.Hub) ? MathJax.Hub.Queue(() => r(true)) : r(false))"
_STATE = """() => ({
  imgs: Array.from(document.images).map(i => ({src: i.src.slice(0, 60), ok: i.complete && i.naturalWidth > 0})),
  math: document.querySelectorAll('.MathJax, .MathJax_Display, .MathJax_CHTML, .MathJax_SVG').length,
  mathErrors: document.querySelectorAll('.MathJax_Error, merror, .mjx-merror').length,
  raw: Array.from(document.querySelectorAll('.jp-MarkdownOutput p, .jp-MarkdownOutput li'))
         .map(e => e.innerText).filter(t => /\\$[^$\\s][^$]*\\\\[a-zA-Z]+[^$]*\\$/.test(t)),
  links: Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href')),
  ids: Array.from(document.querySelectorAll('[id]')).map(e => e.id),
  title: document.title, h1: (document.querySelector('h1') || {}).innerText || '',
  text: document.querySelector('main').innerText.length,
  pandoc: Array.from(document.querySelectorAll('.jp-MarkdownOutput')).map(e => {
            const c = e.cloneNode(true); c.querySelectorAll('code, pre, script, .MathJax, .MathJax_Display').forEach(x => x.remove());
            return c.textContent; }).filter(t => /\]\(|\{target=/.test(t)).map(t => t.slice(0, 200))
})"""


@needs_chromium
def test_site_in_browser(served):
    "Every page loads without console errors; its figures load, its maths renders, its links to other pages resolve."
    pages = {}
    with browser_context() as ctx:
        page = ctx.new_page()
        errors = []
        page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url} {r.failure}"))
        page.on("response", lambda r: errors.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
        resp = page.goto(served, wait_until="load")
        assert resp.status == 200
        order = page.evaluate("() => Array.from(document.querySelectorAll('nav.md-sidebar li a')).map(a => a.getAttribute('href'))")
        assert len(order) == len(CHAPTERS), order
        for href in order:
            errors.clear()
            resp = page.goto(urljoin(served, href), wait_until="load")
            assert resp.status == 200, href
            assert page.evaluate(_WAIT_MATH), f"{href}: MathJax did not load"
            st = page.evaluate(_STATE)
            assert not errors, f"{href}: {errors}"
            assert st["h1"].strip() and st["title"].strip(), href
            assert st["text"] > 500, f"{href}: a page with almost no text ({st['text']} characters)"
            assert not st["pandoc"], f"{href}: Markdown or Pandoc syntax shown as text: {st['pandoc'][:2]}"
            assert all(i["ok"] for i in st["imgs"]), f"{href}: images that did not load {[i for i in st['imgs'] if not i['ok']]}"
            assert st["mathErrors"] == 0 and not st["raw"], f"{href}: maths not rendered: {st['raw'][:3]}"
            pages[href] = st
            name = Path(href).stem
            page.screenshot(path=str(screenshot_path(f"site-{name}")))
            if st["imgs"]:
                page.locator("main img").first.scroll_into_view_if_needed()
                page.screenshot(path=str(screenshot_path(f"site-{name}-figure")))
            if st["math"]:
                page.locator(".MathJax_Display, .MathJax").first.scroll_into_view_if_needed()
                page.screenshot(path=str(screenshot_path(f"site-{name}-maths")))
    # what each page must show: the figures its notebook carries, maths where its markdown has any
    by_name = {re.search(r"output-file: (\S+)", "".join(json.loads(p.read_text())["cells"][0]["source"])).group(1): p
               for p in sorted((ROOT/"_proc").glob("*.ipynb"))}
    for href, st in pages.items():
        nb = NBS/by_name[href].name
        assert len(st["imgs"]) >= _figures(nb), f"{href}: {len(st['imgs'])} images, the notebook has {_figures(nb)} figures"
        md = " ".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "markdown")
        if re.search(r"\$[^$\s][^$]*\$", md): assert st["math"] > 0, f"{href}: maths in the notebook, none rendered"
    assert sum(st["math"] for st in pages.values()) > 10
    # links between chapters: the page exists and so does the anchor
    cross = 0
    for href, st in pages.items():
        for link in st["links"]:
            if urlparse(link).scheme or link.startswith(("mailto:", "//")): continue
            target, frag = urldefrag(link)
            if not target: target = href
            assert target in pages, f"{href} links to {link}, which is not a page of the site"
            if frag: assert frag in pages[target]["ids"], f"{href} links to {link}: no #{frag} there"
            if target != href: cross += 1
    assert cross > len(pages) * 2, f"only {cross} links between pages"
