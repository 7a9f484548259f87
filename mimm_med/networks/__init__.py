"""Networks with split feature heads."""

from .backbones import BACKBONE_NAMES, feature_backbone
from .mimmx_net import MIMMXNet
from .small_cnn import SmallCNN

__all__ = ["BACKBONE_NAMES", "MIMMXNet", "SmallCNN", "feature_backbone"]
