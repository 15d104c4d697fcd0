"""`invoke <task>` in this checkout: the tasks are the package's own (orchestrator/cli.py).

Installed, the same tasks are the `orchestrator` command; `invoke --list` and
`invoke <task> --help` document them here.
"""

from orchestrator.cli import ns  # noqa: F401 - invoke looks for `ns`
