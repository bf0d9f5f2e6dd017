"""The export stage's helpers: llama.cpp's converter found or fetched (converter), the training format in the GGUF
metadata (metadata) with the pre-tokenizer it needs (pretokenizer), llama.cpp's quantizer (quantize), the Ollama
Modelfile (modelfile) and reading a GGUF file back (readback)."""
