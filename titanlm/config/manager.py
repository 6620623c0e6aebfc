"""Build a `JobConfig` from dataclass defaults, a TOML file and CLI flags (CLI > TOML > default).

Everything here is derived from the dataclasses in `job_config.py` (names, types, help, choices),
so a field added there is loadable, overridable, listed by `--help` and dumped with no change in
this file. Every error is a one-line `ConfigError` that names the key, where the value came from
and what to do about it.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from collections.abc import Callable
from functools import cache
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from titanlm.config.job_config import Check, JobConfig
from titanlm.errors import ConfigError

_CLI = "CLI"
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_EXPECTED = {int: "an integer", float: "a number", bool: "a boolean (true/false)", str: "a string"}


@dataclasses.dataclass(frozen=True)
class _Key:
    """One configurable field, with its annotation resolved to a real type."""

    section: str
    name: str
    type: Any
    default: Any
    help: str
    choices: tuple[str, ...] | None
    check: Check | None

    @property
    def path(self) -> str:
        return f"{self.section}.{self.name}"

    def element(self) -> _Key:
        """The key as seen by one element of a list field."""
        return dataclasses.replace(self, type=typing.get_args(self.type)[0], choices=None)


def _is_list(typ: Any) -> bool:
    return typing.get_origin(typ) is list


@cache
def _schema() -> dict[str, dict[str, _Key]]:
    """section -> field -> _Key. `from __future__ import annotations` leaves annotations as
    strings, so the types come from `typing.get_type_hints`."""
    schema: dict[str, dict[str, _Key]] = {}
    section_types = typing.get_type_hints(JobConfig)
    for section in dataclasses.fields(JobConfig):
        cls = section_types[section.name]
        hints = typing.get_type_hints(cls)
        defaults = cls()
        schema[section.name] = {
            f.name: _Key(
                section.name,
                f.name,
                hints[f.name],
                getattr(defaults, f.name),
                f.metadata.get("help", ""),
                f.metadata.get("choices"),
                f.metadata.get("check"),
            )
            for f in dataclasses.fields(cls)
        }
    return schema


def _type_name(typ: Any) -> str:
    return f"list[{typing.get_args(typ)[0].__name__}]" if _is_list(typ) else typ.__name__


def _expected(typ: Any) -> str:
    """The phrase after 'must be' in a type error."""
    if _is_list(typ):
        return f"a list of {typing.get_args(typ)[0].__name__} (or one comma-separated string)"
    return _EXPECTED[typ]


def _section(section: str, source: str) -> dict[str, _Key]:
    """The keys of a section, or a ConfigError that suggests the closest section name."""
    schema = _schema()
    if section not in schema:
        close = difflib.get_close_matches(section, list(schema), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"valid sections: {', '.join(schema)}"
        raise ConfigError(f"unknown config section '{section}' (from {source}); {hint}")
    return schema[section]


def _lookup(section: str, name: str, source: str) -> _Key:
    """The _Key for section.name, or a ConfigError that suggests the closest valid key."""
    keys = _section(section, source)
    if name not in keys:
        close = difflib.get_close_matches(name, list(keys), n=1)
        if close:
            hint = f"did you mean '{section}.{close[0]}'?"
        else:
            hint = f"valid keys of [{section}]: {', '.join(keys)}"
        raise ConfigError(f"unknown key '{section}.{name}' (from {source}); {hint}")
    return keys[name]


def _parse_text(key: _Key, text: str, source: str = _CLI) -> Any:
    """Convert a string from `source` (the CLI, or a TOML string for a list key) to the key's type;
    lists are comma-separated."""
    if _is_list(key.type):
        parts = text.split(",") if text.strip() else []
        return [_parse_text(key.element(), part.strip(), source) for part in parts]
    try:
        return _BOOL_WORDS[text.lower()] if key.type is bool else key.type(text)
    except (KeyError, ValueError):
        raise ConfigError(f"{key.path} must be {_expected(key.type)}, got {text!r} (from {source})") from None


def _choices_text(choices: tuple[str, ...]) -> str:
    """The allowed values as a user types them; the empty string (= "decide for me") is shown as ""."""
    return ", ".join(choice or '""' for choice in choices)


def _check_value(key: _Key, value: Any, source: str) -> Any:
    """Check a typed value against the key's type and choices. An int is accepted (and converted)
    for a float field, never a float for an int field, and a bool is never a number."""
    if _is_list(key.type):
        if isinstance(value, str):  # 'a,b' as on the CLI; also what configs dumped by older versions hold
            value = _parse_text(key, value, source)
        if not isinstance(value, list):
            raise ConfigError(f"{key.path} must be {_expected(key.type)}, got {value!r} (from {source})")
        return [_check_value(key.element(), v, source) for v in value]
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key.type is float and is_number:
        value = float(value)
    elif not isinstance(value, key.type) or (key.type is int and not is_number):
        raise ConfigError(f"{key.path} must be {_expected(key.type)}, got {value!r} (from {source})")
    if key.choices and value not in key.choices:
        allowed = _choices_text(key.choices)
        raise ConfigError(f"{key.path} must be one of {allowed}; got {value!r} (from {source})")
    return value


def _parse_cli(argv: list[str]) -> dict[str, Any]:
    """'section.field' -> checked value for `--s.f v`, `--s.f=v` and a bare `--s.f` bool flag."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options are written --section.field VALUE")
        flag, equals, text = arg[2:].partition("=")
        has_value = bool(equals)
        section, dot, name = flag.partition(".")
        if not dot:
            owners = [k.path for keys in _schema().values() for k in keys.values() if k.name == flag]
            hint = f"did you mean '--{owners[0]}'?" if owners else "run with --help to list them"
            raise ConfigError(f"option '--{flag}' (from {_CLI}) must be written --section.field; {hint}")
        key = _lookup(section, name, _CLI)
        if not has_value and i < len(argv) and not argv[i].startswith("--"):
            text, has_value = argv[i], True
            i += 1
        if not has_value and key.type is not bool:
            expects = _expected(key.type)
            raise ConfigError(f"missing value after --{key.path} (from {_CLI}); it expects {expects}")
        value = _parse_text(key, text) if has_value else True
        out[key.path] = _check_value(key, value, _CLI)
    return out


