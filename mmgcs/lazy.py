"""Lazy re-exports for package `__init__` files: a name is imported from its module on first use, so importing the
package stays light and a lower layer importing one of its modules never pulls a higher one back in."""

import importlib
from typing import Any, Callable, Mapping


def lazy_exports(package: str, namespace: dict, table: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` serving each name of `table` ({name: module}) from its module, once."""

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(table[name]), name)
        namespace[name] = value  # later lookups are plain attribute reads
        return value

    return __getattr__
