"""Experiment configuration: frozen dataclasses validated at construction, YAML read only in `load_config`.

The schema is documented in docs/experiments.md. In short:

    rankers:         name -> {model: VERSION|current, blender: DIR} or {baseline: popularity|random}
    default_ranker:  the ranker for traffic outside every experiment and holdout
    holdouts:        [{name, salt, unit, coverage, ranker}]  units kept out of every experiment
    layers:          [{name, salt, experiments: [...]}]      experiments in a layer never share a unit
    experiment:      {name, salt, unit, coverage, layer_buckets: [lo, hi], start, end, targeting,
                      force: {unit_id: variant}, variants: [{name, weight, ranker}]}  (first = control)

Every problem is a `ConfigFieldError` naming its path in the file
(`layers[0].experiments[1].variants[2].weight: must be > 0`), so a bad edit is refused with a message
that points at the line to fix.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

from recsys.errors import ConfigError

SCHEMA_VERSION = 1
_T = TypeVar("_T")
BUCKETS = 10_000  # assignment resolution: 0.01% of traffic
UNITS = ("user", "session", "request")
BASELINES = ("popularity", "random")
RESERVED = ("default", "holdout")  # label groups used by non-experiment traffic
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # no '/', '@', '#', ':' (label and hash separators)


class ConfigFieldError(ConfigError):
    """A config problem at a path in the file; `within(prefix)` re-roots it as loaders descend."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path = path
        self.problem = problem

    def within(self, prefix: str) -> ConfigFieldError:
        if not prefix:
            return self
        joined = f"{prefix}.{self.path}" if self.path and not self.path.startswith("[") else prefix + self.path
        return ConfigFieldError(joined, self.problem)


