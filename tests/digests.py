"""The sha256 fixtures of the generated datasets: files in the format `sha256sum */*` prints in a folder holding
<task>/ folders (`sha256sum -c` checks such a folder against one)."""
import hashlib
from pathlib import Path

# `python data.py --task all --out_dir DIR --bins 3` at the default seed (tests/test_data.py says why it matters).
DATA_SHA256 = Path(__file__).resolve().parent / "fixtures" / "data_sha256.txt"


def recorded(fixture):
    """{"<task>/<file>": sha256 hex digest} of a fixture file."""
    return dict(line.split("  ")[::-1] for line in fixture.read_text().splitlines())


def written(folder):
    """{"<task>/<file>": sha256 hex digest} of every file in folder's <task>/ folders."""
    return {f"{path.parent.name}/{path.name}": hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.glob("*/*"))}
