"""The functional API, one folder per op family: validate -> choose a backend -> run."""

from attnkit.ops import dense, linear, neighborhood  # noqa: F401  (each registers its op for explain)
