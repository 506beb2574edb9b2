"""Case providers, one module per op family; each exposes ``cases() -> list[Case]``.

:func:`attnkit.bench.discover.discover` finds them (and records a provider that fails to load).
"""
