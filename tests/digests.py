"""The sha256 fixtures of the generated datasets: files in the format `sha256sum */*` prints in a folder holding
<task>/ folders (`sha256sum -c` checks such a folder against one)."""
import hashlib


def recorded(fixture):
    """{"<task>/<file>": sha256 hex digest} of a fixture file."""
    return dict(line.split("  ")[::-1] for line in fixture.read_text().splitlines())


def written(folder):
    """{"<task>/<file>": sha256 hex digest} of every file in folder's <task>/ folders."""
    return {f"{path.parent.name}/{path.name}": hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.glob("*/*"))}
