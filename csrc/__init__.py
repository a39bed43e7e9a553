"""C++ sources of the CPU expert runtime, shipped as package data and built on first use."""
