"""Workloads the trainer can run: the built-in "gpt" task or a user's ``package.module:function``."""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable

from node.errors import ConfigError
from node.tasks.base import Batch, Task
from node.tasks.gpt import GPT_SIZES, GPTConfig, GPTTask, gpt_task

__all__ = ["Batch", "GPTTask", "GPT_SIZES", "Task", "load_task", "BUILTIN_TASKS"]

BUILTIN_TASKS: dict[str, Callable[..., Task]] = {"gpt": gpt_task}
PROGRAMMATIC = frozenset({"corpus"})  # parameters code passes (a loaded corpus), never a run file's [task] key


def task_keys(factory: Callable[..., Task]) -> list[str] | None:
    """The parameters a task factory takes (its ``[task]`` keys), or None when it takes any (``**kwargs``)."""
    if factory is gpt_task:
        return sorted([*(task_keys(GPTTask) or []), *(f.name for f in dataclasses.fields(GPTConfig))])
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]
    return None if any(p.kind is p.VAR_KEYWORD for p in params) and factory is not GPTTask else sorted(names)


def _build(spec: str, factory: Callable[..., Task], kwargs: dict[str, Any]) -> Task:
    """``factory(**kwargs)``; a parameter it does not take, or a value it refuses, is a ConfigError naming the
    ``[task]`` key and the valid ones (a traceback would make a supervisor restart a run that cannot start)."""
    accepted = task_keys(factory)
    valid = [k for k in accepted or [] if k not in PROGRAMMATIC]  # what a run file's [task] may set
    unknown = sorted(set(kwargs) - set(accepted)) if accepted is not None else []
    if unknown:
        raise ConfigError(f"task {spec!r}: unknown [task] key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(map(repr, unknown))}; valid keys: {', '.join(valid)}")
    try:
        return factory(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        keys = f"; valid keys: {', '.join(valid)}" if valid else ""
        raise ConfigError(f"task {spec!r}: [task] {kwargs}: {exc}{keys}") from None


def load_task(spec: str, **kwargs: Any) -> Task:
    """Resolve ``spec`` to a Task; errors are ConfigErrors (ValueErrors, printed by ``lowband`` in one line) naming
    what is wrong, the task's parameters included, since ``spec`` comes straight from a command line and the operator
    must be able to fix it from the message alone."""
    if spec in BUILTIN_TASKS:
        return _build(spec, BUILTIN_TASKS[spec], kwargs)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"task {spec!r}: expected one of {sorted(BUILTIN_TASKS)} or 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ConfigError(f"task {spec!r}: module {module_name!r} not found (put its directory on the path: "
                              "`lowband --task-path DIR ...` or PYTHONPATH, docs/tasks.md)") from e
        raise ConfigError(f"task {spec!r}: module {module_name!r} failed to import: {e}") from e
    except ImportError as e:
        raise ConfigError(f"task {spec!r}: module {module_name!r} failed to import: {e}") from e
    try:
        factory = getattr(module, attr)
    except AttributeError as e:
        raise ConfigError(f"task {spec!r}: module {module_name!r} has no attribute {attr!r}") from e
    if not callable(factory):
        raise ConfigError(f"task {spec!r}: {attr!r} is a {type(factory).__name__}, not a callable returning a Task")
    task = _build(spec, factory, kwargs)
    if not isinstance(task, Task):
        raise ConfigError(f"task {spec!r}: {attr}() returned a value of type {type(task).__name__}, not a Task")
    return task
