"""The command line of a script that writes one generated page: rewrite it, or with --check only compare."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def page_main(description: str, page: Path, render: Callable[[], str], command: str, repo: Path,
              argv: list[str] | None = None) -> int:
    """Exit status: with `--check`, 1 when `page` differs from `render()`; else `page` is rewritten."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when the page is stale")
    args = parser.parse_args(argv)
    fresh = render()
    if args.check:
        if not page.is_file() or page.read_text() != fresh:
            print(f"{page.relative_to(repo)} is stale; run `{command}`", file=sys.stderr)
            return 1
        return 0
    page.write_text(fresh)
    print(f"{page.relative_to(repo)} rewritten")
    return 0
