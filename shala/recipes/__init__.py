"""Training recipes shipped with SHALA: YAML option files for ``--config NAME``.

``python -m shala.train --config long`` reads ``long.yaml`` from here; flags
given beside it still win. A ``--config`` value that names an existing file is
read as that file.
"""

from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent


def names() -> list:
    """The shipped recipes' names, sorted."""
    return sorted(p.stem for p in HERE.glob("*.yaml"))


def find(name: str) -> Optional[Path]:
    """The shipped recipe called ``name`` (``long`` or ``long.yaml``), or None."""
    path = HERE / (name if name.endswith(".yaml") else f"{name}.yaml")
    return path if "/" not in name and path.is_file() else None
