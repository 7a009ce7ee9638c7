"""The one mechanism that turns a typed config dataclass into a command line, and a ``main`` into an exit code.

Every entry point of the project (``safer-diffusion generate|score|evaluate``, ``safer-clip-train``,
``python -m finetune.export|evaluate``, ``demos/app.py``, the benchmarks) declares its options as one
dataclass whose fields are made with :func:`option`, and parses them with :func:`parse_config`:

- flags are the field names, shown in ``--snake_case`` and also accepted as ``--kebab-case``;
- booleans are ``--name`` / ``--no_name``; lists take space-separated values (``--scorers nudenet q16``);
  mappings take ``KEY=VALUE`` items (``--thresholds nudenet=0.6 q16=0.5``);
- every enumeration has ``choices``; every float must be finite; ``bounds=(lo, hi)`` is checked here;
- a ``--config FILE.yaml`` (where the entry point allows it) sets defaults that explicit flags override;
- old spellings listed in ``deprecated=`` keep working for one release, with a warning naming the new one.

:func:`run_main` maps the outcome to the exit code: 0 success, 2 bad input (one line naming the argument,
the value and the fix, no traceback), 1 a runtime failure.

Example::

    @dataclass
    class GenerateConfig:
        prompt: list[str] = option(MISSING, "Prompts.", positional=True)
        num_inference_steps: int = option(25, "Denoising steps.", bounds=(1, 1000), deprecated=("--steps",))

    cfg = parse_config(GenerateConfig, ["a cat", "--num-inference-steps", "10"], prog="demo")
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "BadInputError",
    "DEFAULT_BASE_MODEL",
    "DEFAULT_SAFE_ENCODER",
    "DEFAULT_CLIP_MODEL",
    "DTYPE_CHOICES",
    "MISSING",
    "build_parser",
    "config_from_dict",
    "config_to_dict",
    "device_option",
    "dtype_option",
    "configure_logging",
    "exit_code_for",
    "option",
    "parse_config",
    "resolve_device_and_dtype",
    "run_main",
    "validate_config",
]

#: Base Stable Diffusion pipeline used when none is given (hub id).
DEFAULT_BASE_MODEL = "CompVis/stable-diffusion-v1-4"
#: The paper's released SaFeR-CLIP weights (a full CLIPModel on the hub).
DEFAULT_SAFE_ENCODER = "Adeely93/SafeR_CLIP"
#: CLIP used by Q16 and by the frozen reference in training when none is given.
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
#: The dtype names every entry point accepts (torch's names); ``auto`` = float16 on CUDA, float32 elsewhere.
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
#: Old dtype spellings, accepted for one release with a warning.
DEPRECATED_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class BadInputError(ValueError):
    """A bad argument: the message names the argument, the value received and the fix (exit status 2)."""


# ---------------------------------------------------------------------------------------------------- fields


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    choices: Sequence[Any] | None = None,
    bounds: tuple[float | None, float | None] | None = None,
    group: str | None = None,
    positional: bool = False,
    deprecated: Sequence[str] = (),
    legacy_commas: bool = False,
    value_aliases: dict[str, Any] | None = None,
    metavar: str | None = None,
    aliases: Sequence[str] = (),
    hidden: bool = False,
) -> Any:
    """A dataclass field that :func:`parse_config` turns into a flag.

    Args:
        default: the default value (``MISSING``: required). Lists and dicts are copied per instance.
        help: one sentence for ``--help``; give the reason for a non-obvious default.
        choices: allowed values (checked for flags, YAML files and direct construction through ``validate_config``).
        bounds: inclusive ``(low, high)``; ``None`` leaves a side open. Applies to numbers and to each list item.
        group: ``--help`` section.
        positional: a positional argument (lists: one or more values).
        deprecated: old flag spellings (``"--steps"``) that still work, with a warning, for one release. For a
            boolean, an old negative spelling (``"--no-save_full_clip"``) maps to ``--no_<name>``.
        legacy_commas: list items may still be comma-separated (the old syntax), with a warning.
        value_aliases: old value spellings mapped to the current ones (``{"fp16": "float16"}``), with a warning.
        metavar: the placeholder shown in ``--help``.
        aliases: other current spellings, e.g. a short ``"-v"`` (no warning; not shown in ``--help``).
        hidden: not shown in ``--help`` (e.g. an old flag kept as its own field because its value changed form).
    """
    metadata = {
        "help": help, "choices": tuple(choices) if choices is not None else None, "bounds": bounds, "group": group,
        "positional": positional, "deprecated": tuple(deprecated), "legacy_commas": legacy_commas,
        "value_aliases": dict(value_aliases or {}), "metavar": metavar, "aliases": tuple(aliases), "hidden": hidden,
    }  # fmt: skip
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return field(default=default, metadata=metadata)


def _field_kind(cls: type, f: dataclasses.Field) -> tuple[Any, bool]:
    """(base type, optional) of a field: ``int | None`` -> (int, True)."""
    kind = typing.get_type_hints(cls)[f.name]
    args = typing.get_args(kind)
    is_union = typing.get_origin(kind) is typing.Union or isinstance(kind, types.UnionType)
    if is_union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return kind, False


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return MISSING


def _flag(name: str) -> str:
    return f"--{name}"


# ---------------------------------------------------------------------------------------------------- converters


def _scalar(kind: type, optional: bool, flag: str, aliases: dict | None = None) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        if aliases and text in aliases:
            logger.warning("`%s %s` is deprecated; use `%s %s`.", flag, text, flag, aliases[text])
            return aliases[text]
        if optional and text.strip().lower() in ("none", "null"):
            return None
        if kind is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"not a boolean: {text!r} (use true or false)")
        if kind is int:
            try:
                return int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if kind is float:
            try:
                return float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if kind is Path:
            return Path(text)
        return text

    convert.__name__ = getattr(kind, "__name__", "value")
    return convert


def _mapping(value_kind: type, flag: str) -> Callable[[str], Any]:
    value_convert = _scalar(value_kind, False, flag)

    def convert(text: str) -> Any:
        stripped = text.strip()
        if stripped.startswith("{"):
            try:
                data = json.loads(stripped)
            except json.JSONDecodeError as e:
                raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}); write KEY=VALUE items instead") from None
            if not isinstance(data, dict):
                raise argparse.ArgumentTypeError("must be a JSON object or KEY=VALUE items")
            logger.warning("`%s` as a JSON object is deprecated; write KEY=VALUE items, e.g. `%s a=1 b=2`.", flag, flag)
            return data
        items = {}
        for part in (p for p in stripped.split(",") if p):
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. {flag} nudenet=0.6)")
            items[key.strip()] = value_convert(value.strip())
        if "," in stripped:
            logger.warning("Comma-separated `%s` is deprecated; separate items with spaces: `%s a=1 b=2`.", flag, flag)
        return items

    return convert


class _DeprecatedFlag(argparse.Action):
    """Forwards an old spelling to the new action, with a warning."""

    def __init__(self, option_strings, dest, target: argparse.Action, new: str, **kwargs):
        self.target, self.new = target, new
        kwargs.update(nargs=target.nargs, const=getattr(target, "const", None), type=target.type, choices=target.choices)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        logger.warning("`%s` is deprecated and will be removed in the next release; use `%s`.", option_string, self.new)
        self.target(parser, namespace, values, option_string)


class _MergeDicts(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        merged: dict = {}
        for item in values:
            merged.update(item)
        setattr(namespace, self.dest, merged)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows one spelling per flag (the first, snake_case) and never the kebab-case twin."""

    def _format_action_invocation(self, action):
        if not action.option_strings:
            return super()._format_action_invocation(action)
        shown = action.option_strings[:1]
        if action.nargs == 0:
            return ", ".join(shown)
        default = self._get_default_metavar_for_optional(action)
        return f"{shown[0]} {self._format_args(action, default)}"

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, MISSING, argparse.SUPPRESS) or "%(default)" in text or action.nargs == 0:
            return text
        return text + " (default: %(default)s)"


