"""``python -m taskyard.cli``: the ``taskyard`` command, as ``taskyard up`` starts its children."""

from taskyard.cli import main

main()
