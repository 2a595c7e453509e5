"""report.html: the report folder's report.md as one self-contained page, to read in a browser.

One source of content, two views: the page is report.md rendered (markdown-it-py, CommonMark with tables),
so every table report.md has, the page has, with no code of its own. The page adds what Markdown does not
hold: a table of contents, each group's ROC figure in that group's section, the learning curves, and the
run's settings from report.json. Self-contained: the figures are the report's PNGs as data: URIs, the style
is inline, and a Content-Security-Policy lets the page load nothing else and run no script.

Site and reader names come from the hospitals' files, so text is never markup: raw HTML is escaped, and
links and images are not parsed (a reader column named ``![x](https://…)`` stays text; nothing is fetched).
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from markdown_it import MarkdownIt
from markdown_it.token import Token

from common.protocol import ALL
from common.stats.report import roc_name, section_title

NOT_ESTIMABLE = ("not estimable: the group's cases cannot estimate it (an AUC needs malignant and benign "
                 "cases, its 95% CI and DeLong's test at least 2 of each), or the federated evaluation does "
                 "not compute it (the text above the tables says which and why)")
_CI = re.compile(r"\(-?\d[\d.]*%?–-?\d[\d.]*%?\)")
"""A confidence interval as the tables write it: (lo–hi), percentages or not."""
_NE = re.compile(r"\bn/e\b")
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
_NE_HTML = '<abbr class="ne" title="not estimable (see How to read the tables, at the top)">n/e</abbr>'
_LEGEND = ('<aside class="legend"><strong>How to read the tables.</strong> Each value is followed by its 95% '
           "confidence interval in grey: DeLong's for an AUC, Wilson's for a sensitivity, specificity or "
           "accuracy. A rater calls an exam positive at or above its threshold. DeLong Z and P: DeLong's "
           f"paired test of the two AUCs. {_NE_HTML}: {html.escape(NOT_ESTIMABLE)}.</aside>")
_STYLE = """
:root { --ink: #1d2733; --muted: #667280; --line: #d9dee4; --band: #f3f5f7; --accent: #1f5f8b; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); display: grid; grid-template-columns: 15rem minmax(0, 1fr);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
nav { position: sticky; top: 0; height: 100vh; overflow-y: auto; padding: 1.2rem 1rem; font-size: 13.5px;
  background: var(--band); border-right: 1px solid var(--line); }
nav ol { list-style: none; margin: 0; padding: 0; }
nav ol ol { padding-left: .9rem; margin-bottom: .3rem; }
nav li { margin: .15rem 0; }
nav a { color: var(--accent); text-decoration: none; }
nav a:hover { text-decoration: underline; }
main { padding: 1.5rem 2.5rem 4rem; max-width: 76rem; }
h1 { font-size: 1.6rem; margin: 0 0 .5rem; }
h2 { font-size: 1.3rem; margin: 2.4rem 0 .6rem; padding-bottom: .2rem; border-bottom: 2px solid var(--line); }
h3 { font-size: 1.08rem; margin: 2rem 0 .4rem; }
code { font: .9em ui-monospace, Menlo, Consolas, monospace; background: var(--band); padding: 0 .25em;
  border-radius: 3px; }
.scroll { overflow-x: auto; margin: .6rem 0 1rem; }
table { border-collapse: collapse; font-size: 14px; font-variant-numeric: tabular-nums; }
th, td { padding: .3rem .75rem; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap;
  vertical-align: top; }
th { background: var(--band); font-weight: 600; border-bottom: 2px solid #b8c1cb; }
th:first-child, td:first-child { text-align: left; }
tbody tr:hover { background: #edf3f8; }
.ci, abbr.ne { color: var(--muted); }
abbr.ne { text-decoration: underline dotted; cursor: help; }
.legend { margin: 1.2rem 0; padding: .6rem 1rem; font-size: 14px; background: #f6f8fa;
  border-left: 4px solid var(--accent); }
figure { margin: .8rem 0 1.4rem; }
figure img { display: block; max-width: min(100%, 30rem); height: auto; border: 1px solid var(--line); }
figure.wide img { max-width: min(100%, 60rem); }
figcaption { max-width: 60rem; color: var(--muted); font-size: 13px; }
.settings { column-width: 17rem; column-gap: 2.5rem; margin: .4rem 0 1rem; font-size: 14px; }
.settings div { display: flex; justify-content: space-between; gap: 1rem; padding: .2rem 0;
  border-bottom: 1px solid var(--line); break-inside: avoid; }
.settings dt { color: var(--muted); white-space: nowrap; }
.settings dd { margin: 0; text-align: right; overflow-wrap: anywhere; font-variant-numeric: tabular-nums; }
@media (max-width: 60rem) { body { display: block; } nav { position: static; height: auto; border: 0; } }
@media print { body { display: block; } nav { display: none; } h2, h3 { break-after: avoid; }
  tr, figure { break-inside: avoid; } }
"""


def _text(self: Any, tokens: Sequence[Token], idx: int, options: Any, env: Any) -> str:
    """Plain text, escaped; confidence intervals greyed, and n/e explained on hover."""
    text = _CI.sub(r'<span class="ci">\g<0></span>', html.escape(tokens[idx].content))
    return _NE.sub(_NE_HTML, text)


_MD = MarkdownIt("commonmark", {"html": False}).enable("table").disable(["link", "image", "autolink"])
_MD.add_render_rule("text", _text)
_MD.add_render_rule("table_open", lambda *_: '<div class="scroll"><table>\n')
_MD.add_render_rule("table_close", lambda *_: "</table></div>\n")


def _raw(content: str) -> Token:
    """A token the renderer writes as is: HTML this module built (the parser itself emits none)."""
    return Token("html_block", "", 0, content=content + "\n")


def _figure(png: bytes, alt: str, caption: str, css: str = "roc") -> str:
    data = base64.b64encode(png).decode()
    return (f'<figure class="{css}"><img src="data:image/png;base64,{data}" '
            f'alt="{html.escape(alt)}"><figcaption>{html.escape(caption)}</figcaption></figure>')


def _anchor(label: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:60] or "section"
    anchor, n = base, 1
    while anchor in used:
        n += 1
        anchor = f"{base}-{n}"
    used.add(anchor)
    return anchor


def _body(markdown: str, report: Mapping[str, Any], files: Mapping[str, bytes], used: set[str]
          ) -> tuple[list[Token], list[tuple[int, str, str]]]:
    """report.md's tokens with an id on each heading, the legend before the first section, and each group's
    ROC figure at the end of the section titled for it (`section_title`, then " (n = …"); and the table of
    contents: (level, id, label) of each section."""
    groups = {section_title(group): group for group in (ALL, *report["evaluation"]["subgroups"])}
    tokens = _MD.parse(markdown)
    body: list[Token] = []
    toc: list[tuple[int, str, str]] = []
    figure: tuple[int, str] | None = None  # a section's figure and its heading level, until the section ends
    for i, token in enumerate(tokens):
        if token.type == "heading_open":
            level = int(token.tag[1])
            if figure and level <= figure[0]:
                body.append(_raw(figure[1]))
                figure = None
            if level == 2 and not toc:
                body.append(_raw(_LEGEND))
            text = "".join(child.content for child in tokens[i + 1].children or [])
            label = text.split(" (")[0]
            token.attrSet("id", _anchor(label, used))
            if level in (2, 3):
                toc.append((level, token.attrGet("id"), label))
            group = groups.get(text.split(" (n = ")[0]) if " (n = " in text else None
            if group is not None and roc_name(group) in files:
                figure = (level, _figure(files[roc_name(group)], f"ROC curves, {text}",
                                         f"ROC curves, {label}: each rater's AUC (95% CI) in the legend, "
                                         "its operating point at its threshold marked."))
        body.append(token)
    if figure:
        body.append(_raw(figure[1]))
    return body, toc


def _value(value: Any) -> str:
    return "—" if value is None else value if isinstance(value, str) else json.dumps(value)


def _settings(run: Mapping[str, Any]) -> list[tuple[int, str, str]]:
    """The run's settings from report.json as (level, title, HTML) sections: Flower's run config, and each
    section of the fedmammo config, as lists of key and value."""
    def listing(values: Mapping[str, Any]) -> str:
        return '<dl class="settings">' + "".join(
            f"<div><dt>{html.escape(str(key))}</dt><dd>{html.escape(_value(value))}</dd></div>"
            for key, value in values.items()) + "</dl>"

    return [(2, "Run settings", ""), (3, "Run config (Flower)", listing(run["run-config"])),
            *((3, f"fedmammo config [{name}]", listing(values)) for name, values in run["config"].items())]


def _toc(entries: Sequence[tuple[int, str, str]]) -> str:
    tree: list[tuple[str, list[str]]] = []
    for level, anchor, label in entries:
        link = f'<a href="#{anchor}">{html.escape(label)}</a>'
        if level == 2 or not tree:
            tree.append((link, []))
        else:
            tree[-1][1].append(link)
    return "<ol>" + "".join(
        f"<li>{link}" + (f"<ol>{''.join(f'<li>{s}</li>' for s in subs)}</ol>" if subs else "") + "</li>"
        for link, subs in tree) + "</ol>"


def page(report: Mapping[str, Any], files: Mapping[str, bytes]) -> str:
    """report.html's text: `files` are the report folder's other files by name (report.md and the PNGs),
    `report` what report.json holds."""
    used: set[str] = set()  # the page's ids
    body, toc = _body(files["report.md"].decode(), report, files, used)
    curves = ("Training loss per round (left) and the pooled test AUC with its 95% CI at each evaluated "
              "round (right); each site dotted" + ("; the synthetic cohort's ideal observer dashed."
                                                   if report.get("ceiling") else "."))
    extra = [(2, "Learning curves", _figure(files["learning_curves.png"], "Learning curves", curves, "wide")),
             *_settings(report["run"])]
    for level, title, content in extra:
        anchor = _anchor(title, used)
        toc.append((level, anchor, title))
        body += [_raw(f'<h{level} id="{anchor}">{html.escape(title)}</h{level}>\n{content}')]
    title = f"Federated evaluation, run {report['run']['token']}"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{_STYLE}</style>
</head>
<body>
<nav aria-label="Contents">{_toc(toc)}</nav>
<main>
{_MD.renderer.render(body, _MD.options, {})}</main>
</body>
</html>
"""
