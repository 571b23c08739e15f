"""Sample upstream data services, for ``pdg demo`` and the tests."""
