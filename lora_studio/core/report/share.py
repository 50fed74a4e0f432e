"""Comparisons and evaluations as files to share: one self-contained HTML page, Markdown, JSON lines, CSV.

The renderers read the JSON documents the results write (``ComparisonResult.to_json()`` with its provenance,
see :func:`comparison_document`; ``EvaluationResult.to_json()``), so a saved JSON renders again the same way.
The HTML page loads nothing: its style and its small sorting script are inline, its charts inline SVG, and
every text of a prompt, an output or a path is escaped (they are untrusted).
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lora_studio import __version__
from lora_studio.core.errors import UserError
from lora_studio.core.io.atomic import atomic_output_file
from lora_studio.core.io.paths import check_output_apart

Document = Mapping[str, Any]
FORMATS = {".html": "html", ".htm": "html", ".md": "markdown", ".jsonl": "jsonl", ".csv": "csv", ".json": "json"}
STRIP_MAX_KL = 2.0  # nats: the KL at which a divergence-strip token is fully red


# -- writing -----------------------------------------------------------------------------------------------------


def write_report(
    doc: Document, path: Path, *, overwrite: bool = False, inputs: Mapping[str, Path | None] | None = None
) -> Path:
    """Write ``doc`` in the format its suffix names, atomically; the path written. Never over what the document
    was made from (its base, variants and data sets, and ``inputs``: a prompts file, say)."""
    path = Path(path).expanduser()
    kind = report_kind(path)
    if doc.get("kind") not in ("comparison", "evaluation"):
        raise UserError("this is not a comparison or an evaluation", "save a comparison or an evaluation")
    check_output_apart(path, {**report_inputs(doc), **(inputs or {})})
    text = render(doc, kind)
    with atomic_output_file(path, overwrite=overwrite) as tmp:
        Path(tmp).write_text(text, "utf-8", newline="")
    return path


def report_inputs(doc: Document) -> dict[str, Path | None]:
    """What a comparison or evaluation was made from, by what it is: its base, each variant's folder or file and
    each data set (a report written over one would destroy it)."""
    prov = doc.get("provenance") or {}
    base = prov.get("base") or doc.get("base") or {}
    inputs: dict[str, Path | None] = {"base model": Path(base["path"]) if base.get("path") else None}
    for variant in prov.get("variants") or doc.get("variants") or []:
        if isinstance(variant, Mapping) and variant.get("path"):
            # an adapter beside a GGUF variant is named "file.gguf + adapter"
            for n, part in enumerate(str(variant["path"]).split(" + ")):
                inputs[f"variant {variant.get('name')}" + (f" ({n})" if n else "")] = Path(part)
    for data_set in doc.get("datasets") or doc.get("sets") or []:
        if isinstance(data_set, Mapping) and data_set.get("path"):
            inputs[f"data set {data_set.get('name')}"] = Path(data_set["path"])
    return inputs


def report_kind(path: Path) -> str:
    """The format a report file's suffix names; a suffix of no known format is refused."""
    kind = FORMATS.get(Path(path).suffix.lower())
    if kind is None:
        raise UserError(
            f"{Path(path).name}: unknown report type {Path(path).suffix or '(none)'}",
            "use .html, .md, .jsonl, .csv or .json",
        )
    return kind


def render(doc: Document, kind: str) -> str:
    evaluation = doc.get("kind") == "evaluation"
    if kind == "html":
        return evaluation_html(doc) if evaluation else comparison_html(doc)
    if kind == "markdown":
        return evaluation_markdown(doc) if evaluation else comparison_markdown(doc)
    if kind == "json":
        return json.dumps(_finite(doc), indent=1, ensure_ascii=False) + "\n"
    rows = evaluation_rows(doc) if evaluation else comparison_rows(doc)
    if kind == "jsonl":
        return "".join(json.dumps(_finite(r), ensure_ascii=False) + "\n" for r in rows)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["empty"])  # RFC 4180: CRLF, \r quoted
    writer.writeheader()
    writer.writerows({k: _csv_cell(v) for k, v in r.items()} for r in rows)
    return out.getvalue()


