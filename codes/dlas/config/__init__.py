"""The config language: YAML with line numbers, ``base:`` inheritance, ``key=value`` overrides, validation.

See ``docs/config.md`` for the user's view. The public API::

    cfg = load_config("options/x.yml", overrides=["train.niter=100"], imports=["my_plugins"])
    cfg["train"]["niter"]            # a Config is a dict of plain dicts/lists, defaults filled in
    cfg.attach_lines(problems)       # give dotted-path Problems their file:line
    print(dump_config(cfg))          # the resolved YAML (the run folder's config.yml)
"""
from dlas.config.load import Config, dump_config, load_config, resolve_config
from dlas.config.overrides import Override, apply_overrides, parse_override
from dlas.config.source import ConfigSource, Location, format_path, parse_path


def attach_lines(cfg: Config, problems: list) -> list:
    """``problems`` (``dlas.errors.Problem``) with file:line filled in from ``cfg``'s line map."""
    return cfg.attach_lines(problems)


__all__ = ["Config", "ConfigSource", "Location", "Override", "apply_overrides", "attach_lines", "dump_config",
           "format_path", "load_config", "parse_override", "parse_path",
           "resolve_config"]
