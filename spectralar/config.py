"""params.yaml -> typed, frozen config objects.

Every section of params.yaml is a frozen dataclass. Loading is strict: an unknown key, a missing
key or a wrong type stops the stage before any work, with the key's full path in the message
(``train_tokenizer.lr: expected float, got 'fast'``). Defaults on the dataclasses exist for code
(tests, notebooks); params files must still spell every key out, so a params file is a complete
record of a run.

Values are checked where they are read, here, before any stage starts: the types by the
annotations; the ranges by each dataclass's ``__post_init__`` through :func:`require` (one line:
``train_tokenizer.lr: must be > 0, got -0.001``); and, for every numeric value, a floor that holds
for all of them (no params value is negative). A key given twice in one YAML mapping is an error
(PyYAML would keep the last silently), and values that only make sense together across sections
(N against the image size and the ω schedule) are checked before a stage that reads them starts.

Model modules define their own config dataclasses (``ProxyConfig``, ``TokenizerConfig`` ...);
this module only knows how to build any such dataclass from YAML and which section maps to which.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from spectralar.stages import STAGE_TABLE  # the light stage table: names, sections, config classes


class ConfigError(ValueError):
    """A params file that does not match the schema. The message starts with the key path."""


class FieldError(ValueError):
    """A value that a config dataclass refuses, raised by its ``__post_init__`` (through :func:`require`).
    The message starts with the field's name; :func:`build` prefixes the section, so the user reads
    the full key path: ``train_tokenizer.lr: must be > 0, got -0.001``."""

    def __init__(self, name: str, value: Any, allowed: str) -> None:
        super().__init__(f"{name}: must be {allowed}, got {value!r}")


def _bounds_text(at_least: Any, above: Any, at_most: Any, below: Any) -> str:
    """``>= 1``, ``> 0``, ``< 1``, ``in [0, 1)``: the allowed values, as the message states them."""
    lower = f">= {at_least}" if at_least is not None else f"> {above}" if above is not None else ""
    upper = f"<= {at_most}" if at_most is not None else f"< {below}" if below is not None else ""
    if lower and upper:
        left = f"[{at_least}" if at_least is not None else f"({above}"
        right = f"{at_most}]" if at_most is not None else f"{below})"
        return f"in {left}, {right}"
    return lower or upper


def require(obj: Any, *names: str, at_least: Any = None, above: Any = None, at_most: Any = None,
            below: Any = None, meaning: str = "") -> None:
    """Check that the fields ``names`` of dataclass ``obj`` lie within the given bounds.

    Tuples are checked item by item (``betas[1]``) and ``None`` (a documented "derive it") is
    skipped. ``meaning`` says what an edge value does (``0 = off``), for the message. Raises
    :class:`FieldError` naming the first offending field, its value and what is allowed.
    """
    allowed = _bounds_text(at_least, above, at_most, below) + (f" ({meaning})" if meaning else "")
    for name in names:
        value = getattr(obj, name)
        items = list(enumerate(value)) if isinstance(value, (tuple, list)) else [(None, value)]
        for index, item in items:
            if item is None:
                continue
            inside = ((at_least is None or item >= at_least) and (above is None or item > above)
                      and (at_most is None or item <= at_most) and (below is None or item < below))
            if not inside:
                raise FieldError(name if index is None else f"{name}[{index}]", item, allowed)


# --------------------------------------------------------------------------------------------
# Generic strict dataclass builder
# --------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return the (possibly converted) value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{path}: expected one of {choices}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_type, value_type = args or (Any, Any)
        return {_coerce(k, key_type, f"{path}"): _coerce(v, value_type, f"{path}.{k}") for k, v in value.items()}
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
            items = [_coerce(v, a, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            inner = args[0] if args else Any
            items = [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected bool, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected int, got {value!r}")
        return value
    if tp is float:
        # YAML reads ``1e-4`` as a string (YAML 1.1); accept numeric strings of that form only.
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected float, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected float, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected str, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported annotation {_type_name(tp)}")


# A dataclass field whose metadata holds this key is *derived*: its value is declared once, upstream,
# and read by the stage from the artefact it consumes (``spectralar.artifacts``), never written in a
# params file. The metadata value says where it comes from.
DERIVED_FROM = "derived_from"


def derived_fields(cls: type) -> dict[str, str]:
    """{field name: where its value comes from} for the derived fields of dataclass ``cls``."""
    return {f.name: f.metadata[DERIVED_FROM] for f in dataclasses.fields(cls) if DERIVED_FROM in f.metadata}


def build(cls: type, data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from a mapping, strictly (every field present, no extras).

    Derived fields (:data:`DERIVED_FROM`) must be absent and keep their defaults until the stage
    fills them in from its input artefacts; a params file that still sets one is an error naming the
    key and where the value now comes from.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    derived = derived_fields(cls)
    restated = sorted(set(data) & set(derived))
    if restated:
        name = restated[0]
        raise ConfigError(f"{path}.{name}: no longer a params key: its value comes from {derived[name]}; "
                          f"delete it from the params file")
    fields = [f for f in dataclasses.fields(cls) if f.init and f.name not in derived]
    names = {f.name for f in fields}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(names))})")
    missing = [f.name for f in fields if f.name not in data]
    if missing:
        raise ConfigError(f"{path}.{missing[0]}: missing key")
    kwargs = {f.name: _coerce(data[f.name], hints[f.name], f"{path}.{f.name}") for f in fields}
    try:
        obj = cls(**kwargs)
    except FieldError as err:  # the dataclass's own validation, naming its field
        raise ConfigError(f"{path}.{err}") from err
    except (ValueError, TypeError) as err:  # the dataclass's own validation, in its own words
        raise ConfigError(_with_key_path(str(err), cls, path)) from err
    _refuse_negative_numbers(kwargs, path)
    return obj


def _with_key_path(message: str, cls: type, path: str) -> str:
    """A dataclass's own message, led by the key path when it starts with one of its fields:
    ``ProxyConfig.base_channels must be >= 1, got 0`` -> ``proxy.base_channels: must be >= 1, got 0``,
    ``width (30) must be divisible by heads (4)`` -> ``generator.width: width (30) must be ...``;
    any other message as ``proxy: <message>``."""
    first, _, rest = message.partition(" ")
    name = first.removeprefix(f"{cls.__name__}.")
    if name not in {f.name for f in dataclasses.fields(cls)}:
        return f"{path}: {message}"
    return f"{path}.{name}: {rest if rest.startswith('must ') else message}"


def _refuse_negative_numbers(values: dict[str, Any], path: str) -> None:
    """The floor under every numeric params value, sizes, counts, rates, weights and seeds alike:
    none is meaningful below zero. It also covers a key whose dataclass checks nothing yet; the
    dataclasses add the stricter bounds (positive sizes, decays below 1, ...)."""
    for name, value in values.items():
        items = list(enumerate(value)) if isinstance(value, (tuple, list)) else [(None, value)]
        for index, item in items:
            if isinstance(item, (int, float)) and not isinstance(item, bool) and item < 0:
                key = f"{path}.{name}" if index is None else f"{path}.{name}[{index}]"
                raise ConfigError(f"{key}: must be >= 0 (no params value is negative), got {item!r}")


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain JSON/YAML-able structure (tuples become lists), as a params file spells it:
    derived fields (filled in by the stages from artefacts) are left out."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if DERIVED_FROM not in f.metadata}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------------
# Shared sections
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = CUDA when present

    def __post_init__(self) -> None:
        require(self, "seed", at_least=0, at_most=2**32 - 1, meaning="a 32-bit seed")


@dataclass(frozen=True)
class DataConfig:
    source: Literal["fashion_mnist", "imagefolder"] = "fashion_mnist"
    fashion_mnist_dir: str = "/usr/share/datasets/fashion-mnist"
    # ImageNet ILSVRC-2012 root (train/<wnid>/*.JPEG, val/ as class folders or flat + LOC_val_solution.csv)
    # or any class-per-folder tree.
    imagefolder_root: str = ""
    resolution: int = 32  # Fashion-MNIST: 28x28 placed in a resolution x resolution frame
    workers: int = 2
    shard_size: int = 10000  # images per shard
    shard_format: Literal["raw", "jpeg"] = "raw"  # raw uint8 arrays, or JPEG bytes (ImageNet)
    jpeg_quality: int = 95
    min_image_size: int = 8  # imagefolder: smaller sides are skipped (listed in the manifest)
    max_images_per_class: Optional[int] = None  # subset for quick runs; None = everything

    def __post_init__(self) -> None:
        require(self, "resolution", "workers", "shard_size", "min_image_size", at_least=1)
        require(self, "max_images_per_class", at_least=1, meaning="or null for all images")
        require(self, "jpeg_quality", at_least=1, at_most=100)
        if self.source == "imagefolder" and not self.imagefolder_root.strip():
            # Path("") is the working directory: prepare would scan the project itself as a dataset
            raise ValueError("imagefolder_root is empty but source is imagefolder: set data.imagefolder_root to "
                             "the dataset root (ImageNet's train/<wnid>/*.JPEG, or any class-per-folder tree)")


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"  # relative to the repository root (the stages' working dir)
    experiment: str = "spectralar"
    log_checkpoints: bool = False


# --------------------------------------------------------------------------------------------
# The params file
# --------------------------------------------------------------------------------------------

# Section name -> dataclass, or "module:Class" resolved on first use (model configs live beside
# their models). Adding a stage: README "Adding a stage".
SECTIONS: dict[str, type | str] = {
    "run": RunConfig,
    "data": DataConfig,
    "tracking": TrackingConfig,
    "proxy": "spectralar.models.proxy_vq:ProxyConfig",
    "tokenizer": "spectralar.models.tokenizer:TokenizerConfig",
    "generator": "spectralar.models.generator:GeneratorConfig",
    # one section per stage that has settings of its own: the stage table's ``config`` (in pipeline order)
    **{name: info.config for name, info in STAGE_TABLE.items() if info.config},
    # sweep name -> row name -> {"section.key": value} (DVC's -S overrides), and an optional
    # `seeds: [0, 1, 2]` list (each row at each run.seed); spectralar/sweep.py checks the structure
    "sweeps": dict[str, dict[str, dict[str, Any] | list[int]]],
}


def section_class(name: str) -> type:
    target = SECTIONS[name]
    if isinstance(target, str):
        module_name, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module_name), attr)
        SECTIONS[name] = target
    return target


@dataclass(frozen=True)
class Params:
    """All sections of one params file, typed. ``sections[name]`` is a frozen dataclass."""

    path: str
    sections: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["sections"][name]
        except KeyError:
            raise AttributeError(name) from None

    def subset(self, names: tuple[str, ...]) -> dict[str, Any]:
        return {n: to_dict(self.sections[n]) for n in names}

    def digest(self, names: tuple[str, ...]) -> str:
        """Content hash of the given sections (tags MLflow runs; order-independent)."""
        blob = json.dumps(self.subset(names), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice in one mapping is an error.

    PyYAML keeps the last of two equal keys silently, so a params file that sets ``lr`` twice would
    run with whichever came last. Merge keys (``<<: *anchor``) still override as YAML defines.
    """