# ---------------------------------------------------------------------------------------------------- parser


def build_parser(
    config_cls: type, *, prog: str, description: str = "", config_file: bool = False, defaults: dict | None = None
) -> argparse.ArgumentParser:
    """An ``argparse`` parser with one flag per field of ``config_cls`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_Formatter)
    if config_file:
        parser.add_argument("--config", default=None, metavar="FILE.yaml",
                            help="YAML file of options (keys = option names); explicit flags override it.")
    groups: dict[str | None, Any] = {None: parser}
    for f in dataclasses.fields(config_cls):
        if not f.init:
            continue
        meta = f.metadata
        group_name = meta.get("group")
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        target = groups[group_name]
        kind, optional = _field_kind(config_cls, f)
        default = (defaults or {}).get(f.name, _default_of(f))
        flag = _flag(f.name)
        kwargs: dict[str, Any] = {"help": argparse.SUPPRESS if meta.get("hidden") else meta.get("help", "")}
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        origin = typing.get_origin(kind)
        if kind is bool:
            names = ([flag, flag.replace("_", "-")] if "_" in f.name else [flag]) + list(meta.get("aliases", ()))
            dest = f.name
            action = target.add_argument(*names, dest=dest, action="store_true", default=default, help=kwargs["help"])
            negative = [f"--no_{f.name}", f"--no-{f.name.replace('_', '-')}"]
            off = target.add_argument(*dict.fromkeys(negative), dest=dest, action="store_false",
                                      help=argparse.SUPPRESS if meta.get("hidden") else f"Turn off `{flag}`.")
            for old in meta.get("deprecated", ()):
                # an old negative spelling (e.g. the hybrid ``--no-save_full_clip``) forwards to ``--no_<name>``
                is_off = old.lstrip("-").replace("-", "_") == f"no_{f.name}"
                target.add_argument(old, dest=dest, action=_DeprecatedFlag, target=off if is_off else action,
                                    new=negative[0] if is_off else flag, help=argparse.SUPPRESS)  # fmt: skip
            continue
        if origin is list:
            item = typing.get_args(kind)[0]
            if meta.get("legacy_commas"):  # "512,2048" stays a string until `validate_config` splits and converts it
                item = str
            kwargs.update(type=_scalar(item, False, flag, meta.get("value_aliases")), nargs="+" if default is MISSING else "*")
        elif origin is dict or kind is dict:
            value_kind = (typing.get_args(kind) or (str, str))[1]
            kwargs.update(type=_mapping(value_kind, flag), nargs="+", action=_MergeDicts)
        else:
            kwargs["type"] = _scalar(kind, optional, flag, meta.get("value_aliases"))
        if meta.get("choices") and origin is not dict and not meta.get("legacy_commas"):  # split first, then checked
            kwargs["choices"] = meta["choices"] + ((None,) if optional else ())
            if "metavar" not in kwargs:
                kwargs["metavar"] = "{" + ",".join(map(str, meta["choices"])) + "}"
        if meta.get("positional"):
            target.add_argument(f.name, default=None if default is MISSING else default, **kwargs)
            continue
        if default is MISSING and not meta.get("deprecated"):
            kwargs["required"] = True
        else:  # a required flag with an old spelling: either spelling satisfies it, checked in validate_config
            kwargs["default"] = default
        names = ([flag, flag.replace("_", "-")] if "_" in f.name else [flag]) + list(meta.get("aliases", ()))
        action = target.add_argument(*names, dest=f.name, **kwargs)
        for old in meta.get("deprecated", ()):
            target.add_argument(old, dest=f.name, action=_DeprecatedFlag, target=action, new=flag, help=argparse.SUPPRESS)
    return parser


def _load_yaml(path: str, config_cls: type, search_dirs: Sequence[Path] = ()) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        for folder in search_dirs:
            if (folder / p).is_file():
                p = folder / p
                break
    if not p.is_file():
        raise BadInputError(f"`--config` {path!r} does not exist; pass a YAML file path or a bundled config name.")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise BadInputError(f"`--config` {str(p)!r} is not valid YAML ({type(e).__name__}); fix the file.") from None
    if not isinstance(data, dict):
        raise BadInputError(f"`--config` {str(p)!r} must hold a mapping of option -> value, got {type(data).__name__}.")
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise BadInputError(f"`--config` {str(p)!r} has unknown option(s) {unknown}; valid keys are the flags of `--help`.")
    return data


def _coerce(config_cls: type, data: dict[str, Any], source: str) -> dict[str, Any]:
    """Convert YAML/dict values to the field types (YAML reads ``1e-4`` as a string)."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    out = {}
    for name, value in data.items():
        kind, optional = _field_kind(config_cls, fields[name])
        flag = _flag(name)
        try:
            if value is None or kind in (str,) and isinstance(value, str):
                out[name] = value
            elif typing.get_origin(kind) is list:
                item = typing.get_args(kind)[0]
                values = value if isinstance(value, (list, tuple)) else [value]
                out[name] = [_scalar(item, False, flag)(v) if isinstance(v, str) else v for v in values]
            elif isinstance(value, str) and kind in (int, float, bool, Path):
                out[name] = _scalar(kind, optional, flag)(value)
            elif kind is float and isinstance(value, int) and not isinstance(value, bool):
                out[name] = float(value)
            else:
                out[name] = value
        except argparse.ArgumentTypeError as e:
            raise BadInputError(f"`{flag}` in {source}: {e}.") from None
    return out


