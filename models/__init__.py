"""tapeworks models: builds Keras image models; knows nothing of training."""

from models.backbones import BACKBONES, MIN_INPUT_SIZE
from models.blocks import backbone_blocks
from models.builder import build_model
from models.errors import ModelError
from models.segmentation import SEG_MODELS, build_segmentation_model

__all__ = ["BACKBONES", "MIN_INPUT_SIZE", "ModelError", "SEG_MODELS", "backbone_blocks",
           "build_model", "build_segmentation_model"]
