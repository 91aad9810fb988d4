"""Workloads the trainer can run: the built-in "gpt" task or a user's ``package.module:function``."""
from __future__ import annotations

import importlib
from typing import Any, Callable

from node.tasks.base import Batch, Task
from node.tasks.gpt import GPT_SIZES, GPTTask, gpt_task

__all__ = ["Batch", "GPTTask", "GPT_SIZES", "Task", "load_task", "BUILTIN_TASKS"]

BUILTIN_TASKS: dict[str, Callable[..., Task]] = {"gpt": gpt_task}


def load_task(spec: str, **kwargs: Any) -> Task:
    """Resolve ``spec`` to a Task; errors are ValueErrors naming what is wrong, since ``spec`` comes
    straight from a command line and the operator must be able to fix it from the message alone."""
    if spec in BUILTIN_TASKS:
        return BUILTIN_TASKS[spec](**kwargs)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"task {spec!r}: expected one of {sorted(BUILTIN_TASKS)} or 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ValueError(f"task {spec!r}: module {module_name!r} not found") from e
        raise ValueError(f"task {spec!r}: module {module_name!r} failed to import: {e}") from e
    except ImportError as e:
        raise ValueError(f"task {spec!r}: module {module_name!r} failed to import: {e}") from e
    try:
        factory = getattr(module, attr)
    except AttributeError as e:
        raise ValueError(f"task {spec!r}: module {module_name!r} has no attribute {attr!r}") from e
    if not callable(factory):
        raise ValueError(f"task {spec!r}: {attr!r} is a {type(factory).__name__}, not a callable returning a Task")
    task = factory(**kwargs)
    if not isinstance(task, Task):
        raise ValueError(f"task {spec!r}: {attr}() returned a value of type {type(task).__name__}, not a Task")
    return task