def _csv_cell(value: Any) -> Any:
    """A CSV cell: text that a spreadsheet would run as a formula (=, +, -, @, a tab or CR first) gets a leading
    apostrophe (OWASP's advice), and NUL, which ends a field for most CSV readers, is dropped."""
    if not isinstance(value, str):
        return value
    value = value.replace("\x00", "")
    return "'" + value if value.startswith(("=", "+", "-", "@", "\t", "\r")) else value


def _finite(value: Any) -> Any:
    """NaN and infinities as null: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# -- documents ---------------------------------------------------------------------------------------------------


def comparison_document(
    result_json: Mapping[str, Any], *, provenance: Mapping[str, Any], token_text: Callable[[int], str]
) -> dict[str, Any]:
    """A comparison's ``to_json()`` made shareable: kind, time, provenance, and each token's text for the strips."""
    prompts = []
    for prompt in result_json.get("prompts", []):
        variants = [{**v, "token_texts": [token_text(t) for t in v.get("token_ids", [])]} for v in prompt["variants"]]
        prompts.append({**prompt, "variants": variants})
    return {
        **result_json,
        "prompts": prompts,
        "kind": "comparison",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "provenance": {**provenance, "lora_studio": __version__},
    }


# -- rows (JSONL / CSV) ------------------------------------------------------------------------------------------


def comparison_rows(doc: Document) -> list[dict[str, Any]]:
    rows = []
    for n, prompt in enumerate(doc.get("prompts", []), 1):
        columns = {c["name"]: c for c in (prompt.get("divergence") or {}).get("columns", [])}
        for v in prompt["variants"]:
            c = columns.get(v["name"], {})
            rows.append(
                {
                    "prompt_index": n,
                    "prompt": prompt["prompt"],
                    "variant": v["name"],
                    "output": v["text"],
                    "tokens": len(v.get("token_ids", [])),
                    "first_divergence": c.get("first_divergence"),
                    "mean_kl": c.get("mean_kl"),
                    "agreement": c.get("agreement"),
                }
            )
    return rows


def evaluation_rows(doc: Document) -> list[dict[str, Any]]:
    rows = []
    for e in doc.get("examples", []):
        for name, s in e["scores"].items():
            rows.append(
                {
                    "index": e["index"],
                    "dataset": e["dataset"],
                    "source_row": e["source_row"],
                    "variant": name,
                    "loss": s["loss"],
                    "kl": s["kl"],
                    "accuracy": s["accuracy"],
                    "tokens": s["tokens"],
                    "regression": name in e.get("regressed", []),
                    "prompt": e["prompt"],
                    "answer": e["answer"],
                }
            )
    return rows


# -- Markdown ----------------------------------------------------------------------------------------------------


# what a Markdown viewer would read as markup inline: HTML and autolinks, links and images, emphasis, code, headings,
# entities, table pipes; a backslash makes each a plain character (numbers keep their "-", "." and "+")
_MARKUP = re.compile(r"([\\`*_\[\]()<>#!|&~{}])")


def _text(text: Any) -> str:
    """Untrusted text (a name, a prompt) shown as text by any Markdown viewer, on one line."""
    return _MARKUP.sub(r"\\\1", str(text).replace("\r", "")).replace("\n", " ")


def _code(text: Any) -> str:
    """Untrusted text (a path, a hash) as a code span, whatever backticks it holds (a longer fence)."""
    text = str(text).replace("\r", " ").replace("\n", " ")
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _md(text: Any) -> str:
    """A table cell: markup escaped as in _text, lines joined with <br>."""
    return _MARKUP.sub(r"\\\1", str(text).replace("\r", "")).replace("\n", "<br>")


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(_md(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return out


def _num(value: Any, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)


def _ci(ci: Any) -> str:
    return "-" if not ci else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _provenance_lines(
    doc: Document, text: Callable[[Any], str] = _text, code: Callable[[Any], str] = _code
) -> list[str]:
    """The document's provenance as "- " lines: Markdown by default, or with ``text``/``code`` of another format."""
    _text, _code = text, code
    prov = doc.get("provenance") or {}
    base = prov.get("base") or doc.get("base") or {}
    variants = prov.get("variants") or doc.get("variants") or []
    lines = [
        f"- Created: {_text(doc.get('created', ''))} with LoRA Studio "
        f"{_text(prov.get('lora_studio') or doc.get('lora_studio'))}",
        f"- Base: {_text(base.get('label', '-'))} {_code(base.get('path', '-'))} "
        f"({_text(base.get('hashed', 'config'))} sha256 {_code(base.get('config_sha256'))})",
    ]
    for v in variants:
        if v.get("kind") == "base":
            continue
        scale = f", scale {v['scale']:g}" if v.get("scale") not in (None, 1.0) else ""
        lines.append(
            f"- {_text(v['name'])} ({_text(v.get('kind', ''))}{scale}): {_code(v.get('path') or '-')} "
            f"sha256 {_code(v.get('sha256'))}"
        )
    return lines


