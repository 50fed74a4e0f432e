"""Reports: every format written and read back, hostile text escaped, nothing external; the page opens in Chromium."""

import csv
import json
import re
import shutil
import subprocess

import factories
import pytest

from lora_studio.core.compare import Variant, compare
from lora_studio.core.errors import UserError
from lora_studio.core.evaluate import datasets
from lora_studio.core.evaluate.run import evaluate
from lora_studio.core.evaluate.scale import sweep_scale
from lora_studio.core.generation.generate import GenerationSettings
from lora_studio.core.report import share

pytestmark = pytest.mark.usefixtures("one_thread")
HOSTILE = 'Say <script>alert("x")</script></td> | and a\nnew line'
VARIANTS = [Variant.base(), Variant.of_adapter("alpha"), Variant.of_adapter("beta")]


@pytest.fixture(scope="module")
def session(one_thread, tiny_llama, llama_adapters):
    s = factories.alpha_beta_session(tiny_llama, llama_adapters)
    yield s
    s.close()


@pytest.fixture(scope="module")
def evaluation(session, tmp_path_factory):
    folder = tmp_path_factory.mktemp("share")
    paths = []
    for name in ("first", "second"):
        path = folder / f"{name}.jsonl"
        rows = [{"prompt": HOSTILE, "completion": "Fine </table> & done."}, {"prompt": "Hi", "completion": "Hello."}]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    sets = datasets.load_eval_sets(paths, session.tokenizer)
    doc = evaluate(session, VARIANTS, sets).to_json()
    doc["scale_sweep"] = sweep_scale(session, "alpha", sets, [0.0, 1.0]).to_json()
    return doc


@pytest.fixture(scope="module")
def comparison(session):
    result = compare(session, VARIANTS, [HOSTILE, "hello"], GenerationSettings(max_new_tokens=6))
    provenance = {"base": {"label": "tiny", "path": "/models/tiny", "config_sha256": "ab" * 32}, "variants": []}
    return share.comparison_document(
        result.to_json(), provenance=provenance, token_text=lambda t: session.tokenizer.decode([t])
    )


def no_external_resource(text: str) -> None:
    assert "http://" not in text and "https://" not in text and "@import" not in text
    for ref in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', text):
        assert ref.startswith(("#", "data:")), ref
    assert all(u.startswith("data:") for u in re.findall(r"url\(\s*['\"]?([^'\")]*)", text))


@pytest.mark.parametrize("fixture", ["evaluation", "comparison"])
def test_every_format_reads_back(request, tmp_path, fixture):
    doc = request.getfixturevalue(fixture)
    names = [v["name"] for v in doc["variants"]] if fixture == "evaluation" else doc["variant_names"]
    page = share.write_report(doc, tmp_path / "r.html").read_text()
    no_external_resource(page)
    assert "<script>alert" not in page and "&lt;script&gt;alert" in page
    for name in names:
        assert f"<th>{name}" in page or f"<th>{name} " in page or f">{name}<" in page
    markdown = share.write_report(doc, tmp_path / "r.md").read_text()
    assert "<script>" not in markdown and all(name in markdown for name in names)
    table_lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert table_lines and all("\n" not in line for line in table_lines)
    lines = share.write_report(doc, tmp_path / "r.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert {r["variant"] for r in rows} == set(names)
    with open(share.write_report(doc, tmp_path / "r.csv"), newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert json.loads(share.write_report(doc, tmp_path / "r.json").read_text())["kind"] == doc["kind"]


def test_writes_are_atomic_and_refuse_unknown_suffixes(evaluation, tmp_path):
    target = tmp_path / "r.html"
    share.write_report(evaluation, target)
    with pytest.raises(UserError, match="exists"):
        share.write_report(evaluation, target)
    share.write_report(evaluation, target, overwrite=True)
    with pytest.raises(UserError, match="unknown report type"):
        share.write_report(evaluation, tmp_path / "r.pdf")
    with pytest.raises(UserError, match="not a comparison or an evaluation"):
        share.write_report({"kind": "other"}, tmp_path / "x.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]


def chromium() -> str | None:
    return shutil.which("chromium-headless-shell") or shutil.which("chromium")


@pytest.mark.parametrize("fixture", ["evaluation", "comparison"])
def test_the_page_opens_in_headless_chromium(request, tmp_path, fixture):
    browser = chromium()
    if browser is None:
        pytest.skip("no headless Chromium (packaging/install_test_browser.sh installs it)")
    doc = request.getfixturevalue(fixture)
    page = share.write_report(doc, tmp_path / "report.html")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,900"]
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    from PySide6.QtGui import QImage

    image = QImage(str(shot))
    assert (image.width(), image.height()) == (1280, 900)
    greys = {image.pixelColor(x, y).lightness() for x in range(0, 1280, 7) for y in range(0, 900, 7)}
    assert max(greys) - min(greys) > 100  # text on a page, not a blank
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, timeout=120, check=True)
    headers = re.findall(r"<th[^>]*>([^<]*)</th>", dom.stdout.decode())
    names = [v["name"] for v in doc["variants"]] if fixture == "evaluation" else doc["variant_names"]
    for name in names:
        assert any(h == name or h.startswith(f"{name} ") for h in headers), (name, headers)


PAYLOADS = ("<marquee>x</marquee>", "<img src=x onerror=alert(1)>", "[click](javascript:alert(1))", "a`b`<b>c</b>")


@pytest.mark.parametrize("fixture", ["evaluation", "comparison"])
def test_markdown_shows_hostile_names_as_text_and_csv_runs_no_formula(request, tmp_path, fixture):
    import copy

    from markdown_it import MarkdownIt

    doc = copy.deepcopy(request.getfixturevalue(fixture))
    hostile = " ".join(PAYLOADS)
    prov = doc.setdefault("provenance", {})
    prov["base"] = {"label": hostile, "path": "/m/`x`/<i>y</i>", "config_sha256": hostile}
    prov["variants"] = [{"name": hostile, "kind": hostile, "path": "/a/``b``", "sha256": "c"}]
    doc["fallback_reason"], doc["mixed_batch"] = hostile, False
    for data_set in doc.get("datasets", []):
        data_set["name"] = hostile
    if fixture == "comparison":
        doc["prompts"][0]["prompt"] = '=HYPERLINK("http://x")\n' + hostile
    else:
        doc["examples"][0]["prompt"] = '=HYPERLINK("http://x")'
    page = MarkdownIt("commonmark").enable("table").render(share.render(doc, "markdown"))
    for tag in ("<marquee", "<img", "<b>", "<i>", 'href="javascript'):
        assert tag not in page, tag
    assert "&lt;marquee&gt;" in page  # shown, as text
    with open(share.write_report(doc, tmp_path / "r.csv"), newline="") as f:
        cells = [cell for row in csv.reader(f) for cell in row]
    assert not [c for c in cells if c.startswith(("=", "@", "+"))]
    assert any(c.startswith("'=HYPERLINK") for c in cells)
    # the HTML page shows a name as written: Markdown's backslashes are not the page's
    plain = copy.deepcopy(request.getfixturevalue(fixture))
    plain.setdefault("provenance", {})["base"] = {"label": "SmolLM2 (demo) *x* <b>", "path": "/m", "config_sha256": "c"}
    html_page = share.render(plain, "html")
    assert "SmolLM2 (demo) *x* &lt;b&gt;" in html_page and "\\(demo\\)" not in html_page
