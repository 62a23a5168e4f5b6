"""``python -m pddnet``: the ``pddnet`` command."""

from pddnet.cli import main

main(prog_name="pddnet")