def comparison_markdown(doc: Document) -> str:
    names = doc.get("variant_names") or [v["name"] for v in doc["prompts"][0]["variants"]]
    reason = _text(doc.get("fallback_reason"))
    how = "one mixed-adapter batch" if doc.get("mixed_batch") else f"one at a time ({reason})"
    out = ["# LoRA Studio comparison", "", *_provenance_lines(doc), f"- Run: {how}, {doc.get('seconds', 0):.1f} s", ""]
    for n, prompt in enumerate(doc.get("prompts", []), 1):
        outputs = {v["name"]: v for v in prompt["variants"]}
        columns = {c["name"]: c for c in (prompt.get("divergence") or {}).get("columns", [])}
        quoted = "\n> ".join(_text(line) for line in str(prompt["prompt"]).split("\n"))
        out += [f"## Prompt {n}", "", "> " + quoted, ""]
        out += _md_table(names, [[outputs[name]["text"] for name in names if name in outputs]])
        if columns:
            ref = prompt["divergence"]["reference"]
            out += ["", f"Teacher-forced on {_text(ref)}'s continuation:", ""]
            out += _md_table(
                ["variant", "first divergence", "mean KL", "greedy agreement"],
                [
                    [
                        name,
                        "-" if c.get("first_divergence") is None else c["first_divergence"],
                        _num(c.get("mean_kl")),
                        "-" if c.get("agreement") is None else f"{c['agreement']:.1f} %",
                    ]
                    for name, c in columns.items()
                ],
            )
        out.append("")
    return "\n".join(out)


def _summary_rows(doc: Document, dataset: str | None) -> list[list[str]]:
    return [
        [
            s["name"],
            _num(s["loss"]),
            _num(s["perplexity"], ".2f"),
            f"{100 * s['accuracy']:.1f} %",
            _num(s["kl"]),
            "-" if s["delta_loss"] is None else f"{s['delta_loss']:+.4f}",
            _ci(s["delta_ci"]),
            str(s["regressions"]),
        ]
        for s in doc["summary"]
        if s["dataset"] == dataset
    ]


SUMMARY_HEADERS = ["variant", "loss", "perplexity", "accuracy", "KL", "Δloss", "95 % CI", "regressions"]


