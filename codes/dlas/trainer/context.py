"""The :class:`~dlas.context.Context` under its first import path, for plugins written against it."""
from dlas.context import Context

__all__ = ["Context"]
