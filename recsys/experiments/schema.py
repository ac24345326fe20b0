"""The experiment config as a JSON Schema (draft 2020-12), for editors that validate and complete YAML.

Built from the same constants the loader checks (key sets, units, baselines, bucket count, name
pattern), and checked in as docs/experiments.schema.json (a test keeps the two in sync). The schema
is the editor's help; `recsys.experiments.config` stays the authority: it also checks what a schema
cannot say well (weights that round to zero buckets, overlapping layer buckets, rankers that exist)
and names the path of every problem in its error.

    # yaml-language-server: $schema=../docs/experiments.schema.json
"""

from __future__ import annotations

from typing import Any

from recsys.experiments import config as c

SCHEMA_ID = "https://recsys.local/schemas/experiments.schema.json"
# Keys the loader requires per object (config_from_dict / _experiment); a test omits each one.
REQUIRED = {
    "top": ("rankers", "default_ranker"),
    "holdout": ("name", "salt", "coverage"),
    "layer": ("name", "salt"),
    "experiment": ("name", "salt", "variants"),
    "variant": ("name", "ranker"),
}


def _obj(keys: set[str], required: tuple[str, ...], properties: dict[str, Any], description: str) -> dict[str, Any]:
    if set(properties) != keys:  # a key added to the loader must be described here
        raise AssertionError(f"schema properties {sorted(properties)} != loader keys {sorted(keys)}")
    return {"type": "object", "description": description, "additionalProperties": False,
            "required": list(required), "properties": properties}


def json_schema() -> dict[str, Any]:
    name = {"type": "string", "pattern": c._NAME.pattern, "description": "1-64 letters, digits, '_', '.', '-'"}
    share = {"type": "number", "minimum": 0, "maximum": 1}
    unit = {"enum": list(c.UNITS), "default": "user", "description": "what is randomised"}
    when = {"type": "string", "description": "ISO-8601 time (UTC when no offset), e.g. 2024-06-01T00:00:00Z"}
    ranker_ref = {"type": "string", "description": "a key of `rankers`"}
    scalar = {"type": ["string", "number", "boolean"]}
    defs = {
        "ranker": {
            **_obj(c._RANKER, (), {
                "model": {"type": "string", "minLength": 1, "description": "registry version, or 'current'"},
                "blender": {"type": "string", "description": "LightGBM ranker directory (needs model)"},
                "baseline": {"enum": list(c.BASELINES)},
            }, "a registry model version (+ optional blender) or a baseline"),
            "oneOf": [{"required": ["model"], "not": {"required": ["baseline"]}},
                      {"required": ["baseline"], "not": {"anyOf": [{"required": ["model"]}, {"required": ["blender"]}]}}],
        },
        "holdout": _obj(c._HOLDOUT, REQUIRED["holdout"], {
            "name": name, "salt": name, "unit": unit, "coverage": {**share, "description": "share of all units"},
            "ranker": {**ranker_ref, "description": "default: default_ranker"},
        }, "units kept out of every experiment"),
        "variant": _obj(c._VARIANT, REQUIRED["variant"], {
            "name": name, "ranker": ranker_ref,
            "weight": {"type": "number", "exclusiveMinimum": 0, "default": 1, "description": "relative share"},
        }, "one arm; the first variant is the control"),
        "experiment": _obj(c._EXPERIMENT, REQUIRED["experiment"], {
            "name": {**name, "not": {"enum": list(c.RESERVED)}}, "salt": name, "unit": unit,
            "coverage": {**share, "default": 1, "description": "share of all units enrolled (<= layer_buckets share)"},
            "layer_buckets": {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": c.BUCKETS}] * 2,
                              "minItems": 2, "maxItems": 2, "default": [0, c.BUCKETS],
                              "description": f"[lo, hi) of the layer's {c.BUCKETS} buckets; disjoint within a layer"},
            "start": when, "end": when,
            "targeting": {"type": "object", "additionalProperties": {
                "anyOf": [scalar, {"type": "array", "items": scalar, "minItems": 1}]},
                "description": "context key -> allowed value(s)"},
            "force": {"type": "object", "additionalProperties": {"type": "string"},
                      "description": "unit id -> variant name (QA; excluded from analysis)"},
            "variants": {"type": "array", "minItems": 2, "items": {"$ref": "#/$defs/variant"}},
        }, "one randomised comparison"),
        "layer": _obj(c._LAYER, REQUIRED["layer"], {
            "name": name, "salt": name, "experiments": {"type": "array", "items": {"$ref": "#/$defs/experiment"}},
        }, "experiments in one layer are mutually exclusive"),
    }
    top = _obj(c._TOP, REQUIRED["top"], {
        "schema": {"const": c.SCHEMA_VERSION},
        "name": {"type": "string"},
        "default_ranker": ranker_ref,
        "rankers": {"type": "object", "minProperties": 1, "additionalProperties": {"$ref": "#/$defs/ranker"}},
        "holdouts": {"type": "array", "items": {"$ref": "#/$defs/holdout"}},
        "layers": {"type": "array", "items": {"$ref": "#/$defs/layer"}},
    }, "recsys A/B experiment config (docs/experiments.md)")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
            "title": "recsys experiment config", **top, "$defs": defs}
