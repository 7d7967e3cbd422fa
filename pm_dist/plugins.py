"""Your own heads and evaluation suites, loaded before the config is read.

A plugin is any importable module that registers something when imported (``register_head``,
``@register_suite``). Name it with ``--plugin my_module`` (repeatable) on ``python -m pm_dist.train``
and ``python -m pm_dist.evaluate``, or in ``PM_DIST_PLUGINS=my_module,other`` (which torchrun and
sbatch pass to every rank unchanged). docs/extending.md shows one.
"""

from __future__ import annotations

import importlib
import os

ENV = "PM_DIST_PLUGINS"


class PluginError(ImportError):
    pass


def load_plugins(names: list[str] | None = None) -> list[str]:
    """Import the named modules and those in ``$PM_DIST_PLUGINS``; returns what was imported."""
    wanted = list(names or []) + [n for n in os.environ.get(ENV, "").split(",") if n.strip()]
    loaded = []
    for name in dict.fromkeys(n.strip() for n in wanted):
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise PluginError(f"plugin {name!r} cannot be imported ({err}); is its folder on "
                              "PYTHONPATH?") from err
        loaded.append(name)
    return loaded
