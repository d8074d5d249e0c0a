"""Every module that cites docs/algorithms.md names a section the document has."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_algorithm_citations_point_at_existing_sections():
    doc = (ROOT / "docs" / "algorithms.md").read_text()
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", doc, flags=re.M)}
    cited: dict[str, set[int]] = {}
    for path in sorted((ROOT / "mmbalance").rglob("*.py")):
        text = " ".join(path.read_text().split())
        for group in re.findall(r"docs/algorithms\.md sections? ([\d, and]+)", text):
            cited.setdefault(str(path.relative_to(ROOT)), set()).update(int(n) for n in re.findall(r"\d+", group))
        assert "algorithms.md" not in text.replace("docs/algorithms.md", ""), f"{path}: cite docs/algorithms.md"
    assert len(cited) >= 10  # the solvers, clustering, report and mixer all cite it
    missing = {p: sorted(n - sections) for p, n in cited.items() if n - sections}
    assert not missing, missing
