"""HTML building blocks of the reports (`report_lib`): the page with its table of contents and
CSS, tables, inline images and figures, provenance (command, commit, date).

Nothing here is fetched when a page opens: no scripts, no links, no web fonts.
"""

from __future__ import annotations

import datetime
import html
import os
import shlex
import subprocess
import sys
from typing import Any, Mapping, Sequence

import numpy as np
from etils import epath

from fape_jax import report_figures as figs

_CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #dfe3e8; --accent: #1f4e79; --soft: #f5f7fa; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       color: var(--fg); margin: 0; background: #fff; }
header.top { background: var(--accent); color: #fff; padding: 1em 2em; }
header.top h1 { margin: 0; font-size: 1.5em; font-weight: 600; }
header.top p { margin: .25em 0 0; opacity: .85; font-size: .9em; }
.layout { display: flex; align-items: flex-start; }
nav.toc { position: sticky; top: 0; width: 230px; flex: none; max-height: 100vh;
          overflow-y: auto; padding: 1em .8em; background: var(--soft);
          border-right: 1px solid var(--line); font-size: .82em; }
nav.toc b { display: block; margin-bottom: .4em; color: var(--muted); }
nav.toc ul { list-style: none; margin: 0; padding-left: .9em; }
nav.toc > ul { padding-left: 0; }
nav.toc a { color: var(--fg); text-decoration: none; overflow-wrap: anywhere; }
nav.toc a:hover { color: var(--accent); }
main { flex: 1; min-width: 0; max-width: 1080px; padding: 0 2em 3em; }
@media (max-width: 900px) { .layout { display: block; }
  nav.toc { position: static; width: auto; max-height: none; border: 0; } }
h2 { margin-top: 1.8em; border-bottom: 2px solid var(--line); padding-bottom: .2em;
     color: var(--accent); }
h3 { margin-top: 1.6em; }
h2 small, h3 small { color: var(--muted); font-weight: normal; font-size: .7em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .88em; }
th, td { border: 1px solid var(--line); padding: .3em .65em; text-align: right; }
th { background: var(--soft); font-weight: 600; } td.l, th.l { text-align: left; }
tr:nth-child(even) td { background: #fbfcfd; } tr.best td { font-weight: bold; }
figure { margin: .8em 0; } figure img { max-width: 100%; }
figcaption, .caption { font-size: .82em; color: var(--muted); max-width: 900px; }
code, .plan { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .85em; }
.plan { background: var(--soft); padding: .3em .5em; display: block; white-space: pre-wrap;
        border-left: 3px solid var(--accent); }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: .15em 1.2em;
          font-size: .85em; background: var(--soft); padding: .7em 1em; border-radius: 6px; }
dl.meta dt { color: var(--muted); } dl.meta dd { margin: 0; overflow-wrap: anywhere; }
.cmp { display: grid; gap: 4px 8px; align-items: start; margin: .6em 0 1.4em; }
.cmp .head { font-weight: 600; font-size: .82em; color: var(--muted); }
.cmp img { display: block; image-rendering: pixelated; border: 1px solid var(--line); }
.cmp .cap { font-size: .78em; color: var(--muted); }
.cmp .wide { grid-column: 1 / -1; margin-bottom: .6em; }
.warn { color: #a33; }
"""

NA = "&ndash;"  # an empty cell


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

def esc(x: Any) -> str:
  return html.escape(str(x), quote=True)


def img(uri: str, *, alt: str, width: int | None = None, cls: str = "") -> str:
  w = f' width="{int(width)}"' if width else ""
  c = f' class="{esc(cls)}"' if cls else ""
  return f'<img src="{uri}" alt="{esc(alt)}"{w}{c}>'


def figure(fig, alt: str, caption: str = "") -> str:
  """A matplotlib figure, inline, with an (already escaped) caption."""
  cap = f"<figcaption>{caption}</figcaption>" if caption else ""
  return f"<figure>{img(figs.figure_data_uri(fig), alt=alt)}{cap}</figure>"


def fmt(x: Any, digits: int = 2) -> str:
  if x is None or (isinstance(x, float) and not np.isfinite(x)):
    return NA if x is None else esc(f"{x}")
  if isinstance(x, float):
    return f"{x:.{digits}f}"
  return esc(x)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, left: int = 1,
          highlight: Sequence[bool] | None = None) -> str:
  """An HTML table; the first `left` columns are left-aligned text, cells already formatted."""
  cls = lambda i: ' class="l"' if i < left else ""
  out = ["<table>", "<tr>" + "".join(f"<th{cls(i)}>{esc(h)}</th>"
                                      for i, h in enumerate(header)) + "</tr>"]
  for r, row in enumerate(rows):
    tr = '<tr class="best">' if highlight is not None and highlight[r] else "<tr>"
    out.append(tr + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(row)) + "</tr>")
  out.append("</table>")
  return "\n".join(out)


def meta(items: Mapping[str, Any]) -> str:
  """Key-value provenance (command, commit, date, ...) as a definition list; values escaped,
  commands in <code>; None values left out."""
  rows = []
  for k, v in items.items():
    if v is None:
      continue
    v = f"<code>{esc(v)}</code>" if k in ("command", "commit", "run", "workdir") else esc(v)
    rows.append(f"<dt>{esc(k)}</dt><dd>{v}</dd>")
  return '<dl class="meta">' + "".join(rows) + "</dl>"


def anchor(*parts: str) -> str:
  """An HTML id from names ('validation', 'light_enhancement+dehazing' -> 'validation-...')."""
  return "-".join("".join(c if c.isalnum() or c in "_-" else "_" for c in p) for p in parts)


class Toc:
  """Collects the headings of a page as they are written, for its table of contents."""

  def __init__(self):
    self.items: list[tuple[int, str, str]] = []

  def h(self, level: int, ident: str, title: str, extra: str = "") -> str:
    """An <h2>/<h3> with that id, recorded; `extra` (HTML) follows the title in the heading."""
    self.items.append((level, ident, title))
    return f'<h{level} id="{esc(ident)}">{esc(title)}{extra}</h{level}>'

  def html(self) -> str:
    out, open_sub = ["<nav class=\"toc\"><b>Contents</b><ul>"], False
    for level, ident, title in self.items:
      if level > 2 and not open_sub:
        out[-1] = out[-1].removesuffix("</li>")
        out.append("<ul>")
        open_sub = True
      elif level == 2 and open_sub:
        out.append("</ul></li>")
        open_sub = False
      out.append(f'<li><a href="#{esc(ident)}">{esc(title)}</a></li>')
    if open_sub:
      out.append("</ul></li>")
    return "".join(out) + "</ul></nav>"


def page(title: str, body: str, *, subtitle: str = "", toc: Toc | None = None) -> str:
  sub = f"<p>{subtitle}</p>" if subtitle else ""
  nav = toc.html() if toc is not None and toc.items else ""
  return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
          "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
          f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
          f"<header class=\"top\"><h1>{esc(title)}</h1>{sub}</header>\n"
          f"<div class=\"layout\">{nav}<main>\n{body}\n</main></div>\n</body>\n</html>\n")


# ----------------------------------------------------------------------------------------------
# Provenance
# ----------------------------------------------------------------------------------------------

REPO = epath.Path(__file__).resolve().parent.parent


def git_commit() -> str | None:
  """HEAD, with '+dirty' when tracked files of the library or configs changed (best effort: None
  outside a checkout of this project, e.g. an installed wheel)."""
  if not (REPO / "pyproject.toml").exists():  # site-packages: any git repo above is not ours
    return None

  def git(*args):
    return subprocess.run(["git", *args], cwd=os.fspath(REPO), capture_output=True, text=True,
                          check=False, timeout=30).stdout.strip()
  try:
    head = git("rev-parse", "--short=12", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "fape_jax", "configs")
  except (OSError, subprocess.SubprocessError):
    return None
  return (head + ("+dirty" if dirty else "")) if head else None


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command_line(module: str) -> str:
  """This process's command as `python -m MODULE ARGS` (the same for a console script)."""
  return shlex.join(["python", "-m", module, *sys.argv[1:]])
