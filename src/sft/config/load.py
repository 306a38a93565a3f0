"""Read a run config: YAML as people write it, dotted overrides, validation with every problem reported at once.

Each problem names its full key path, what was expected and, for a misspelt key, the closest valid one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from sft.config.schema import RunConfig
from sft.config.trl_args import check_train_section
from sft.errors import SftError, did_you_mean
from sft.runs import redact


class _Loader(yaml.SafeLoader):
    """YAML as people write it: `1e-4` is a float (PyYAML's YAML 1.1 rules would read it as a string), and a key
    given twice in one mapping is an error (PyYAML would silently keep the last value)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges; keys given beside it override
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = first_line.get(key)
            except TypeError:  # an unhashable key: PyYAML reports it below
                continue
            if seen is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first given on line {seen + 1}); expected each key once",
                    key_node.start_mark,
                )
            first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?(?:[eE][-+]?\d+)$|^[-+]?\d[\d_]*\.\d*$|^[-+]?\.\d+$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.learning_rate=1e-4` -> (["train", "learning_rate"], 1e-4); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise SftError(f"override {text!r}: expected KEY.PATH=VALUE, e.g. train.learning_rate=1e-4")
    try:
        value = yaml_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise SftError(f"override {text!r}: {where} is {child!r}, not a section with keys")
            node = child
        node[path[-1]] = value
    return raw


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SftError(f"config file not found: {path} (expected a YAML file, e.g. configs/tiny.yaml)")
    try:
        raw = yaml_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        raise SftError(
            f"{path}: not UTF-8: byte 0x{err.object[err.start]:02x} at offset {err.start} (line {line}); "
            "expected UTF-8 text - re-encode the file"
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SftError(f"{path}:{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    if raw is None:
        raise SftError(f"{path}: the file is empty; expected a mapping of sections (model, data, ...)")
    if not isinstance(raw, dict):
        raise SftError(f"{path}: expected a mapping of sections (model, data, ...), got {type(raw).__name__}")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config; every problem is reported in one `SftError`."""
    path = Path(path)
    raw = apply_overrides(read_yaml(path), overrides or [])
    config = validate_config(raw, source=str(path))
    if config.output.name is None:
        config.output.name = path.stem
    return config


def validate_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    problems: list[str] = []
    config = None
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as err:
        problems += [_describe(e) for e in err.errors()]
    train = raw.get("train") or {}
    if isinstance(train, dict):
        problems += check_train_section(train)  # by building the SFTConfig
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise SftError(f"{source}: {len(problems)} problem(s) in the config:\n{listing}")
    assert config is not None
    return config


def _describe(error: dict[str, Any]) -> str:
    loc = [str(p) for p in error["loc"]]
    key = ".".join(loc) or "<top level>"
    if error["type"] == "extra_forbidden":
        options = _fields_at(loc[:-1])
        hint = did_you_mean(loc[-1], options) if options else ""
        valid = f"; valid keys here: {', '.join(sorted(options))}" if options and not hint else ""
        return f"{key}: unknown key{hint}{valid}"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    given = error.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    return f"{key}: {error['msg']}{shown}"


def _fields_at(loc: list[str]) -> set[str]:
    """Field names of the pydantic model that sits at `loc` inside RunConfig, or empty if it is not a model."""
    model: Any = RunConfig
    for part in loc:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            return set()
        model = _model_in(field.annotation)
        if model is None:
            return set()
    return set(model.model_fields)


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def to_yaml(config: RunConfig) -> str:
    """The resolved config as saved in a run folder: secrets (hub tokens, tracker keys) are redacted."""
    return yaml.safe_dump(redact(config.model_dump(mode="json")), sort_keys=False)
