"""What run profiles (pipelines/) and training configs (model/) share: strict YAML settings.

Both are YAML validated by pydantic with unknown keys forbidden, and both take command-line
overrides `--set dotted.key=value`. These two helpers are that shared part; each caller wraps the
errors in its own exception type.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` override to `data` in place; the value is parsed as YAML.

    Raises ValueError for an assignment without `=` or one that walks into a value.
    """
    import yaml

    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set expects dotted.key=value, got {assignment!r}")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ValueError(f"--set {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def validation_problems(exc) -> list[str]:
    """A pydantic ValidationError as one line per problem, each naming its key."""
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown key {where!r}")
        elif err["type"] == "missing":
            problems.append(f"missing key {where!r}")
        else:
            message = err["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {message}" if where else message)
    return problems


def describe_validation_error(exc) -> str:
    """The problems of a ValidationError as an indented block, one per line."""
    return "\n".join(f"  {problem}" for problem in validation_problems(exc))


def resolve_named_yaml(name_or_path: str, folder: Path, what: str) -> Path:
    """A YAML file given by path, or by name from `folder` (`local` -> folder/local.yaml).

    Raises LookupError saying what is missing, listing the names `folder` offers.
    """
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise LookupError(f"{what} file not found: {path}")
        return path
    candidate = folder / f"{name_or_path}.yaml"
    if not candidate.is_file():
        available = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise LookupError(f"unknown {what} {str(name_or_path)!r}; available: {available}")
    return candidate


def validate_settings(model_cls, data: Any, overrides, *, what: str, where: str):
    """`data` with the `--set` overrides applied, validated as `model_cls` (a pydantic model).

    Raises ValueError naming every bad key, e.g. "invalid profile local.yaml:\n  unknown key 'x'".
    """
    from pydantic import ValidationError

    if not isinstance(data, dict):
        raise ValueError(f"{where}: a {what} is a YAML mapping")
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"invalid {what} {where}:\n{describe_validation_error(exc)}") from None
