"""``python -m attnkit``: the same command line as the ``attnkit`` script (see :mod:`attnkit.cli`)."""

from attnkit.cli import app

if __name__ == "__main__":
    app(prog_name="attnkit")
