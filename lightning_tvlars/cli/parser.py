"""``TVLARSParser``: one-line errors and every ``tvlars`` field in ``--help``, for your own
LightningCLI, in one argument::

    from lightning.pytorch.cli import LightningCLI
    from lightning_tvlars.cli.parser import TVLARSParser

    LightningCLI(MyModel, MyData, parser_class=TVLARSParser)

A wrong value then ends the command with one line naming the flag, the value and what is
allowed (exit code 2), instead of jsonargparse's usage or a traceback::

    train.py fit: error: --model.tvlars.lr=-1.0 is invalid: expected a finite number > 0
    train.py fit: error: --model.tvlars.phase.mode=fited is invalid: expected one of 'fitted', ...
    train.py fit: error: --data.batch_size=0 is invalid: expected an int > 0

That covers the values jsonargparse refuses (types, choices, unknown options); the checks of
every ``TVLARSConfig`` argument of the model (or data, ...), right after parsing; the
``ValueError`` or ``TypeError`` that a class of the command (model, data, ...) raises while it
is built, named by its section; and the parameter patterns of a ``TVLARSMixin`` module
(``select``, ``exclude``, ``include``, ``overrides``), once it is built. ``JSONARGPARSE_DEBUG=true``
keeps jsonargparse's own reports and the tracebacks. Nothing else of the CLI changes: no
default, argument or callback is added.

``--help`` also lists the fields of a ``tvlars: TVLARSConfig | None = None`` argument, which
jsonargparse shows as one ``--model.tvlars TVLARS`` option (with a ``TVLARSConfig`` default it lists
them itself). :class:`~lightning_tvlars.cli.fit.TVLARSCLI` uses this parser too.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import textwrap
import types
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, Union, get_args, get_origin, get_type_hints

from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch.cli import LightningArgumentParser

from lightning_tvlars.optim.groups import GroupOverride
from lightning_tvlars.recipe import TVLARSConfig, groups_for


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def _debug() -> bool:
    """jsonargparse's debug mode (``JSONARGPARSE_DEBUG``): its reports and tracebacks, as is."""
    return os.environ.get("JSONARGPARSE_DEBUG", "").lower() not in ("", "false", "no", "0")


