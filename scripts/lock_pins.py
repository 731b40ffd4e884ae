"""Print `name==version` from requirements/lock.txt for every package named in a names file (words; `#` comments).

    python3 scripts/lock_pins.py requirements/offline_bundle.txt > pins.txt

Exits with an error naming the packages the lock file does not pin. Used by the offline bundle scripts.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

LOCK = Path(__file__).resolve().parents[1] / "requirements" / "lock.txt"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.lower())


def main(names_file: str) -> None:
    lock = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            lock[_norm(name)] = f"{name}=={version.split(';')[0].strip()}"
    names = [w for line in Path(names_file).read_text().splitlines() for w in line.split("#")[0].split()]
    missing = [n for n in names if _norm(n) not in lock]
    if missing:
        sys.exit(f"not pinned in requirements/lock.txt: {missing}")
    print("\n".join(lock[_norm(n)] for n in names))


if __name__ == "__main__":
    main(sys.argv[1])
