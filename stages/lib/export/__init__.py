"""The export stage's helpers: llama.cpp's converter (converter), the pre-tokenizer it records (pretokenizer),
the Ollama Modelfile (modelfile) and reading a GGUF back (readback)."""
