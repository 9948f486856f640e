"""The README's results table is what `aead results` prints for the committed metrics, so it cannot go stale."""

from __future__ import annotations

from aead.params import load_params
from aead.evaluation.results import results_markdown


def test_readme_results_table_is_aead_results_of_the_committed_run(repo_root):
    readme = (repo_root / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(readme) if line.startswith("**Results of the default run**"))
    first = next(i for i in range(start, len(readme)) if readme[i].startswith("| map |"))
    end = next(i for i in range(first, len(readme)) if not readme[i].startswith("|"))
    expected = results_markdown(repo_root / "metrics", load_params(repo_root / "params.yaml").evaluate.confidence)
    assert "\n".join(readme[first:end]) == expected, "README table differs from `aead results`: paste its output"
