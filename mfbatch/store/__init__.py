"""The DuckDB file and everything that touches it: connections and named queries, runs and
dataset identity, served-list history, scratch folders.
"""
