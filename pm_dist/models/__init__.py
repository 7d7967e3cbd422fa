"""Face encoders (IResNet, MobileFaceNet, a tiny CPU encoder) and their file format."""

from .encoder_file import ENCODER_FORMAT, ENCODER_VERSION, EncoderFileError, load_encoder, save_encoder
from .registry import ALIASES, MODEL_NAMES, build_model, canonical_name

__all__ = [
    "MODEL_NAMES",
    "ALIASES",
    "canonical_name",
    "build_model",
    "save_encoder",
    "load_encoder",
    "EncoderFileError",
    "ENCODER_FORMAT",
    "ENCODER_VERSION",
]
