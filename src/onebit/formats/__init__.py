"""On-disk layouts: bit packing, the packed safetensors checkpoint (layout and reader), GGML block bytes."""

from .bitpack import pack_bits, unpack_bits
from .packed import FORMAT_VERSION, QUANT_METHOD, PackedFormatError, PackedLinear

__all__ = ["FORMAT_VERSION", "QUANT_METHOD", "PackedFormatError", "PackedLinear", "pack_bits", "unpack_bits"]
