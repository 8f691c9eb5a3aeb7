"""The README's results-schema table is the schema in code (ltssl/results.py), column for column."""

import re
from pathlib import Path

from ltssl.results import RESULTS_SCHEMA

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_documents_every_results_column():
    documented = re.findall(r"^\| `([a-z_0-9]+)` \| ([^|]+?) \|", README.read_text(), flags=re.M)
    assert documented == [(f.name, str(f.type)) for f in RESULTS_SCHEMA]


def test_readme_code_map_names_every_module():
    """A module added to ltssl/ (or an entry point to launch/, data_prep/) is named in the README's code map."""
    text = README.read_text()
    code_map = text[text.index("## Code map"):]
    code_map = code_map[: code_map.index("\n## ", 1)]
    repo = README.parent
    modules = [p for d in ("ltssl", "launch", "data_prep") for p in (repo / d).rglob("*.py") if p.name != "__init__.py"]
    missing = [str(p.relative_to(repo)) for p in modules if f"`{p.name}`" not in code_map and f"{p.relative_to(repo)}`" not in code_map]
    assert modules and not missing, f"README code map does not name: {missing}"
