"""Fill the README's and docs' generated blocks from the results files (``make docs``).

A block is written between two markers that name its source::

    <!-- generated: bench/results/study_cls.md | after: The policy against the best -->
    ...replaced by the selected part of the source...
    <!-- end generated -->

Selectors: none (the whole file), ``table: N`` (the N-th markdown table, from 1), or
``after: TEXT`` (the first table after the line that starts with TEXT).  Sources are the
markdown files the benches and studies write from their JSON, so a figure in the docs is
always the one in bench/results/.  ``--check`` changes nothing and exits 1 naming every
block that differs (``make test`` runs it).

    python docs/generate.py            # rewrite the blocks in place
    python docs/generate.py --check    # fail if any block is stale
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(
    r"(<!-- generated: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S
)


class DocsError(ValueError):
    pass


def targets(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def _tables(text: str) -> list[tuple[int, str]]:
    """(first line index, table text) for each markdown table in ``text``."""
    lines, found, start = text.splitlines(), [], None
    for i, line in enumerate([*text.splitlines(), ""]):
        if line.startswith("|") and start is None:
            start = i
        elif not line.startswith("|") and start is not None:
            found.append((start, "\n".join(lines[start:i])))
            start = None
    return found


def select(root: Path, spec: str) -> str:
    """The text a block's spec names (``path[ | selector]``)."""
    path, _, selector = (part.strip() for part in spec.partition("|"))
    source = root / path
    if not source.is_file():
        raise DocsError(f"generated block names {path}, which does not exist")
    text = source.read_text().strip()
    if not selector:
        return text
    kind, _, arg = (part.strip() for part in selector.partition(":"))
    tables = _tables(text)
    if kind == "table":
        n = int(arg)
        if not 1 <= n <= len(tables):
            raise DocsError(f"{path} has {len(tables)} table(s), not {n}")
        return tables[n - 1][1]
    if kind == "after":
        lines = text.splitlines()
        at = next((i for i, line in enumerate(lines) if line.startswith(arg)), None)
        table = next((t for start, t in tables if at is not None and start > at), None)
        if table is None:
            raise DocsError(f"{path}: no table after a line starting {arg!r}")
        return table
    raise DocsError(f"unknown selector {selector!r} in a block naming {path}")


def render(root: Path, text: str) -> tuple[str, list[str]]:
    """``text`` with every block refilled, and the specs of the blocks that changed."""
    changed = []

    def fill(m: re.Match) -> str:
        body = select(root, m["spec"]) + "\n"
        if body != m["body"]:
            changed.append(m["spec"])
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(fill, text), changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a block is stale")
    ap.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    stale = []
    for path in targets(a.root):
        text = path.read_text()
        new, changed = render(a.root, text)
        name = path.relative_to(a.root)
        stale += [f"{name}: {spec}" for spec in changed]
        if changed and not a.check:
            path.write_text(new)
            print(f"{name}: {len(changed)} block(s) regenerated")
    if a.check and stale:
        print("stale generated blocks (run `make docs`):\n  " + "\n  ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
