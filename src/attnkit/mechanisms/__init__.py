"""nn.Modules, one file per mechanism or small family; importing this package registers them all.

Every submodule is imported automatically, so adding a mechanism is adding a file.
"""

import importlib
import pkgutil

for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")