def _name(value: str, path: str) -> None:
    if not _NAME.match(value):
        raise ConfigFieldError(
            path, f"{value!r} is not a valid name: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )


@dataclass(frozen=True)
class RankerSpec:
    """What serves a variant: a registry model version (+ optional blender directory) or a baseline."""

    model: str | None = None  # registry version, or "current" (the registry's pointer)
    blender: str | None = None  # LightGBM ranker directory, when the version has no ranker/
    baseline: str | None = None

    def __post_init__(self) -> None:
        if (self.model is None) == (self.baseline is None):
            raise ConfigFieldError("", "set exactly one of model (a registry version) or baseline")
        if self.baseline is not None and self.baseline not in BASELINES:
            raise ConfigFieldError("baseline", f"unknown baseline {self.baseline!r}: use one of {', '.join(BASELINES)}")
        if self.blender is not None and self.model is None:
            raise ConfigFieldError("blender", "a blender needs a model version")
        if self.model is not None and not self.model.strip():
            raise ConfigFieldError("model", "must not be empty (a registry version or 'current')")

    def to_dict(self) -> dict[str, str]:
        return {k: v for k, v in (("model", self.model), ("blender", self.blender), ("baseline", self.baseline)) if v}


@dataclass(frozen=True)
class Variant:
    name: str
    ranker: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        _name(self.name, "name")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ConfigFieldError("weight", f"must be > 0, got {self.weight}")


@dataclass(frozen=True)
class Experiment:
    """One randomised comparison. `coverage` is the share of *all* units enrolled; the experiment
    draws them from its `layer_buckets` segment of the layer, so coverage <= segment share."""

    name: str
    salt: str
    variants: tuple[Variant, ...]
    unit: str = "user"
    coverage: float = 1.0
    layer_buckets: tuple[int, int] = (0, BUCKETS)
    start: datetime | None = None
    end: datetime | None = None
    targeting: Mapping[str, frozenset[str]] = field(default_factory=dict)  # key -> allowed values
    force: Mapping[str, str] = field(default_factory=dict)  # unit id -> variant (QA)

    def __post_init__(self) -> None:
        _name(self.name, "name")
        if self.name in RESERVED:
            raise ConfigFieldError("name", f"{self.name!r} is reserved: pick another experiment name")
        _name(self.salt, "salt")
        if self.unit not in UNITS:
            raise ConfigFieldError("unit", f"must be one of {', '.join(UNITS)}, got {self.unit!r}")
        lo, hi = self.layer_buckets
        if not 0 <= lo < hi <= BUCKETS:
            raise ConfigFieldError("layer_buckets", f"must be [lo, hi] with 0 <= lo < hi <= {BUCKETS}, got [{lo}, {hi}]")
        if not (math.isfinite(self.coverage) and 0 <= self.coverage <= 1):
            raise ConfigFieldError("coverage", f"must be in [0, 1], got {self.coverage}")
        if self.coverage > self.segment_share + 1e-12:
            raise ConfigFieldError(
                "coverage",
                f"{self.coverage} exceeds the share of the layer this experiment owns "
                f"(layer_buckets [{lo}, {hi}] = {self.segment_share}): widen layer_buckets or lower coverage",
            )
        if self.start is not None and self.end is not None and self.start >= self.end:
            raise ConfigFieldError("end", f"must be after start ({self.start.isoformat()})")
        if len(self.variants) < 2:
            raise ConfigFieldError("variants", "needs at least two variants (the first is the control)")
        seen: set[str] = set()
        for i, v in enumerate(self.variants):
            if v.name in seen:
                raise ConfigFieldError(f"variants[{i}].name", f"duplicate variant {v.name!r}")
            seen.add(v.name)
        self._check_weights()
        for key, allowed in self.targeting.items():
            if not allowed:
                raise ConfigFieldError(f"targeting.{key}", "needs at least one allowed value")
        for unit_id, variant in self.force.items():
            if variant not in seen:
                raise ConfigFieldError(f"force.{unit_id}", f"unknown variant {variant!r}: use one of {', '.join(seen)}")

    def _check_weights(self) -> None:
        """Weights must sum to a finite number, and every variant must own at least one bucket
        (a weight that rounds to 0 of BUCKETS would validate and then never be served)."""
        total = sum(v.weight for v in self.variants)
        if not math.isfinite(total):
            raise ConfigFieldError("variants", f"the weights sum to {total} (overflow): use relative weights such as 50/50 or 1/1")
        lo = 0
        for i, (v, hi) in enumerate(zip(self.variants, self.variant_thresholds, strict=True)):
            if hi <= lo:
                raise ConfigFieldError(
                    f"variants[{i}].weight",
                    f"{v.weight:g} of {total:g} gives variant {v.name!r} 0 of the {BUCKETS} assignment buckets "
                    f"(share {v.weight / total:.2e} < {1 / BUCKETS:g}), so it would never be served: raise its weight",
                )
            lo = hi

    @cached_property
    def segment_share(self) -> float:
        return (self.layer_buckets[1] - self.layer_buckets[0]) / BUCKETS

    @cached_property
    def coverage_threshold(self) -> int:
        """Enrolled iff coverage bucket < this (coverage relative to the segment, in buckets)."""
        return min(BUCKETS, round(self.coverage / self.segment_share * BUCKETS))

    @cached_property
    def variant_thresholds(self) -> tuple[int, ...]:
        """Cumulative upper bounds in [0, BUCKETS]: variant i owns [t[i-1], t[i])."""
        total = sum(v.weight for v in self.variants)
        out, acc = [], 0.0
        for v in self.variants:
            acc += v.weight
            out.append(round(acc / total * BUCKETS))
        out[-1] = BUCKETS
        return tuple(out)

    @property
    def control(self) -> str:
        return self.variants[0].name

    def expected_shares(self) -> dict[str, float]:
        total = sum(v.weight for v in self.variants)
        return {v.name: v.weight / total for v in self.variants}


@dataclass(frozen=True)
class Layer:
    """Experiments in one layer are mutually exclusive (disjoint `layer_buckets` of one layer hash)."""

    name: str
    salt: str
    experiments: tuple[Experiment, ...] = ()

    def __post_init__(self) -> None:
        _name(self.name, "name")
        _name(self.salt, "salt")
        spans = sorted((e.layer_buckets, i) for i, e in enumerate(self.experiments))
        for (a, i), (b, j) in itertools.pairwise(spans):
            if b[0] < a[1]:
                raise ConfigFieldError(
                    f"experiments[{max(i, j)}].layer_buckets",
                    f"{list(b)} overlaps experiments[{min(i, j)}] {list(a)}: experiments in a layer need disjoint buckets",
                )
        units = {e.unit for e in self.experiments}
        if len(units) > 1:
            j = next(i for i, e in enumerate(self.experiments) if e.unit != self.experiments[0].unit)
            raise ConfigFieldError(
                f"experiments[{j}].unit",
                f"experiments in one layer must share a unit (experiments[0] uses {self.experiments[0].unit!r}): "
                "put this experiment in another layer",
            )


@dataclass(frozen=True)
class Holdout:
    """A slice of units kept on `ranker` (default: the default ranker) outside every experiment."""

    name: str
    salt: str
    coverage: float
    unit: str = "user"
    ranker: str | None = None

    def __post_init__(self) -> None:
        _name(self.name, "name")
        _name(self.salt, "salt")
        if self.unit not in UNITS:
            raise ConfigFieldError("unit", f"must be one of {', '.join(UNITS)}, got {self.unit!r}")
        if not (math.isfinite(self.coverage) and 0 <= self.coverage <= 1):
            raise ConfigFieldError("coverage", f"must be in [0, 1], got {self.coverage}")

    @property
    def threshold(self) -> int:
        return round(self.coverage * BUCKETS)


@dataclass(frozen=True)
class ExperimentConfig:
    """The whole file. `version` is a hash of the canonical content (comments and formatting do not
    change it; any semantic edit does): it is logged with every exposure."""

    rankers: Mapping[str, RankerSpec]
    default_ranker: str
    layers: tuple[Layer, ...] = ()
    holdouts: tuple[Holdout, ...] = ()
    name: str = ""
    version: str = field(init=False, default="")

    def __post_init__(self) -> None:
        if not self.rankers:
            raise ConfigFieldError("rankers", "define at least one ranker")
        for name in self.rankers:
            _name(name, f"rankers.{name}")

        def ranker(name: str | None, path: str) -> None:
            if name is not None and name not in self.rankers:
                raise ConfigFieldError(path, f"unknown ranker {name!r}: define it under rankers ({', '.join(self.rankers)})")

        ranker(self.default_ranker, "default_ranker")
        salts: dict[str, str] = {}
        names: dict[str, str] = {}

        def unique(table: dict[str, str], value: str, path: str, what: str) -> None:
            if value in table:
                raise ConfigFieldError(path, f"{what} {value!r} is already used at {table[value]}: each must be unique")
            table[value] = path

        for h, hold in enumerate(self.holdouts):
            ranker(hold.ranker, f"holdouts[{h}].ranker")
            unique(salts, hold.salt, f"holdouts[{h}].salt", "salt")
            unique(names, hold.name, f"holdouts[{h}].name", "name")
        layer_names: dict[str, str] = {}
        for li, layer in enumerate(self.layers):
            unique(salts, layer.salt, f"layers[{li}].salt", "salt")
            unique(layer_names, layer.name, f"layers[{li}].name", "layer name")
            for ei, exp in enumerate(layer.experiments):
                at = f"layers[{li}].experiments[{ei}]"
                # Derived salts (salt/coverage, salt/variant) cannot collide: '/' is not allowed in names.
                unique(salts, exp.salt, f"{at}.salt", "salt")
                unique(names, exp.name, f"{at}.name", "name")
                for vi, v in enumerate(exp.variants):
                    ranker(v.ranker, f"{at}.variants[{vi}].ranker")
        object.__setattr__(self, "version", hashlib.sha256(self.canonical().encode()).hexdigest()[:12])

    def to_dict(self) -> dict[str, Any]:
        def when(t: datetime | None) -> str | None:
            return t.isoformat() if t is not None else None

        return {
            "schema": SCHEMA_VERSION,
            "name": self.name,
            "default_ranker": self.default_ranker,
            "rankers": {k: v.to_dict() for k, v in sorted(self.rankers.items())},
            "holdouts": [
                {"name": h.name, "salt": h.salt, "unit": h.unit, "coverage": h.coverage, "ranker": h.ranker}
                for h in self.holdouts
            ],
            "layers": [
                {
                    "name": layer.name,
                    "salt": layer.salt,
                    "experiments": [
                        {
                            "name": e.name, "salt": e.salt, "unit": e.unit, "coverage": e.coverage,
                            "layer_buckets": list(e.layer_buckets), "start": when(e.start), "end": when(e.end),
                            "targeting": {k: sorted(v) for k, v in sorted(e.targeting.items())},
                            "force": dict(sorted(e.force.items())),
                            "variants": [{"name": v.name, "weight": v.weight, "ranker": v.ranker} for v in e.variants],
                        }
                        for e in layer.experiments
                    ],
                }
                for layer in self.layers
            ],
        }

    def canonical(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def experiments(self) -> list[tuple[Layer, Experiment]]:
        return [(layer, e) for layer in self.layers for e in layer.experiments]

    def experiment(self, name: str) -> Experiment:
        for _, e in self.experiments():
            if e.name == name:
                return e
        known = ", ".join(e.name for _, e in self.experiments()) or "none"
        raise ConfigError(f"no experiment named {name!r} in the config (experiments: {known})")

    def used_rankers(self) -> set[str]:
        """Rankers some traffic can reach: what the service must have loaded."""
        used = {self.default_ranker}
        used.update(h.ranker for h in self.holdouts if h.ranker)
        used.update(v.ranker for _, e in self.experiments() for v in e.variants)
        return used


# --------------------------------------------------------------------------- the YAML edge

_TOP = {"schema", "name", "default_ranker", "rankers", "holdouts", "layers"}
_RANKER = {"model", "blender", "baseline"}
_HOLDOUT = {"name", "salt", "unit", "coverage", "ranker"}
_LAYER = {"name", "salt", "experiments"}
_EXPERIMENT = {"name", "salt", "unit", "coverage", "layer_buckets", "start", "end", "targeting", "force", "variants"}
_VARIANT = {"name", "weight", "ranker"}


def _mapping(value: Any, path: str, keys: set[str] | None = None, required: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigFieldError(path, f"must be a mapping, got {type(value).__name__}")
    if keys is not None:
        for key in value:
            if key not in keys:
                raise ConfigFieldError(_join(path, str(key)), f"unknown key (known: {', '.join(sorted(keys))})")
    for key in required:
        if value.get(key) is None:
            raise ConfigFieldError(_join(path, key), "is required")
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _list(value: Any, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigFieldError(path, f"must be a list, got {type(value).__name__}")
    return value


def _str(value: Any, path: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ConfigFieldError(path, f"must be text, got {type(value).__name__}")
    return str(value)


def _opt_str(value: Any, path: str) -> str | None:
    return None if value is None else _str(value, path)


def _num(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigFieldError(path, f"must be a number, got {value!r}")
    return float(value)


def parse_time(value: Any, path: str) -> datetime | None:
    """ISO-8601 (or a YAML timestamp/date); naive times are UTC."""
    if value is None:
        return None
    if isinstance(value, datetime):
        t = value
    elif isinstance(value, date):
        t = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            t = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ConfigFieldError(path, f"{value!r} is not an ISO-8601 time such as 2024-05-01T00:00:00Z") from None
    else:
        raise ConfigFieldError(path, f"must be an ISO-8601 time, got {type(value).__name__}")
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def _build(path: str, cls: Callable[..., _T], **kwargs: Any) -> _T:
    """Construct a dataclass, re-rooting its field errors at `path` (arguments are checked by the
    caller, whose errors already carry full paths)."""
    try:
        return cls(**kwargs)
    except ConfigFieldError as exc:
        raise exc.within(path) from None


def context_text(value: Any) -> str:
    """Targeting compares text: 1, 1.0 and '1' are the same value."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _experiment(raw: Any, at: str) -> Experiment:
    d = _mapping(raw, at, _EXPERIMENT, ("name", "salt", "variants"))
    variants = []
    for vi, rv in enumerate(_list(d["variants"], f"{at}.variants")):
        vp = f"{at}.variants[{vi}]"
        vd = _mapping(rv, vp, _VARIANT, ("name", "ranker"))
        variants.append(
            _build(
                vp, Variant, name=_str(vd["name"], f"{vp}.name"), ranker=_str(vd["ranker"], f"{vp}.ranker"),
                weight=_num(vd.get("weight", 1.0), f"{vp}.weight"),
            )
        )
    buckets = d.get("layer_buckets", [0, BUCKETS])
    if not (isinstance(buckets, list) and len(buckets) == 2 and all(isinstance(b, int) and not isinstance(b, bool) for b in buckets)):
        raise ConfigFieldError(f"{at}.layer_buckets", f"must be two integers [lo, hi] in [0, {BUCKETS}], got {buckets!r}")
    targeting: dict[str, frozenset[str]] = {}
    for key, allowed in _mapping(d.get("targeting") or {}, f"{at}.targeting").items():
        values = allowed if isinstance(allowed, list) else [allowed]
        for v in values:
            if isinstance(v, dict | list) or v is None:
                raise ConfigFieldError(f"{at}.targeting.{key}", f"values must be text or numbers, got {v!r}")
        targeting[str(key)] = frozenset(context_text(v) for v in values)
    force = {
        str(unit_id): _str(variant, f"{at}.force.{unit_id}")
        for unit_id, variant in _mapping(d.get("force") or {}, f"{at}.force").items()
    }
    return _build(
        at, Experiment,
        name=_str(d["name"], f"{at}.name"),
        salt=_str(d["salt"], f"{at}.salt"),
        variants=tuple(variants),
        unit=_str(d.get("unit", "user"), f"{at}.unit"),
        coverage=_num(d.get("coverage", 1.0), f"{at}.coverage"),
        layer_buckets=(buckets[0], buckets[1]),
        start=parse_time(d.get("start"), f"{at}.start"),
        end=parse_time(d.get("end"), f"{at}.end"),
        targeting=targeting,
        force=force,
    )


def config_from_dict(raw: Any) -> ExperimentConfig:
    """Build (and so validate) a config from parsed YAML/JSON."""
    d = _mapping(raw, "", _TOP, ("rankers", "default_ranker"))
    schema = d.get("schema", SCHEMA_VERSION)
    if schema != SCHEMA_VERSION:
        raise ConfigFieldError("schema", f"unsupported schema {schema!r}: this version reads schema {SCHEMA_VERSION}")
    rankers = {}
    for name, spec in _mapping(d["rankers"], "rankers").items():
        rp = f"rankers.{name}"
        sd = _mapping(spec, rp, _RANKER)
        rankers[str(name)] = _build(
            rp, RankerSpec,
            model=_opt_str(sd.get("model"), f"{rp}.model"),
            blender=_opt_str(sd.get("blender"), f"{rp}.blender"),
            baseline=_opt_str(sd.get("baseline"), f"{rp}.baseline"),
        )
    holdouts = []
    for hi, rh in enumerate(_list(d.get("holdouts"), "holdouts")):
        hp = f"holdouts[{hi}]"
        hd = _mapping(rh, hp, _HOLDOUT, ("name", "salt", "coverage"))
        holdouts.append(_build(
            hp, Holdout,
            name=_str(hd["name"], f"{hp}.name"), salt=_str(hd["salt"], f"{hp}.salt"),
            coverage=_num(hd["coverage"], f"{hp}.coverage"), unit=_str(hd.get("unit", "user"), f"{hp}.unit"),
            ranker=_opt_str(hd.get("ranker"), f"{hp}.ranker"),
        ))
    layers = []
    for li, rl in enumerate(_list(d.get("layers"), "layers")):
        lp = f"layers[{li}]"
        ld = _mapping(rl, lp, _LAYER, ("name", "salt"))
        experiments = tuple(
            _experiment(re_, f"{lp}.experiments[{ei}]") for ei, re_ in enumerate(_list(ld.get("experiments"), f"{lp}.experiments"))
        )
        layers.append(_build(
            lp, Layer, name=_str(ld["name"], f"{lp}.name"), salt=_str(ld["salt"], f"{lp}.salt"), experiments=experiments,
        ))
    return ExperimentConfig(
        rankers=rankers,
        default_ranker=_str(d["default_ranker"], "default_ranker"),
        layers=tuple(layers),
        holdouts=tuple(holdouts),
        name=_str(d.get("name", ""), "name"),
    )


def _unique_key_loader() -> Any:
    """A yaml SafeLoader that refuses duplicate mapping keys (plain YAML keeps the last one silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: Any, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key]}): keep one", key_node.start_mark)
            seen[key] = line
        return dict(loader.construct_mapping(node, deep=deep))

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return UniqueKeyLoader


def check_models(config: ExperimentConfig, registry: Path | str) -> list[str]:
    """Every ranker's model version (and blender directory) checked against a registry; -> lines.
    Raises ConfigError naming the ranker when a version is not registered."""
    from recsys.registry import Registry  # lazy: only `validate --registry` needs it

    reg = Registry(registry)
    if not reg.root.is_dir():
        raise ConfigError(f"--registry {registry} does not exist")
    lines = []
    for name, spec in config.rankers.items():
        if spec.model is None:
            continue
        version = reg.current() if spec.model == "current" else spec.model
        if version is None or version not in reg.versions():
            known = ", ".join(reg.versions()) or "none"
            raise ConfigError(f"rankers.{name}.model: {spec.model!r} is not a version in the registry {reg.root} "
                              f"(registered: {known}; current: {reg.current() or 'none'}). Fix: name a registered version")
        if spec.blender is not None and not Path(spec.blender).is_dir():
            raise ConfigError(f"rankers.{name}.blender: {spec.blender} is not a directory")
        lines.append(f"rankers.{name}: {spec.model} -> {version} (registered)")
    return lines


def parse_config(text: str, source: str = "<config>") -> ExperimentConfig:
    """YAML (or JSON) text -> a validated config; errors name `source` and the path inside it."""
    import yaml

    try:
        raw = yaml.load(text, Loader=_unique_key_loader())  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"experiment config {source}:{where}: not valid YAML ({problem}). Fix the syntax there.") from None
    try:
        return config_from_dict(raw)
    except ConfigFieldError as exc:
        raise ConfigError(f"experiment config {source}: {exc}") from None


def load_config(path: Path | str) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment config {path} does not exist: pass the YAML file (see docs/experiments.md)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"experiment config {path} cannot be read: {exc}") from None
    return parse_config(text, str(path))
