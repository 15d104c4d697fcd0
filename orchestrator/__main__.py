"""`python -m orchestrator`: the same command as the installed `orchestrator`."""

from orchestrator.cli import main

main()
