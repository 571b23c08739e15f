"""The bottom layer: the problem types every layer raises (:mod:`core.errors`)
and money in integer fen and 1/10000 fen (:mod:`core.money`). It imports
nothing of the project's own."""
