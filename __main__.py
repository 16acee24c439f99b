"""`python -m fedmeta ...` is the `fedmeta` command."""

from fedmeta.sim.cli.main import main

main()
