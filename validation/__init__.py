"""Publishing a build: the Great Expectations suites made from the schema (`echat validate`), the
quality report (`echat report`), the dataset card (`echat card`) and the Hub push (`echat push`).

`validate_build(out_dir)` is what `echat build` calls at its end.
"""

from __future__ import annotations


def validate_build(out_dir, **options):
    """Validate the build in `out_dir` (see validation/validate.py `validate_build`); returns a ValidationResult."""
    from .validate import validate_build as _validate_build

    return _validate_build(out_dir, **options)


__all__ = ["validate_build"]