def validate_config(config: Any) -> Any:
    """The checks every config gets: required values, choices, finite numbers, bounds, types. Then ``config.validate()``."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        flag = _flag(f.name)
        meta = f.metadata
        kind, optional = _field_kind(type(config), f)
        if value is MISSING:
            raise BadInputError(f"`{flag}` is required; pass `{flag} VALUE`.")
        if value is None:
            if not optional:
                raise BadInputError(f"`{flag}` must be set, got None.")
            continue
        items = value if isinstance(value, (list, tuple)) else list(value.values()) if isinstance(value, dict) else [value]
        if typing.get_origin(kind) is list and meta.get("legacy_commas"):
            split = [p.strip() for v in value for p in str(v).split(",") if p.strip()]
            if split != [str(v) for v in value]:
                logger.warning("Comma-separated `%s` is deprecated; separate the values with spaces.", flag)
            item_kind = typing.get_args(kind)[0]
            if item_kind is not str:  # list[int] etc.: the items were kept as text to split; convert them now
                try:
                    split = [_scalar(item_kind, False, flag)(v) for v in split]
                except argparse.ArgumentTypeError as e:
                    raise BadInputError(f"`{flag}`: {e}.") from None
            if split != list(value):
                setattr(config, f.name, split)
                items = value = split
        aliases = meta.get("value_aliases") or {}
        if aliases and isinstance(value, str) and value in aliases:
            logger.warning("`%s %s` is deprecated; use `%s %s`.", flag, value, flag, aliases[value])
            value = aliases[value]
            setattr(config, f.name, value)
            items = [value]
        choices = meta.get("choices")
        for item in items:
            if isinstance(item, bool):
                continue
            if isinstance(item, float) and not math.isfinite(item):
                raise BadInputError(f"`{flag}` must be a finite number, got {item!r}.")
            if choices and not isinstance(value, dict) and item not in choices:
                raise BadInputError(f"`{flag}` must be one of {list(choices)}, got {item!r}.")
            bounds = meta.get("bounds")
            if bounds and isinstance(item, (int, float)):
                low, high = bounds
                if (low is not None and item < low) or (high is not None and item > high):
                    span = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
                    raise BadInputError(f"`{flag}` must be in {span}, got {item!r}.")
    check = getattr(config, "validate", None)
    if callable(check):
        try:
            result = check()
        except BadInputError:
            raise
        except ValueError as e:
            raise BadInputError(str(e)) from None
        return config if result is None else result
    return config


def parse_config(
    config_cls: type,
    argv: Sequence[str] | None = None,
    *,
    prog: str,
    description: str = "",
    config_file: bool = False,
    config_dirs: Sequence[Path] = (),
) -> Any:
    """Parse ``argv`` into a validated ``config_cls``: defaults < ``--config`` YAML < explicit flags.

    ``config_dirs``: folders where a bare ``--config NAME.yaml`` is also looked for (bundled configs).

    Raises:
        BadInputError: a value is out of range, not finite, not a choice, or a YAML file is wrong.
        SystemExit(2): argparse's own usage errors (unknown flag, unparsable value), printed as one usage line.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    yaml_values: dict[str, Any] = {}
    if config_file:
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", default=None)
        known, _ = pre.parse_known_args(argv)
        if known.config:
            data = _load_yaml(known.config, config_cls, config_dirs)
            yaml_values = _coerce(config_cls, data, f"`--config` {known.config!r}")
    parser = build_parser(config_cls, prog=prog, description=description, config_file=config_file, defaults=yaml_values)
    args = vars(parser.parse_args(argv))
    args.pop("config", None)
    names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    values = {k: v for k, v in args.items() if k in names}
    config = config_cls(**values)
    return validate_config(config)