def _read_toml(path: str) -> dict[str, Any]:
    """'section.field' -> checked value from a TOML file, whose top level must be all tables. A UTF-8
    byte-order mark (what some Windows editors write) is allowed."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = tomllib.loads(f.read())
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist (from --job.config_file); check the path") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file '{path}': {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"invalid TOML in '{path}': {' '.join(str(e).split())}") from None
    out: dict[str, Any] = {}
    for section, table in data.items():
        _section(section, path)
        if not isinstance(table, dict):
            raise ConfigError(f"config section '{section}' in '{path}' must be a table ([{section}]), got {table!r}")
        for name, value in table.items():
            key = _lookup(section, name, path)
            out[key.path] = _check_value(key, value, path)
    return out


def _validate(cfg: JobConfig, origins: dict[str, str]) -> None:
    """Raise ConfigError for the first value outside its field's `check`, saying where it was set;
    then the one relation between keys that concerns the config file alone (warmup steps or ratio)."""

    def where(path: str) -> str:
        return f" (from {origins[path]})" if path in origins else ""

    for section, keys in _schema().items():
        if section == "grad_scaler" and cfg.training.mixed_precision_param != "float16":
            continue  # the loss scaler's ranges matter only in the one precision that scales the loss
        for key in keys.values():
            value = getattr(getattr(cfg, section), key.name)
            if key.check and not key.check.ok(value):
                note = f" ({key.check.note})" if key.check.note else ""
                raise ConfigError(f"{key.path} must be {key.check.must}{note}, got {value!r}{where(key.path)}")
    sched = cfg.lr_scheduler
    if sched.warmup_steps > 0 and sched.warmup_ratio > 0:
        raise ConfigError(
            "set one of lr_scheduler.warmup_steps or lr_scheduler.warmup_ratio, not both; got "
            f"warmup_steps={sched.warmup_steps}{where('lr_scheduler.warmup_steps')} and "
            f"warmup_ratio={sched.warmup_ratio}{where('lr_scheduler.warmup_ratio')}"
        )


def toml_value(value: Any) -> str:
    """A TOML literal of a config value (scalars and lists); floats use repr so that e.g. 1e-08, inf and nan
    read back exactly. The torchtitan peer benchmark writes its configs with it too."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = (
            f"\\{c}" if c in '"\\' else f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c for c in value
        )
        return f'"{"".join(escaped)}"'
    if isinstance(value, list):
        return f"[{', '.join(toml_value(v) for v in value)}]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def help_text() -> str:
    """Usage plus every key, grouped by section, generated from the dataclasses."""
    keys = [key for section in _schema().values() for key in section.values()]
    width = max(len(key.path) for key in keys) + 2
    lines = [
        "usage: python -m titanlm.train [-h] [--job.config_file FILE.toml] [--section.field VALUE ...]",
        "   or: torchrun --nproc_per_node N -m titanlm.train [the same flags]",
        "",
        "Values come from the dataclass defaults, then the TOML file, then these flags (which win).",
        "Write --section.field VALUE or --section.field=VALUE; a bool flag alone means true;",
        "list values are comma-separated.",
    ]
    for section, section_keys in _schema().items():
        lines += ["", f"[{section}]"]
        for key in section_keys.values():
            choices = f" [choices: {_choices_text(key.choices)}]" if key.choices else ""
            check = f" [must be {key.check.must}]" if key.check else ""
            lines.append(
                f"  --{key.path:<{width}}({_type_name(key.type)}, default: {toml_value(key.default)})  "
                f"{key.help}{choices}{check}"
            )
    return "\n".join(lines)


