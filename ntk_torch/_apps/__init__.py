"""The logic of the command-line programs: each module has ``main(argv) -> int``.

``scripts/*.py`` and the ``ntk-torch`` console command are thin entry points to these.
"""
