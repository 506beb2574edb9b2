"""The functional API, one file per op family: validate -> choose backend -> run."""

from attnkit.ops import dense, linear, neighborhood  # noqa: F401  (each registers its op for explain)
