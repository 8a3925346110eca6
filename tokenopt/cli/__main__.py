"""``python -m tokenopt.cli``: the ``tokenopt`` command."""

from tokenopt.cli import app

app()
