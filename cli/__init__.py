"""The ``pdg`` command line: the catalogue, licensing, billing and audit
commands, ``pdg serve`` (the gateway's processes) and ``pdg demo``."""