def evaluation_markdown(doc: Document) -> str:
    sets = ", ".join(f"{_text(d['name'])} ({d['rows']} rows, sha256 {_code(d.get('sha256'))})" for d in doc["datasets"])
    out = ["# LoRA Studio evaluation", "", *_provenance_lines(doc), f"- Data: {sets}"]
    out += [f"- Reference: {_text(doc['reference'])}; loss in nats per answer token; 95 % bootstrap intervals", ""]
    out += ["## All sets", "", *_md_table(SUMMARY_HEADERS, _summary_rows(doc, None)), ""]
    if len(doc["datasets"]) > 1:
        for d in doc["datasets"]:
            out += [f"## {_text(d['name'])}", "", *_md_table(SUMMARY_HEADERS, _summary_rows(doc, d["name"])), ""]
    sweep = doc.get("scale_sweep")
    if sweep:
        out += [f"## Scale sweep of {_text(sweep['adapter'])} (best {sweep['best_scale']:g})", ""]
        out += _md_table(
            ["scale", "loss", "KL from base", "accuracy"],
            [
                [f"{p['scale']:g}", _num(p["loss"]), _num(p["kl_from_base"]), f"{100 * p['accuracy']:.1f} %"]
                for p in sweep["points"]
            ],
        )
        out.append("")
    names = [v["name"] for v in doc["variants"]]
    out += ["## Examples", ""]
    out += _md_table(
        ["set", "row", "prompt", *[f"{n} loss" for n in names], "regressed"],
        [
            [
                e["dataset"],
                e["source_row"],
                e["prompt"],
                *[_num(e["scores"][n]["loss"], ".3f") for n in names],
                ", ".join(e.get("regressed", [])),
            ]
            for e in doc["examples"]
        ],
    )
    return "\n".join(out) + "\n"


# -- HTML --------------------------------------------------------------------------------------------------------

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; margin: 24px auto;
       max-width: 1200px; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; }