def reference_markdown() -> str:
    """The configuration table of docs/configuration.md, generated so the documentation cannot drift."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for section_keys in _schema().values():
        for key in section_keys.values():
            choices = f" ({_choices_text(key.choices)})" if key.choices else ""
            check = f" (must be {key.check.must})" if key.check else ""
            meaning = f"{key.help}{choices}{check}".replace("|", "\\|")
            lines.append(f"| `{key.path}` | {_type_name(key.type)} | `{toml_value(key.default)}` | {meaning} |")
    return "\n".join(lines)


def load_config(argv: list[str] | None = None) -> JobConfig:
    """The job configuration from argv (default: sys.argv[1:]): CLI > TOML file > defaults.

    `-h`/`--help` prints help_text() and exits 0; anything wrong raises ConfigError.
    """
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(help_text())
        raise SystemExit(0)
    cli = _parse_cli(argv)
    layers = [(cli, _CLI)]
    toml_path = cli.get("job.config_file", "")
    if toml_path:
        layers.insert(0, (_read_toml(toml_path), toml_path))
    cfg = JobConfig()
    origins: dict[str, str] = {}
    for values, source in layers:
        for path, value in values.items():
            section, name = path.split(".")
            setattr(getattr(cfg, section), name, value)
            origins[path] = source
    _validate(cfg, origins)
    return cfg


def _print_error(line: str) -> None:
    print(line, file=sys.stderr)


def load_config_or_exit(argv: list[str] | None = None, report: Callable[[str], None] = _print_error) -> JobConfig:
    """load_config for entry points: a ConfigError becomes one `config error: ...` line and exit 2.

    `report` writes the line: on stderr by default; the trainer passes one that writes it once per job.
    """
    try:
        return load_config(argv)
    except ConfigError as e:
        report(f"config error: {e}")
        raise SystemExit(2) from None


def config_to_dict(cfg: JobConfig) -> dict[str, dict[str, Any]]:
    """Plain nested dict of the config, for logging and JSON dumps."""
    return dataclasses.asdict(cfg)


def config_to_toml(cfg: JobConfig) -> str:
    """TOML text of every section and key; load_config reads it back to an equal JobConfig."""
    lines: list[str] = []
    for section, values in config_to_dict(cfg).items():
        lines += [f"[{section}]", *(f"{name} = {toml_value(v)}" for name, v in values.items()), ""]
    return "\n".join(lines)
