"""Data shipped with SHALA (see README.md here for provenance and licence)."""

from pathlib import Path

HERE = Path(__file__).resolve().parent
BUNDLED = {"chaosnli-snli": f"chaosnli:{HERE / 'chaosnli_snli_subset.jsonl'}",
           "ambient-crowd": f"chaosnli:{HERE / 'ambient_crowd.jsonl'}"}
DEFAULT_DATASET = "bundled"


def resolve_dataset(spec: str) -> str:
    """Map ``bundled`` / ``bundled:NAME`` to the shipped file's ``KIND:PATH``; other specs pass through."""
    if spec == "bundled":
        return BUNDLED["chaosnli-snli"]
    if spec.startswith("bundled:"):
        name = spec.partition(":")[2]
        if name not in BUNDLED:
            raise ValueError(f"unknown bundled dataset {name!r}; bundled: {sorted(BUNDLED)}")
        return BUNDLED[name]
    return spec
