"""Offline check of a bundle's ``configs/metadata.json`` against the MONAI model-zoo requirements.

``python -m monai.bundle verify_metadata`` downloads the schema named by the metadata's ``schema``
URL unless ``--filepath`` already holds a file (then it is used as is, hash-checked only when
``--hash_val`` is given). The bundles therefore ship their schema as ``docs/meta_schema.json``,
and the offline command is (from the bundle folder)::

    python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath docs/meta_schema.json

:func:`check_metadata` is the same check for Python callers and tests, with every problem
reported (MONAI stops at the first one) as ``<file>: <JSON path>: <what is wrong>``. It adds two
consistency checks a JSON schema cannot express: the ``changelog`` has an entry for ``version``,
and every tensor's ``channel_def`` describes exactly channels ``0 .. num_channels - 1``.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

from medxfer.data.problems import DatasetError, read_json
from medxfer.workflows.bundle import BUNDLES_DIR

__all__ = ["SCHEMA_FILE", "default_schema_file", "check_metadata"]

#: The schema shipped with the ``msd_seg3d`` bundle (model-zoo required keys, tensor formats).
SCHEMA_FILE = BUNDLES_DIR / "msd_seg3d" / "docs" / "meta_schema.json"


def default_schema_file(meta_file: str | PathLike) -> Path:
    """``<bundle>/docs/meta_schema.json`` of the bundle holding ``meta_file`` (``<bundle>/configs/
    metadata.json``) when it exists, else :data:`SCHEMA_FILE`."""
    own = Path(meta_file).resolve().parent.parent / "docs" / "meta_schema.json"
    return own if own.is_file() else SCHEMA_FILE


def _json_path(path) -> str:
    """``$.network_data_format.inputs.image.num_channels`` / ``$.references[0]`` for a jsonschema path."""
    out = "$"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _schema_problems(meta, schema: dict, where: str) -> list[str]:
    from jsonschema.validators import validator_for

    cls = validator_for(schema)
    cls.check_schema(schema)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    problems = []
    for error in sorted(validator.iter_errors(meta), key=lambda e: [str(p) for p in e.absolute_path]):
        message, hint = error.message, error.schema.get("description") if isinstance(error.schema, dict) else None
        if error.validator in ("anyOf", "oneOf", "pattern") and hint:
            message += f" (expected: {hint})"
        problems.append(f"{where}: {_json_path(error.absolute_path)}: {message}")
    return problems


def _consistency_problems(meta: dict, where: str) -> list[str]:
    problems = []
    version, changelog = meta.get("version"), meta.get("changelog")
    if isinstance(version, str) and isinstance(changelog, dict) and version not in changelog:
        problems.append(f"{where}: $.changelog: no entry for the current version {version!r}")
    formats = meta.get("network_data_format")
    for side in ("inputs", "outputs"):
        tensors = formats.get(side) if isinstance(formats, dict) else None
        for name, spec in (tensors.items() if isinstance(tensors, dict) else ()):
            if not isinstance(spec, dict):
                continue
            n, channels = spec.get("num_channels"), spec.get("channel_def")
            if isinstance(n, int) and not isinstance(n, bool) and isinstance(channels, dict):
                expected = {str(i) for i in range(n)}
                if set(map(str, channels)) != expected:
                    problems.append(f"{where}: $.network_data_format.{side}.{name}.channel_def: describes channels "
                                    f"{sorted(channels, key=str)}, but num_channels is {n} (expected keys "
                                    f"{sorted(expected, key=int)})")
    return problems


def check_metadata(meta_file: str | PathLike, schema_file: str | PathLike | None = None) -> list[str]:
    """Problems of the bundle metadata ``meta_file``, one line each; an empty list means it is valid.

    Args:
        meta_file: a bundle's ``configs/metadata.json``.
        schema_file: JSON schema to check against; default :func:`default_schema_file` (the one the
            bundle ships, which is also what ``verify_metadata --filepath docs/meta_schema.json`` uses).

    Every line names the file and the JSON path of the problem, e.g.
    ``configs/metadata.json: $: 'version' is a required property`` or
    ``configs/metadata.json: $.network_data_format.inputs.image.num_channels: '1' is not of type 'integer'``.
    A missing or unparsable ``meta_file`` is reported the same way (one line). A missing or invalid
    ``schema_file`` raises (:class:`medxfer.data.problems.DatasetError` /
    ``jsonschema.SchemaError``): that is a fault of the caller, not of the metadata.
    """
    where = str(meta_file)
    schema_path = Path(schema_file) if schema_file is not None else default_schema_file(meta_file)
    schema = read_json(schema_path, "metadata schema not found")
    if not isinstance(schema, dict):
        raise DatasetError(schema_path, f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        meta = read_json(meta_file, "metadata file not found")
    except DatasetError as e:
        return [str(e)]
    problems = _schema_problems(meta, schema, where)
    if isinstance(meta, dict):
        problems += _consistency_problems(meta, where)
    return problems


if __name__ == "__main__":  # python -m medxfer.workflows.metadata configs/metadata.json [schema.json]
    import sys

    if not 2 <= len(sys.argv) <= 3:
        sys.exit("usage: python -m medxfer.workflows.metadata META_FILE [SCHEMA_FILE]")
    found = check_metadata(*sys.argv[1:])
    print("\n".join(found) if found else f"{sys.argv[1]}: ok")
    sys.exit(1 if found else 0)