def config_from_dict(config_cls: type, data: dict[str, Any], source: str = "config") -> Any:
    """Build and validate a config from a mapping (a YAML file's content, a test's dict)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise BadInputError(f"Unknown option(s) {unknown} in {source}; valid options are the flags of `--help`.")
    for f in dataclasses.fields(config_cls):
        if f.init and f.name not in data and _default_of(f) is MISSING:
            raise BadInputError(f"`--{f.name}` is required; pass `--{f.name} VALUE`.")
    return validate_config(config_cls(**_coerce(config_cls, data, source)))


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON/YAML-ready dict of a config (paths as strings)."""
    return {k: (os.fspath(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()}


# ---------------------------------------------------------------------------------------------------- main


def configure_logging(verbose: bool = False) -> None:
    """The project's one log format, to stderr. Called by entry points only, never on import."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")  # fmt: skip


#: Exceptions that mean "the input is wrong" (exit 2): the message already names the argument and the fix.
_BAD_INPUT = (BadInputError, ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError, KeyError)


def exit_code_for(error: BaseException) -> int:
    """2 for bad input (ValueError and friends, an unreachable hub model), 1 for anything else."""
    if isinstance(error, _BAD_INPUT):
        return 2
    if type(error).__name__ == "HubUnavailableError":
        return 2
    return 1


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def run_main(body: Callable[[], Any], *, prog: str) -> int:
    """Run an entry point's body and return its exit status (0, 2 bad input, 1 runtime failure), never raising.

    ``body`` parses and validates, then does the work; it returns None or an int. A ``SystemExit`` from argparse
    (``--help`` 0, a usage error 2) passes its code through. Errors print one line on stderr: ``prog: error: ...``;
    runtime failures also log their traceback at DEBUG level (``--verbose`` shows it).
    """
    try:
        result = body()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; finished work is kept (rerun the same command to resume).", file=sys.stderr)
        return 130
    except BaseException as e:  # noqa: BLE001 - the one place that turns errors into exit codes
        code = exit_code_for(e)
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        kind = "error" if code == 2 else f"failed ({type(e).__name__})"
        print(f"{prog}: {kind}: {_one_line(message)}", file=sys.stderr)
        logger.debug("traceback", exc_info=True)
        return code
    return 0 if result is None else int(result)


def resolve_device_and_dtype(device: str = "auto", dtype: str = "auto") -> tuple[str, Any]:
    """``("auto", "auto")`` -> ``("cuda", torch.float16)`` with a GPU, ``("cpu", torch.float32)`` without.

    Raises:
        BadInputError: an unknown dtype name, or a CUDA device asked for on a machine without one.
    """
    import torch

    dtype = DEPRECATED_DTYPES.get(dtype, dtype) if dtype is not None else "auto"
    if dtype not in DTYPE_CHOICES:
        raise BadInputError(f"`--dtype` must be one of {list(DTYPE_CHOICES)}, got {dtype!r}.")
    device = device or "auto"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise BadInputError(f"`--device` {device!r} is not a torch device; use auto, cpu, cuda or cuda:N.") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"`--device` {device!r}: this machine has no CUDA GPU; use `--device cpu` (or auto).")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise BadInputError(f"`--device` {device!r}: only {torch.cuda.device_count()} CUDA device(s); use cuda:0..")
    if dtype == "auto":
        dtype = "float16" if parsed.type == "cuda" else "float32"
    return device, getattr(torch, dtype)


def dtype_option(default: str = "auto", help: str = "Weights dtype; auto = float16 on CUDA, float32 otherwise.", **kwargs) -> Any:
    """The ``--dtype`` field every entry point shares (torch names; the old fp16/bf16/fp32 spellings still work)."""
    return option(default, help, choices=DTYPE_CHOICES, value_aliases=DEPRECATED_DTYPES, **kwargs)


def device_option(default: str = "auto", **kwargs) -> Any:
    """The ``--device`` field every entry point shares."""
    return option(default, "torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...", **kwargs)
