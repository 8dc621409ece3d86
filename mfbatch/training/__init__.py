"""The model and how it is fitted: tensors in, tensors out (no files, no database)."""
