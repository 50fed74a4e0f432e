"""docs/architecture.md's layout lists every module of the package, and only modules that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lora_studio"


def documented_modules(text: str) -> set[str]:
    """The .py paths under lora_studio/ that the Layout section's tree names (a line's first column: one name, or
    several separated by commas; folders end in '/' and nest by indentation)."""
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    found: set[str] = set()
    stack: list[tuple[int, str]] = []  # (indent, folder)
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        first_column = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        names = [n.strip() for n in first_column.split(",") if n.strip()]
        if not names or not all(n.endswith((".py", "/")) for n in names):
            continue  # a description's continuation
        while stack and stack[-1][0] >= indent:
            stack.pop()
        prefix = "".join(folder for _, folder in stack)
        for name in names:
            if name.endswith("/"):
                stack.append((indent, name))
            else:
                found.add(prefix + name)
    return {path for path in found if path.startswith("lora_studio/")}


def package_modules() -> set[str]:
    return {
        p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent == PACKAGE
    }


def test_the_layout_names_every_module_and_no_other():
    documented = documented_modules((ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"))
    actual = package_modules()
    assert sorted(actual - documented) == [], "modules missing from docs/architecture.md's layout"
    assert sorted(documented - actual) == [], "docs/architecture.md's layout names modules that do not exist"


def test_the_docs_name_test_files_and_modules_that_exist():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    named = {
        (doc.name, path)
        for doc in docs
        for path in re.findall(r"\b((?:tests|lora_studio|benchmarks)/[\w/]+\.py)\b", doc.read_text(encoding="utf-8"))
    }
    assert sorted((doc, path) for doc, path in named if not (ROOT / path).is_file()) == []


def test_the_guarantees_name_tests_that_exist():
    """Each `path::test` of docs/guarantees.md, and each `::test` after it (the same file), is a test in that file."""
    missing = []
    for line in (ROOT / "docs" / "guarantees.md").read_text(encoding="utf-8").splitlines():
        path = None
        for ref in re.findall(r"`((?:tests/[\w/]+\.py)?::[\w]+)(?:\[[^\]]*\])?`", line):
            file, _, name = ref.partition("::")
            path = file or path
            if path is None or f"def {name}(" not in (ROOT / path).read_text(encoding="utf-8"):
                missing.append(f"{path}::{name}")
    assert missing == []
