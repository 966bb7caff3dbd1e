"""The two ways out of onebit, side by side: the packed safetensors checkpoint (``export.packed``, loaded by
transformers through onebit's quantizer) and GGUF for llama.cpp (``export.gguf``). ``formats`` holds the
on-disk layouts they write."""
