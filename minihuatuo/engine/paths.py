"""Where the bundled files are: `data/` (the world, the alias list) and `kernels/` (C++/CUDA sources).

A clone or an editable install (README's `pip install -e .`) reads them from the repository, next to
the package. A regular install (`pip install .`, a wheel) carries them as data files under
`<prefix>/share/minihuatuo/` (setup.cfg, [options.data_files]); a `--user` install under the user
base's `share/minihuatuo/`. The first of these that has the file wins.
"""
from __future__ import annotations

import os
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # minihuatuo/engine/paths.py → the repository


def share_dirs() -> list[Path]:
    """The install's share folders, the environment's first, then the user's."""
    dirs = [Path(sysconfig.get_path("data")) / "share" / "minihuatuo"]
    user_scheme = f"{os.name}_user"
    if user_scheme in sysconfig.get_scheme_names():
        dirs.append(Path(sysconfig.get_path("data", user_scheme)) / "share" / "minihuatuo")
    return dirs


def bundled(name: str, roots: list[Path] | None = None) -> Path:
    """`name` ("data/world", "kernels", ...) in the repository, else in an install's share folder.
    When none has it: the repository's path (the first root), so that an error names where a clone keeps it."""
    roots = roots if roots is not None else [REPO, *share_dirs()]
    for root in roots:
        if (root / name).exists():
            return root / name
    return roots[0] / name
