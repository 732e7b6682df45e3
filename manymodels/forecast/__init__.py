"""Forecasting: features, strategies, backtests and the statistical candidates."""
