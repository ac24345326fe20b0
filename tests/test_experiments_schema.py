"""The experiment config's JSON Schema: printed by `recsys experiment schema`, checked in as
docs/experiments.schema.json, and in agreement with the loader on good and bad configs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from recsys.cli import main
from recsys.experiments.config import (
    _EXPERIMENT,
    _HOLDOUT,
    _LAYER,
    _RANKER,
    _TOP,
    _VARIANT,
    ConfigError,
    config_from_dict,
)
from recsys.experiments.schema import REQUIRED, json_schema

ROOT = Path(__file__).resolve().parents[1]
jsonschema = pytest.importorskip("jsonschema")


def _docs_example() -> dict[str, Any]:
    text = (ROOT / "docs" / "experiments.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert block is not None
    return dict(json.loads(json.dumps(yaml.safe_load(block.group(1)), default=str)))  # YAML times -> text


MINIMAL = {"default_ranker": "a", "rankers": {"a": {"model": "current"}, "b": {"baseline": "popularity"}},
           "holdouts": [{"name": "h", "salt": "h1", "coverage": 0.01}],
           "layers": [{"name": "l", "salt": "l1", "experiments": [{"name": "e", "salt": "e1", "variants": [
               {"name": "control", "ranker": "a"}, {"name": "treatment", "ranker": "b", "weight": 2}]}]}]}


def _edit(path: str, value: Any) -> dict[str, Any]:
    """MINIMAL with `path` (dot/index path) set to value, or removed when value is ...."""
    config = json.loads(json.dumps(MINIMAL))
    *parents, last = re.findall(r"[^.\[\]]+", path)
    node = config
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    if value is ...:
        del node[int(last) if last.isdigit() else last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return dict(config)


def test_checked_in_schema_is_the_printed_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experiment", "schema"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed) == json_schema()
    checked_in = (ROOT / "docs" / "experiments.schema.json").read_text()
    assert checked_in == printed, "regenerate: recsys experiment schema > docs/experiments.schema.json"
    jsonschema.Draft202012Validator.check_schema(json_schema())


def test_schema_objects_have_the_loader_keys() -> None:
    schema = json_schema()
    defs = schema["$defs"]
    assert set(schema["properties"]) == _TOP
    for name, keys in (("ranker", _RANKER), ("holdout", _HOLDOUT), ("layer", _LAYER), ("experiment", _EXPERIMENT),
                       ("variant", _VARIANT)):
        assert set(defs[name]["properties"]) == keys and defs[name]["additionalProperties"] is False


@pytest.mark.parametrize("config", [MINIMAL, _docs_example()], ids=["minimal", "docs"])
def test_valid_configs_pass_both(config: dict[str, Any]) -> None:
    jsonschema.validate(config, json_schema())
    config_from_dict(config)


BAD = [
    ("unknown top key", "colour", "blue", "colour: unknown key"),
    ("unknown experiment key", "layers[0].experiments[0].covrage", 0.5, "layers[0].experiments[0].covrage: unknown key"),
    ("unit", "layers[0].experiments[0].unit", "device", "layers[0].experiments[0].unit: must be one of"),
    ("coverage", "layers[0].experiments[0].coverage", 1.5, "layers[0].experiments[0].coverage: must be in [0, 1]"),
    ("weight", "layers[0].experiments[0].variants[1].weight", 0, "layers[0].experiments[0].variants[1].weight: must be > 0"),
    ("one variant", "layers[0].experiments[0].variants[1]", ..., "layers[0].experiments[0].variants: needs at least two"),
    ("bad name", "layers[0].experiments[0].name", "a/b", "layers[0].experiments[0].name: 'a/b' is not a valid name"),
    ("reserved", "layers[0].experiments[0].name", "default", "layers[0].experiments[0].name: 'default' is reserved"),
    ("baseline", "rankers.b.baseline", "best", "rankers.b.baseline: unknown baseline"),
    ("model and baseline", "rankers.b.model", "v1", "rankers.b: set exactly one of model"),
    ("schema version", "schema", 2, "schema: unsupported schema 2"),
    ("buckets", "layers[0].experiments[0].layer_buckets", [0, 20000], "layers[0].experiments[0].layer_buckets: must be"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "path", "value", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_configs_fail_both_with_path_named_errors(case: str, path: str, value: Any, message: str) -> None:
    config = _edit(path, value)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, json_schema())
    with pytest.raises(ConfigError) as caught:
        config_from_dict(config)
    assert str(caught.value).startswith(message), str(caught.value)


@pytest.mark.parametrize(("where", "path"), [
    ("top", ""), ("holdout", "holdouts[0]"), ("layer", "layers[0]"), ("experiment", "layers[0].experiments[0]"),
    ("variant", "layers[0].experiments[0].variants[0]"),
])
def test_required_keys_agree(where: str, path: str) -> None:
    for key in REQUIRED[where]:
        config = _edit(f"{path}.{key}" if path else key, ...)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(config, json_schema())
        with pytest.raises(ConfigError, match=re.escape(key)):
            config_from_dict(config)
