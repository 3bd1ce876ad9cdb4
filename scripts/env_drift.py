"""Print how the active environment differs from a constraints file: each pinned package installed at another version.

    python scripts/env_drift.py constraints/newest.txt

Exit status 0 always: drift is information (CI installs the newest releases the bounds allow and
tests them); the test suite decides whether the drift matters.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version


def pinned(path: Path) -> dict[str, str]:
    """{canonical name: version} of the `name==version` lines of a constraints file."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonicalize_name(name)] = version.strip()
    return pins


def installed() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def drift(pins: dict[str, str], have: dict[str, str]) -> list[str]:
    """One line per pinned package whose installed version differs (local labels like +cpu ignored)."""
    lines = []
    for name, want in sorted(pins.items()):
        got = have.get(name)
        if got is None or Version(want).public != Version(got).public:
            lines.append(f"  {name}: pinned {want}, installed {got or 'nothing'}")
    return lines


def main(argv: list[str]) -> int:
    path = Path(argv[1] if len(argv) > 1 else "constraints/newest.txt")
    lines = drift(pinned(path), installed())
    print(f"environment vs {path}: " + ("identical" if not lines else f"{len(lines)} differences"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
