"""The user-facing documents: the version the README shows, the changelog, links that lead somewhere, and figures
that are rendered from recorded results (benchmarks/figures.py), not typed."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import minipissa

REPO = Path(__file__).resolve().parents[2]


def figures_module():
    spec = importlib.util.spec_from_file_location("figures", REPO / "benchmarks" / "figures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_and_the_changelog_show_the_installed_version():
    readme = (REPO / "README.md").read_text()
    assert f"**Version {minipissa.__version__}**" in readme.split("\n## ")[0]  # on the first screen
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert re.search(rf"^## {re.escape(minipissa.__version__)} — \d{{4}}-\d\d-\d\d$", changelog, re.M)


def test_relative_links_of_the_readme_lead_to_files_and_its_anchors_to_headings():
    readme = (REPO / "README.md").read_text()
    headings = {
        re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in re.findall(r"^#+ (.+)$", readme, re.M)
    }
    for target in re.findall(r"\]\(([^)\s]+)\)", readme):
        if target.startswith("http"):
            continue
        if target.startswith("#"):
            assert target[1:] in headings, target
        else:
            assert (REPO / target.split("#")[0]).exists(), target


def test_every_figure_block_is_as_its_results_render_it():
    figures = figures_module()
    assert figures.main(["--check"]) == 0  # a typed edit or a new run not yet rendered: `python benchmarks/figures.py`
    readme = (REPO / "README.md").read_text()
    assert {"example-gpt", "example-minilm", "step-gpu-7b", "qpissa-error"} <= set(
        re.findall(r"<!-- figure: ([\w-]+)", readme)
    )


def test_a_hand_edited_figure_is_found_stale():
    figures = figures_module()
    text = (REPO / "README.md").read_text()
    body = figures.BLOCK.search(text)
    assert body is not None
    edited = text[: body.start("body")] + body.group("body").replace("|", "| 1", 1) + text[body.end("body") :]
    rendered, stale = figures.render_document(edited)
    assert stale == [body.group("name")] and rendered == text