.meta { color: #555; font-size: 12.5px; } .meta code { font-size: 11.5px; word-break: break-all; }
table { border-collapse: collapse; margin: 6px 0 12px; width: 100%; } .scroll { overflow-x: auto; }
th, td { border: 1px solid #ddd; padding: 4px 8px; vertical-align: top; text-align: left; }
td { overflow-wrap: anywhere; }
th { background: #f3f5f8; cursor: pointer; white-space: nowrap; } td.num { text-align: right;
     font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.regressed td { background: #fdf0f1; } .better { background: #dff3e3; } .worse { background: #fbdde0; }
blockquote { margin: 6px 0; padding: 6px 10px; background: #f7f7f9; border-left: 3px solid #9bb;
             white-space: pre-wrap; }
.output { white-space: pre-wrap; font: 13px/1.5 ui-monospace, "SFMono-Regular", Menlo, monospace; }
.strip span { border-bottom: 3px solid transparent; } .strip .first { outline: 2px solid #d33; }
.small { color: #666; font-size: 12px; } svg text { font: 11px system-ui, sans-serif; }
@media print { th { cursor: auto; } body { margin: 0; } }
"""

SORT_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function (th, col) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0], rows = Array.from(body.rows);
    var asc = th.dataset.asc !== "1"; th.dataset.asc = asc ? "1" : "0";
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v || a.cells[col].textContent;
      var y = b.cells[col].dataset.v || b.cells[col].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _page(title: str, body: list[str]) -> str:
    # a table with many variants scrolls inside its own box instead of widening the page
    scrolled = [
        part.replace("<table", '<div class="scroll"><table').replace("</table>", "</table></div>") for part in body
    ]
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>",
            *scrolled,
            f"<script>{SORT_SCRIPT}</script></body></html>",
        ]
    )


def _provenance_html(doc: Document) -> str:
    # the same lines, escaped for HTML (Markdown's backslashes would show on the page)
    lines = _provenance_lines(doc, text=_e, code=lambda value: f"<code>{_e(value)}</code>")
    items = "".join(f"<li>{line[2:]}</li>" for line in lines)
    return f'<ul class="meta">{items}</ul>'


def _cell(value: Any, text: str, cls: str = "num") -> str:
    data = "" if value is None else f' data-v="{_e(value)}"'
    return f'<td class="{cls}"{data}>{_e(text)}</td>'


def _strip(variant: Mapping[str, Any], column: Mapping[str, Any] | None) -> str:
    """The output's tokens, each shaded by its teacher-forced KL from the reference."""
    texts = variant.get("token_texts")
    kls = (column or {}).get("kl") or []
    if not texts:
        return f'<div class="output">{_e(variant.get("text", ""))}</div>'
    first = (column or {}).get("first_divergence")
    spans = []
    for i, text in enumerate(texts):
        kl = kls[i] if i < len(kls) and kls[i] is not None else None
        shade = 0.0 if kl is None else min(1.0, kl / STRIP_MAX_KL)
        colour = f"rgba(220,40,40,{0.08 + 0.6 * shade:.2f})" if kl is not None and kl > 1e-6 else "transparent"
        title = "" if kl is None else f' title="KL {kl:.4f}"'
        cls = ' class="first"' if first == i else ""
        spans.append(f'<span{cls}{title} style="background:{colour}">{_e(text)}</span>')
    return f'<div class="output strip">{"".join(spans)}</div>'


def comparison_html(doc: Document) -> str:
    names = doc.get("variant_names") or [v["name"] for v in doc["prompts"][0]["variants"]]
    how = "one mixed-adapter batch" if doc.get("mixed_batch") else f"one at a time ({doc.get('fallback_reason')})"
    body = [
        "<h1>LoRA Studio comparison</h1>",
        _provenance_html(doc),
        f'<p class="small">{_e(how)}, {doc.get("seconds", 0):.1f} s. Tokens are shaded by the teacher-forced KL '
        "from the reference column (hover for the value); the first diverging token is outlined.</p>",
    ]
    for n, prompt in enumerate(doc.get("prompts", []), 1):
        outputs = {v["name"]: v for v in prompt["variants"]}
        div = prompt.get("divergence") or {}
        columns = {c["name"]: c for c in div.get("columns", [])}
        body += [f"<h2>Prompt {n}</h2>", f"<blockquote>{_e(prompt['prompt'])}</blockquote>", "<table><thead><tr>"]
        body.append("".join(f"<th>{_e(name)}</th>" for name in names) + "</tr></thead><tbody><tr>")
        for name in names:
            c = columns.get(name)
            stats = ""
            if c and c.get("mean_kl") is not None and name != div.get("reference"):
                first = (
                    "identical" if c.get("first_divergence") is None else f"differs from token {c['first_divergence']}"
                )
                numbers = f"{first} · mean KL {c['mean_kl']:.4f} · agreement {c['agreement']:.1f} %"
                stats = f'<div class="small">{_e(numbers)}</div>'
            elif name == div.get("reference"):
                stats = '<div class="small">reference</div>'
            body.append(f"<td>{_strip(outputs.get(name, {}), c)}{stats}</td>")
        body.append("</tr></tbody></table>")
    return _page("LoRA Studio comparison", body)


def _delta_chart(rows: Sequence[Mapping[str, Any]]) -> str:
    """Inline SVG: one bar per variant's Δloss with its interval as a whisker; green / red when the interval
    excludes 0, grey when it does not."""
    rows = [r for r in rows if r.get("delta_loss") is not None]
    if not rows:
        return ""
    values = [r["delta_loss"] for r in rows] + [v for r in rows for v in (r.get("delta_ci") or [])]
    span = max(1e-6, max(abs(v) for v in values)) * 1.1
    width, label, height = 640, 110, 22 * len(rows) + 24
    mid = label + (width - label) / 2

    def x(v: float) -> float:
        return mid + v / span * (width - label) / 2

    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="delta loss per variant">']
    parts.append(f'<line x1="{mid}" y1="0" x2="{mid}" y2="{height - 16}" stroke="#888"/>')
    for i, r in enumerate(rows):
        y = 4 + 22 * i
        d = r["delta_loss"]
        ci = r.get("delta_ci")
        clear = not ci or ci[0] > 0 or ci[1] < 0  # grey: the interval includes 0, no clear change
        colour = ("#54a24b" if d < 0 else "#e45756") if clear else "#9a9a9a"
        parts.append(f'<text x="{label - 6}" y="{y + 13}" text-anchor="end">{_e(r["name"])}</text>')
        parts.append(
            f'<rect x="{min(x(0), x(d)):.1f}" y="{y + 3}" width="{abs(x(d) - x(0)):.1f}" height="12" '
            f'fill="{colour}" opacity="0.75"/>'
        )
        if r.get("delta_ci"):
            lo, hi = r["delta_ci"]
            parts.append(f'<line x1="{x(lo):.1f}" y1="{y + 9}" x2="{x(hi):.1f}" y2="{y + 9}" stroke="#222"/>')
            for v in (lo, hi):
                parts.append(f'<line x1="{x(v):.1f}" y1="{y + 5}" x2="{x(v):.1f}" y2="{y + 13}" stroke="#222"/>')
        parts.append(f'<text x="{width - 2}" y="{y + 13}" text-anchor="end">{d:+.3f}</text>')
    parts.append(
        f'<text x="{mid}" y="{height - 2}" text-anchor="middle">Δloss vs reference (nats/token), 95 % CI</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def _summary_table(doc: Document, dataset: str | None) -> str:
    rows = [s for s in doc["summary"] if s["dataset"] == dataset]
    head = "".join(f"<th>{_e(h)}</th>" for h in SUMMARY_HEADERS)
    body = []
    for s in rows:
        ci = s.get("delta_ci")
        cls = "num"
        if ci and (ci[0] > 0 or ci[1] < 0):
            cls = "num better" if s["delta_loss"] < 0 else "num worse"
        body.append(
            "<tr>"
            + f"<td>{_e(s['name'])}</td>"
            + _cell(s["loss"], _num(s["loss"]))
            + _cell(s["perplexity"], _num(s["perplexity"], ".2f"))
            + _cell(s["accuracy"], f"{100 * s['accuracy']:.1f} %")
            + _cell(s["kl"], _num(s["kl"]))
            + _cell(s["delta_loss"], "-" if s["delta_loss"] is None else f"{s['delta_loss']:+.4f}", cls)
            + _cell(None, _ci(ci), cls)
            + _cell(s["regressions"], str(s["regressions"]))
            + "</tr>"
        )
    return f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def evaluation_html(doc: Document) -> str:
    names = [v["name"] for v in doc["variants"]]
    sets = ", ".join(f"{d['name']} ({d['rows']} rows)" for d in doc["datasets"])
    how = "one mixed-adapter batch" if doc.get("mixed_batch") else f"one at a time ({doc.get('fallback_reason')})"
    body = [
        "<h1>LoRA Studio evaluation</h1>",
        _provenance_html(doc),
        f'<p class="small">Data: {_e(sets)}. Reference: {_e(doc["reference"])}. {_e(how)}, '
        f"{doc.get('seconds', 0):.1f} s. Loss: mean cross-entropy per answer token (nats); accuracy: the variant's "
        "greedy token is the answer's; Δloss with the paired bootstrap's 95 % interval (green / red: the interval "
        "excludes 0); a regression: an example whose loss exceeds the base's clearly.</p>",
        "<h2>All sets</h2>",
        _delta_chart([s for s in doc["summary"] if s["dataset"] is None]),
        _summary_table(doc, None),
    ]
    if len(doc["datasets"]) > 1:
        sets_names = [d["name"] for d in doc["datasets"]]
        cells = {(s["name"], s["dataset"]): s for s in doc["summary"]}
        head = "<th>variant</th>" + "".join(f"<th>Δloss on {_e(n)}</th>" for n in sets_names)
        rows = []
        for name in names:
            if name == doc["reference"]:
                continue
            tds = []
            for dataset in sets_names:
                s = cells[(name, dataset)]
                ci = s.get("delta_ci")
                cls = "num"
                if ci and (ci[0] > 0 or ci[1] < 0):
                    cls = "num better" if s["delta_loss"] < 0 else "num worse"
                tds.append(_cell(s["delta_loss"], f"{s['delta_loss']:+.3f} {_ci(ci)}", cls))
            rows.append(f"<tr><td>{_e(name)}</td>{''.join(tds)}</tr>")
        body += [
            "<h2>By set</h2>",
            f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>',
        ]
        for d in doc["datasets"]:
            body += [
                f"<h2>{_e(d['name'])}</h2>",
                f'<p class="meta"><code>{_e(d["path"])}</code> sha256 <code>{_e(d.get("sha256"))}</code></p>',
            ]
            body.append(_summary_table(doc, d["name"]))
    sweep = doc.get("scale_sweep")
    if sweep:
        body += [
            f"<h2>Scale sweep of {_e(sweep['adapter'])} — best scale {sweep['best_scale']:g}</h2>",
            _sweep_chart(sweep),
        ]
    ref = doc["reference"]
    others = [n for n in names if n != ref]
    head = "<th>set</th><th>row</th><th>prompt</th><th>answer</th>" + f"<th>{_e(ref)} loss</th>"
    head += "".join(f"<th>{_e(n)} Δloss</th>" for n in others) + "".join(f"<th>{_e(n)} KL</th>" for n in others)
    rows = []
    for e in doc["examples"]:
        base = e["scores"][ref]["loss"]
        regressed = set(e.get("regressed", []))
        tds = [
            f"<td>{_e(e['dataset'])}</td>",
            _cell(e["source_row"], str(e["source_row"])),
            f"<td>{_e(e['prompt'])}</td>",
            f"<td>{_e(e['answer'])}</td>",
            _cell(base, f"{base:.3f}"),
        ]
        for n in others:
            d = e["scores"][n]["loss"] - base
            tds.append(_cell(d, f"{d:+.3f}", "num worse" if n in regressed else "num"))
        for n in others:
            kl = e["scores"][n]["kl"]
            tds.append(_cell(kl, _num(kl, ".3f")))
        row_class = ' class="regressed"' if regressed else ""
        rows.append(f"<tr{row_class}>{''.join(tds)}</tr>")
    body += [
        f"<h2>Examples ({len(doc['examples'])}; click a header to sort)</h2>",
        f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>',
    ]
    return _page("LoRA Studio evaluation", body)


def _sweep_chart(sweep: Mapping[str, Any]) -> str:
    points = sweep["points"]
    width, height, pad = 640, 220, 40
    xs = [p["scale"] for p in points]
    ys = [p["loss"] for p in points] + [p["kl_from_base"] for p in points] + [sweep["base_loss"]]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y1 = max(ys) * 1.05 or 1.0

    def px(v: float) -> float:
        return pad + (v - x0) / (x1 - x0) * (width - 2 * pad)

    def py(v: float) -> float:
        return height - pad - v / y1 * (height - 2 * pad)

    def line(key: str, colour: str) -> str:
        coords = " ".join(f"{px(p['scale']):.1f},{py(p[key]):.1f}" for p in points)
        dots = "".join(
            f'<circle cx="{px(p["scale"]):.1f}" cy="{py(p[key]):.1f}" r="3" fill="{colour}"/>' for p in points
        )
        return f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>{dots}'

    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="scale sweep">']
    parts.append(f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>')
    parts.append(f'<line x1="{pad}" y1="{pad / 2}" x2="{pad}" y2="{height - pad}" stroke="#888"/>')
    base = py(sweep["base_loss"])
    parts.append(
        f'<line x1="{pad}" y1="{base:.1f}" x2="{width - pad}" y2="{base:.1f}" stroke="#777" stroke-dasharray="4 3"/>'
    )
    parts.append(line("loss", "#4c78a8") + line("kl_from_base", "#e45756"))
    for p in points:
        parts.append(
            f'<text x="{px(p["scale"]):.1f}" y="{height - pad + 14}" text-anchor="middle">{p["scale"]:g}</text>'
        )
    parts.append(
        f'<text x="{width - pad}" y="{pad / 2 + 10}" text-anchor="end">'
        "loss (blue), KL from base (red), base loss (dashed)</text>"
    )
    parts.append(f'<text x="{width / 2}" y="{height - 4}" text-anchor="middle">scale</text></svg>')
    return "".join(parts)
