"""Print the third-party requirements (pinned in their pyproject.toml files) of the given packages.

The Dockerfiles install these in a layer of their own, before copying any source: it is rebuilt only
when a pyproject changes, and the three model images share it.
Usage: python deploy/containers/deps.py protos services/common services/lm ... > requirements.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def requirements(dirs: list[str]) -> list[str]:
    own = set()
    wanted: dict[str, str] = {}
    for directory in dirs:
        project = tomllib.loads((Path(directory) / "pyproject.toml").read_text())["project"]
        own.add(project["name"].lower())
        for requirement in project.get("dependencies", []):
            name = re.split(r"[=<>!~\[ ;]", requirement, maxsplit=1)[0].lower()
            wanted[name] = requirement
    return sorted(r for n, r in wanted.items() if n not in own)


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1:])))
