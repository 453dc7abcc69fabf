"""How optimizer state is stored: codecs and factored second moments."""

from kaon.state.codecs import (
    MOMENTUM_DTYPES,
    Codec,
    FloatCodec,
    FourBitCodec,
    Int8Codec,
    IntegerCodec,
    LogSpace4BitCodec,
    LogSpace8BitCodec,
    momentum_codec,
)

__all__ = [
    "MOMENTUM_DTYPES",
    "Codec",
    "FloatCodec",
    "FourBitCodec",
    "Int8Codec",
    "IntegerCodec",
    "LogSpace4BitCodec",
    "LogSpace8BitCodec",
    "momentum_codec",
]
