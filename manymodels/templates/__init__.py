"""Files ``manymodels package`` copies into every bundle (``score.py``).

They are Python modules so that a normal (non-editable) install ships them without any
package-data configuration, and so that ruff and mypy check them like the rest of the code.
"""
