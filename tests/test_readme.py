"""The README's results-schema table is the schema in code (ltssl/results.py), column for column."""

import re
from pathlib import Path

from ltssl.results import RESULTS_SCHEMA

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_documents_every_results_column():
    documented = re.findall(r"^\| `([a-z_0-9]+)` \| ([^|]+?) \|", README.read_text(), flags=re.M)
    assert documented == [(f.name, str(f.type)) for f in RESULTS_SCHEMA]
