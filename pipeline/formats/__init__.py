"""Files and names: the tensor-name grammar, GGUF read/write/prune, imatrix files, task files and
model info, on gguf-py's constants."""
