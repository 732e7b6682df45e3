"""Watching served models: drift of their inputs and accuracy against actuals.

Reads the prediction logs of ``manymodels serve --log-predictions DIR`` and compares
them with what the bundle's manifest stored at training time. Only numpy, pyarrow and
the runtime are used (no training library): see :mod:`.drift` for why PSI on stored
bins rather than a drift library.
"""
