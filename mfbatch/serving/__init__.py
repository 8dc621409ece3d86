"""Top-K lists from a run's graph: the ONNX Runtime session, seen-item masks, list building,
fold-in and the engines. Handed their inputs; never open the database.
"""
