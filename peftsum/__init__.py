"""The code behind common.py, one module per concern; common.py's docstring is the map."""