class DuplicateKeyError(yaml.YAMLError):
    """A key written twice in one mapping (lines are 1-based)."""

    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(f"{line}: duplicate key {key!r} (first on line {first_line}); keep one")


def _construct_unique_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            seen = first_line.get(key)
        except TypeError:  # an unhashable key: the safe constructor refuses it below, in its own words
            continue
        if seen is not None:
            raise DuplicateKeyError(key, key_node.start_mark.line + 1, seen)
        first_line[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def read_yaml(path: str | Path) -> Any:
    """A YAML file through :class:`UniqueKeyLoader`; any problem is a one-line ConfigError naming the
    file and line (``params.yaml:12: duplicate key 'lr' (first on line 10); keep one``)."""
    path = Path(path)
    try:
        return yaml.load(path.read_text(), Loader=UniqueKeyLoader)  # a SafeLoader: plain data only
    except DuplicateKeyError as err:
        raise ConfigError(f"{path}:{err}") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        reason = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ConfigError(f"{where}: not valid YAML: {reason}") from err


def check_sections_together(params: "Params", reading: tuple[str, ...]) -> None:
    """Values of different sections that must fit together, checked before a stage that reads the
    sections ``reading`` starts (the CLI calls this; a stage that reads none of them is not stopped
    by a mismatch it cannot be affected by, e.g. ``prepare`` by the tokenizer's N).

    The tokenizer's image side comes from the prepared manifest, which holds ``data.resolution``;
    with it, the patch grid and the ω schedule of N tokens (eq. 9 generalised, or uniform) must
    exist. The stage checks the same against the artefacts it reads (``artifacts.tokenizer_config_for``).
    """
    if "tokenizer" not in reading:
        return
    tokenizer, resolution = params.tokenizer, params.data.resolution
    for key in ("patch_size", "encoder_patch_size"):
        patch = getattr(tokenizer, key)
        if patch is not None and resolution % patch:
            raise ConfigError(f"tokenizer.{key}: must divide data.resolution ({resolution}), got {patch}")
    nonuniform = tokenizer.nonuniform_mapping
    most = max(n for n in range(1, resolution + 1) if not nonuniform or n + n // 4 <= resolution)
    if tokenizer.num_tokens > most:
        schedule = "nonuniform (tokenizer.nonuniform_mapping: true; needs N + N//4 <= resolution)" if nonuniform \
            else "uniform (tokenizer.nonuniform_mapping: false; needs N <= resolution)"
        raise ConfigError(f"tokenizer.num_tokens: must be <= {most} for data.resolution {resolution} with the "
                          f"{schedule} ω schedule, got {tokenizer.num_tokens}")


def load_params(path: str | Path) -> Params:
    """Read and validate a whole params file. Raises ConfigError with the key path."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section (allowed: {', '.join(sorted(SECTIONS))})")
    missing = sorted(set(SECTIONS) - set(raw))
    if missing:
        raise ConfigError(f"{missing[0]}: missing section")
    sections = {name: _coerce(raw[name], section_class(name), name) for name in SECTIONS}
    return Params(path=str(path), sections=sections)
