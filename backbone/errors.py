"""Errors that tell the user what is wrong, where, and how to fix it, in one line.

Two layers, so that components stay reusable outside our configs:

- Components (backbone, anchor generator, box coder, matcher, loss, heads, ...) raise
  :class:`ArgumentError`, a plain ``ValueError`` about *their own* argument (``min_scale must be
  > 0, got -1``). A component that forwards a dict of settings to a sub-component re-raises its
  errors under that argument's name with :func:`argument_scope` (``anchor.min_scale``).
- The one place that builds objects from the Hydra config (``backbone.training.runner.build``)
  turns an ``ArgumentError`` into a :class:`ConfigError` naming the full config key
  (``model.anchor.min_scale``).

:class:`ConfigError` and :class:`DataError` (a file on disk) are printed by the tools as one
``error:`` line with exit code 2 (:func:`backbone.training.runner.run_cli`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator


class Mnv2Error(Exception):
    """Base class: the message is meant to be printed as is, without a traceback."""


class ConfigError(Mnv2Error, ValueError):
    """A config key holds an invalid value.

    >>> raise ConfigError("model.backbone.width_mult", "must be > 0, got -1", "use e.g. 1.0")
    """

    def __init__(self, key: str, problem: str, fix: str = "") -> None:
        self.key, self.problem, self.fix = key, problem, fix
        msg = f"config key '{key}': {problem}"
        if fix:
            msg += f" -- fix: {fix}"
        super().__init__(msg)


class DataError(Mnv2Error, ValueError):
    """A file or directory on disk is missing or malformed."""

    def __init__(self, path: object, problem: str, fix: str = "") -> None:
        self.path, self.problem, self.fix = str(path), problem, fix
        msg = f"{path}: {problem}"
        if fix:
            msg += f" -- fix: {fix}"
        super().__init__(msg)


class ArgumentError(ValueError):
    """A component's own argument is invalid.

    ``arg`` is the argument's name, dotted for nested settings (``anchor.min_scale``);
    ``str(err)`` reads ``"min_scale must be > 0, got -1 (fix: ...)"``.
    """

    def __init__(self, arg: str, problem: str, fix: str = "") -> None:
        self.arg, self.problem, self.fix = arg, problem, fix
        super().__init__(f"{arg} {problem}" + (f" (fix: {fix})" if fix else ""))

    def under(self, prefix: str) -> "ArgumentError":
        """The same error, named as a key of the argument ``prefix``."""
        return ArgumentError(f"{prefix}.{self.arg}" if prefix else self.arg, self.problem, self.fix)

    def to_config_error(self, key: str) -> ConfigError:
        """The config-level error for a component built from config node ``key``."""
        return ConfigError(f"{key}.{self.arg}" if key else self.arg, self.problem, self.fix)


@contextlib.contextmanager
def argument_scope(prefix: str) -> Iterator[None]:
    """Re-raise ArgumentErrors of a sub-component built from argument ``prefix`` as ``prefix.arg``."""
    try:
        yield
    except ArgumentError as err:
        raise err.under(prefix) from None