class TVLARSParser(LightningArgumentParser):
    """LightningCLI's parser with one-line errors (see the module docstring)."""

    # ------------------------------------------------------------------ reporting

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """jsonargparse's report of a wrong command line, as one line."""
        if not self.exit_on_error or _debug():
            super().error(message, ex)
        self._fail(self.one_line_error(message))

    def one_line_error(self, message: str) -> str:
        """jsonargparse's nested report ``message`` as one line (see :func:`one_line_error`)."""
        return one_line_error(message)

    def _fail(self, line: str) -> NoReturn:
        """End the command with ``line`` (exit code 2), or raise it without ``exit_on_error``."""
        if not self.exit_on_error:
            raise argparse.ArgumentError(None, line)
        self.exit(2, f"{self.prog.replace(' [options]', '')}: error: {line}\n")

    # ------------------------------------------------------------------ checking the configs

    def parse_args(self, *args: Any, **kwargs: Any) -> Namespace:  # type: ignore[override]
        """jsonargparse's ``parse_args``, then the checks of every ``TVLARSConfig`` argument."""
        cfg = super().parse_args(*args, **kwargs)
        self._check_parsed(cfg)
        return cfg

    def parse_object(self, *args: Any, **kwargs: Any) -> Namespace:
        """jsonargparse's ``parse_object``, then the checks of every ``TVLARSConfig`` argument."""
        cfg = super().parse_object(*args, **kwargs)
        self._check_parsed(cfg)
        return cfg

    def _check_parsed(self, cfg: Namespace) -> None:
        """Check every ``TVLARSConfig`` argument of a section (``model``, ...) now, to name the
        flag of a bad value: building the class would raise a traceback."""
        if _debug() or not isinstance(cfg, Namespace):
            return
        subcommands = next(
            (a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None
        )
        subcommand = cfg.get(subcommands.dest) if subcommands is not None else None
        if subcommands is not None and subcommand in subcommands.choices:
            subparser = subcommands.choices[subcommand]
            if isinstance(subparser, TVLARSParser):
                subparser._check_parsed(cfg[subcommand])
            return
        for key, section_class in self._section_classes(cfg).items():
            for name in tvlars_parameters(section_class):
                values = _init_args(cfg.get(key), name)
                if values is None:
                    continue
                try:
                    check_config(values)
                except (ValueError, TypeError) as err:
                    self._fail(flag_error(f"{key}.{name}", str(err)))

    def _section_classes(self, cfg: Namespace) -> dict[str, type]:
        """The class of each top-level section of ``cfg`` (``model``, ``data``, ...): a group
        of a class's arguments, or a ``class_path``."""
        classes = {}
        groups = self.groups or {}
        for key, value in vars(cfg).items():
            group_class = getattr(groups.get(key), "group_class", None)
            if isinstance(value, Namespace) and isinstance(value.get("class_path"), str):
                try:
                    classes[key] = _import(value["class_path"])
                except (ImportError, AttributeError, ValueError):
                    continue
            elif inspect.isclass(group_class):
                classes[key] = group_class
        return classes

    # ------------------------------------------------------------------ building the classes

    # jsonargparse >= 4.49 builds through ``instantiate`` (``instantiate_classes``, which
    # Lightning calls, is deprecated and calls it); older releases through
    # ``instantiate_classes``. Each parser builds its own subcommand's classes.
    if hasattr(ArgumentParser, "instantiate"):

        def instantiate(self, *args: Any, **kwargs: Any) -> Namespace:
            """jsonargparse's ``instantiate``, with a bad value reported in one line."""
            return self._instantiate_checked(super().instantiate, *args, **kwargs)

    else:  # pragma: no cover - jsonargparse < 4.49

        def instantiate_classes(self, *args: Any, **kwargs: Any) -> Namespace:
            """jsonargparse's ``instantiate_classes``, with a bad value reported in one line."""
            return self._instantiate_checked(super().instantiate_classes, *args, **kwargs)

    def _instantiate_checked(
        self, instantiate: Callable[..., Namespace], *args: Any, **kwargs: Any
    ) -> Namespace:
        """A ``ValueError`` or ``TypeError`` of a section's class (``--data.batch_size 0``)
        ends the command with one line naming the section, not a traceback."""
        # the config: the first argument ("namespace" since jsonargparse 4.50, "cfg" before)
        cfg = args[0] if args else kwargs.get("namespace", kwargs.get("cfg"))
        if _debug() or not isinstance(cfg, Namespace):
            return instantiate(*args, **kwargs)
        sections = self._section_classes(cfg)
        try:
            built = instantiate(*args, **kwargs)
        except (ValueError, TypeError) as err:
            # jsonargparse re-raises a class's error as the cause of its own report
            chain: list[BaseException] = [err]
            while isinstance(chain[-1].__cause__, (ValueError, TypeError)):
                chain.append(chain[-1].__cause__)
            for cause in reversed(chain):
                section = raising_section(cause, sections)
                if section is not None:
                    self._fail(flag_error(section, str(cause)))
            raise
        self._check_mixin_patterns(built, sections)
        return built

    def _check_mixin_patterns(self, built: Namespace, sections: dict[str, type]) -> None:
        """A ``TVLARSMixin`` module's patterns (select, exclude, include, overrides) must match
        its parameters: check them before training, to name the flag."""
        from lightning_tvlars.lightning.mixin import TVLARSMixin

        for key in sections:
            module = built.get(key)
            if isinstance(module, TVLARSMixin) and (
                type(module).configure_optimizers is TVLARSMixin.configure_optimizers
            ):
                try:
                    groups_for(module, module.tvlars_config)  # type: ignore[arg-type]
                except (ValueError, TypeError) as err:
                    self._fail(flag_error(f"{key}.tvlars", str(err)))

    # ------------------------------------------------------------------ help

    def format_help(self, *args: Any, **kwargs: Any) -> str:
        """jsonargparse's help, plus the fields of each ``TVLARSConfig | None`` argument (which
        it shows as one option)."""
        text = super().format_help(*args, **kwargs)
        for dest in self._optional_tvlars_dests():
            text += "\n" + optional_config_help(dest)
        return text

    def _optional_tvlars_dests(self) -> Iterator[str]:
        for action in self._actions:
            typehint = getattr(action, "_typehint", None)
            if (
                not action.dest.endswith(".help")  # jsonargparse >= 4.42: --model.tvlars.help
                and get_origin(typehint) in _UNIONS
                and TVLARSConfig in get_args(typehint)
                and f"--{action.dest}.lr" not in self._option_string_actions
            ):
                yield action.dest


_UNIONS = (Union, types.UnionType)  # Optional[X], X | None


def optional_config_help(dest: str) -> str:
    """The options of a ``TVLARSConfig | None`` argument ``dest``, as ``--help`` shows a
    ``TVLARSConfig`` one."""
    parser = ArgumentParser(prog="", add_help=False)
    parser.add_class_arguments(TVLARSConfig, dest, sub_configs=True)
    body = parser.format_help().split("\n\n", 1)[-1]  # without the usage lines
    # without its "--dest CONFIG" entry: the help above has the argument itself
    body = re.sub(rf"\n  --{re.escape(dest)} CONFIG\n(?: {{5,}}.*\n)*", "\n", body)
    header = textwrap.fill(
        f"--{dest} is null by default; any of these fields makes it a TVLARSConfig with "
        "the others at their defaults:",
        width=79,
    )
    return f"{header}\n\n{body}"


# ---------------------------------------------------------------------- the messages


def _init_args(section: object, name: str) -> dict[str, Any] | None:
    """The parsed fields of argument ``name`` of a section (a class's group, or ``class_path``
    and ``init_args``), or None when it is null or already an object."""
    if not isinstance(section, Namespace):
        return None
    init_args = section.get("init_args") if "class_path" in section else section
    value = init_args.get(name) if isinstance(init_args, Namespace) else None
    if isinstance(value, Namespace) and isinstance(value.get("class_path"), str):
        value = value.get("init_args") or Namespace()  # Optional: a class_path in some releases
    if isinstance(value, Namespace):
        return value.as_dict()
    return dict(value) if isinstance(value, dict) else None


def _class_path_error(flag: str, message: str) -> str | None:
    """A class path (``--model``, ``--data``, ...) that does not import or is of the wrong class,
    as one line naming it; ``None`` for any other report."""
    if "is not accepted" in message:  # an unknown option of the class, not its path
        return None
    given = re.findall(r"Given value: (.*)", message)
    value = given[-1].strip() if given else "?"
    problem = re.search(
        r"Problem with given class_path '([^']+)':\s*\n\s*(?!\s|Parser key)(.+)", message
    )
    if problem:
        return f"{flag}={problem.group(1)} is invalid: cannot import it ({problem.group(2)})"
    subclass = re.search(r"does not correspond to a subclass of (\w+)", message)
    if subclass:
        return (
            f"{flag}={value} is invalid: expected the import path of a {subclass.group(1)} subclass"
        )
    if "Expected a dot import path string" in message:
        return (
            f"{flag}={value} is invalid: expected an import path (package.module.Class) of a class "
            "that imports"
        )
    return None


def raising_section(err: BaseException, sections: dict[str, type]) -> str | None:
    """The section (``data``, ``model``, ...) whose class raised ``err`` while being built: the
    innermost ``self`` of the traceback that is an instance of a section's class."""
    found = None
    frame = err.__traceback__
    while frame is not None:
        owner = frame.tb_frame.f_locals.get("self")
        for name, cls in sections.items():
            if isinstance(owner, cls):
                found = name
        frame = frame.tb_next
    return found


def tvlars_parameters(cls: Callable[..., Any]) -> list[str]:
    """The ``__init__`` parameters of ``cls`` typed ``TVLARSConfig`` (or Optional)."""
    init = getattr(cls, "__init__", cls)
    try:
        hints = get_type_hints(init)
        parameters = inspect.signature(init).parameters
    except Exception:  # unresolvable annotations, no signature: nothing to check ahead
        return []
    names = []
    for name in parameters:
        hint = hints.get(name)
        if hint is TVLARSConfig or TVLARSConfig in get_args(hint):
            names.append(name)
    return names


def check_config(values: dict[str, Any]) -> TVLARSConfig:
    """Build a ``TVLARSConfig`` from parsed values, naming the override of a bad value."""
    overrides = []
    for index, override in enumerate(values.pop("overrides", None) or []):
        fields = override.as_dict() if isinstance(override, Namespace) else override
        if isinstance(fields, dict) and "class_path" in fields:  # kept by jsonargparse >= 4.50
            fields = fields.get("init_args") or {}
        try:
            overrides.append(
                fields if isinstance(fields, GroupOverride) else GroupOverride(**fields)
            )
        except (ValueError, TypeError) as err:
            raise type(err)(f"overrides[{index}].{err}") from err
    return TVLARSConfig(**values, overrides=overrides)


_LEADING_NAME = re.compile(r"^([A-Za-z_][\w.\[\]]*)=")


def names_its_argument(message: str) -> bool:
    """Whether an error ``message`` starts with the argument it is about (``lr=-1.0 is ...``)."""
    return _LEADING_NAME.match(message) is not None


def flag_error(prefix: str, message: str) -> str:
    """``lr=-1.0 is invalid: ...`` of the config at ``prefix`` -> ``--prefix.lr=-1.0 is ...``."""
    if names_its_argument(message):
        return f"--{prefix}.{message}"
    return f"--{prefix}: {message}"


def _allowed(expected: str) -> str:
    """jsonargparse's type names in words: ``typing.Literal['a', 'b']`` -> ``one of 'a', 'b'``."""
    literal = re.fullmatch(r"(?:a )?typing\.Literal\[(.*)\]", expected)
    if literal:
        return f"one of {literal.group(1)}"
    names = re.findall(r"<class '(?:[\w.]+\.)?(\w+)'>", expected)
    words = {
        "int": "an integer",
        "float": "a number",
        "bool": "true or false",
        "str": "a string",
        "NoneType": "null",
    }
    if names:
        return " or ".join(words.get(n, n) for n in names)
    return expected.removeprefix("a ")


#: Lines of jsonargparse's report that say where, not what (the flag is built from the keys).
_STRUCTURE = re.compile(
    r"\s*(?:- )?(?:Parser key|Given value|Subtypes:|Errors:|Does not validate|Problem with given"
    r"|Expected a <class 'NoneType'>)"
)


def one_line_error(message: str) -> str:
    """jsonargparse's nested error report, as one line: the flag, the value, what is allowed."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    flag = "--" + ".".join(keys) if keys else ""
    class_path = _class_path_error(flag, message)
    if class_path is not None:
        return class_path
    got = re.search(r"Expected (.+?)\. Got value: (.*)", message)
    if got and flag:
        return f"{flag}={got.group(2).strip()} is invalid: expected {_allowed(got.group(1))}"
    option = re.search(r"Option '([^']+)' is not accepted", message)
    if keys and not option:  # in a Union (TVLARSConfig | None, jsonargparse 4.27): "--name=value"
        option = re.search(r"[Uu]nrecognized arguments: --([\w.]+)", message)
    if option:
        return f"{flag}.{option.group(1)} is not an option (see --help)".lstrip(".")
    # The innermost key's report, up to its value: a Union's subtypes, each "- Expected a <class
    # 'X'>", then "Given value: V" (a TVLARSConfig | None around it adds its own, after it).
    report, *values = message.rsplit('Parser key "', 1)[-1].split("Given value:", 2)
    given = values[0].splitlines()[0].strip() if values else None
    expected = re.findall(r"- Expected (a <class '[^']+'>)", report)
    if flag and given is not None and any("NoneType" not in e for e in expected):
        allowed = " or ".join(_allowed(e) for e in expected)
        return f"{flag}={given} is invalid: expected {allowed}"
    if flag:  # another reason: its last line, with the value when the report has it
        reasons = [
            line.strip()
            for line in message.splitlines()
            if line.strip() and not _STRUCTURE.match(line)
        ]
        nested = re.search(r"NestedArg\(key='[^']*', val=(.*)\)\s*$", message, re.M)
        value = "=" + nested.group(1).strip("'") if nested else ""
        if reasons:
            return f"{flag}{value} is invalid: {reasons[-1]}"
    return " ".join(message.split())
