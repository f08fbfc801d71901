"""llama.cpp in-process: the only code that imports llama_cpp or calls the C library."""
