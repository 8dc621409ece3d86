"""The pipeline's stages, one module each: preprocess -> train -> evaluate -> score
(+ recommend, report). Each does its own I/O around the pure parts (data/, trainer,
lists, foldin) and returns a typed summary; `mfbatch.api` and the CLI call them."""
