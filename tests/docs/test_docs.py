"""The README and docs/ are a manual generated from the results files: every generated
block is current, a changed number is caught, tables have no duplicate rows, local links
resolve, and nothing speaks of how the project was built."""

import re
import shutil
from pathlib import Path

import pytest

from docs import generate
from tests.helpers import ROOT

PAGES = generate.targets(ROOT)


def test_every_generated_block_matches_the_results_files(capsys):
    assert generate.main(["--check"]) == 0, capsys.readouterr().err


def test_a_changed_number_in_a_results_file_is_caught(tmp_path, capsys):
    for page in PAGES:
        dest = tmp_path / page.relative_to(ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(page, dest)
    shutil.copytree(
        ROOT / "bench" / "results",
        tmp_path / "bench" / "results",
        ignore=shutil.ignore_patterns("*_cells", "wandb", "*.png", "*.json"),
    )
    source = tmp_path / "bench" / "results" / "study_cls.md"
    text = source.read_text()
    row = next(
        line for line in text.splitlines() if line.startswith("| auto policy (1 proc) | 8 |")
    )
    changed = re.sub(
        r"\| (\d+\.\d) \(bn\)", lambda m: f"| {float(m[1]) - 5:.1f} (bn)", row, count=1
    )
    assert changed != row
    source.write_text(text.replace(row, changed))
    assert generate.main(["--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "README.md: bench/results/study_cls.md | after: The policy against the best" in err
    assert "docs/policy.md: bench/results/study_cls.md | after:" in err
    assert generate.main(["--root", str(tmp_path)]) == 0  # make docs
    assert changed in (tmp_path / "README.md").read_text()
    assert generate.main(["--check", "--root", str(tmp_path)]) == 0


def test_a_block_naming_a_missing_source_or_table_is_an_error(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "r.md").write_text("text\n\n| a |\n|---|\n| 1 |\n")
    page = tmp_path / "README.md"
    for spec, message in [
        ("bench/none.md", "does not exist"),
        ("bench/r.md | table: 2", "has 1 table"),
        ("bench/r.md | after: nothing", "no table after"),
    ]:
        page.write_text(f"<!-- generated: {spec} -->\n<!-- end generated -->\n")
        with pytest.raises(generate.DocsError, match=message):
            generate.main(["--root", str(tmp_path)])
    page.write_text("<!-- generated: bench/r.md | table: 1 -->\nold\n<!-- end generated -->\n")
    assert generate.main(["--root", str(tmp_path)]) == 0
    assert page.read_text() == (
        "<!-- generated: bench/r.md | table: 1 -->\n| a |\n|---|\n| 1 |\n<!-- end generated -->\n"
    )


def test_the_readme_is_a_manual():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_table_repeats_a_row(page):
    for _, table in generate._tables(page.read_text()):
        rows = [r for r in table.splitlines()[2:] if r.strip()]
        dupes = {r for r in rows if rows.count(r) > 1}
        assert not dupes, f"{page.name}: {sorted(dupes)[0][:100]}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_local_links_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name} links to {target}"


def test_nothing_speaks_of_how_the_project_was_built():
    """No tracker numbers or work periods in the manual, the code or the tests."""
    pattern = re.compile(r"\bissue \d+|\bissue's\b|\(issue\b|\bsession that\b", re.I)
    files = [*PAGES, *ROOT.glob("norms/**/*.py"), *ROOT.glob("trainer/**/*.py")]
    files += [
        *ROOT.glob("bench/*.py"),
        *ROOT.glob("tests/**/*.py"),
        *ROOT.glob("configs/**/*.yaml"),
    ]
    found = [
        f"{p.relative_to(ROOT)}:{i + 1}"
        for p in files
        if p.name != Path(__file__).name
        for i, line in enumerate(p.read_text().splitlines())
        if pattern.search(line)
    ]
    assert not found, found
