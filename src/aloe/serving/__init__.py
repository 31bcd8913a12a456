"""The untrusted side of AloePri: an embedded OpenAI-compatible server, llama.cpp's llama-server, GGUF export."""
