"""Forecasting: the next ``horizon`` periods of every series, from its own past.

Training-side modules (statsforecast fits, lag features, backtests, the per-series choice);
the forecasts themselves are computed by :mod:`manymodels.runtime.forecast`.
"""
