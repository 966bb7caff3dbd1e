"""On-disk formats: bit packing, the packed safetensors checkpoint, GGUF Q1_0 export."""

from .bitpack import pack_bits, unpack_bits
from .packed import FORMAT_VERSION, QUANT_METHOD, PackedFormatError, PackedLinear

__all__ = ["FORMAT_VERSION", "QUANT_METHOD", "PackedFormatError", "PackedLinear", "pack_bits", "unpack_bits"]
