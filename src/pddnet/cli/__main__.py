"""``python -m pddnet.cli``: the ``pddnet`` command."""

from pddnet.cli import main

main(prog_name="pddnet")
