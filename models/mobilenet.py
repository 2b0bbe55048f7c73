"""torchvision's DeepLabV3 and LR-ASPP on a MobileNetV3-Large backbone, from scratch by default."""
from __future__ import annotations

from torch import nn

from basics import NUM_CLASSES
from models.common import PadToStride
from models.encoder_decoder import offline_weights


def _bn_momentum(net: nn.Module, momentum: float = 0.1) -> nn.Module:
    # torchvision builds MobileNetV3 with BatchNorm momentum 0.01, tuned for long ImageNet runs;
    # from scratch over a few hundred steps the running statistics then lag far behind the
    # weights and evaluation collapses to one class. PyTorch's default 0.1 tracks them.
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    return net

__all__ = ["deeplabv3_mobilenet", "lraspp_mobilenet"]


def _backbone_weights(pretrained: bool):
    from torchvision.models import MobileNet_V3_Large_Weights

    return MobileNet_V3_Large_Weights.IMAGENET1K_V1 if pretrained else None


def deeplabv3_mobilenet(num_classes: int = NUM_CLASSES, pretrained: bool = False) -> nn.Module:
    """DeepLabV3 head on MobileNetV3-Large (output stride 16); ImageNet backbone with ``pretrained``."""
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    weights = _backbone_weights(pretrained)
    with offline_weights(weights):
        net = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=weights, num_classes=num_classes,
                                           aux_loss=False)
    return PadToStride(_bn_momentum(net), 32)


def lraspp_mobilenet(num_classes: int = NUM_CLASSES, pretrained: bool = False) -> nn.Module:
    """Lite R-ASPP head on MobileNetV3-Large; ImageNet backbone with ``pretrained``."""
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    weights = _backbone_weights(pretrained)
    with offline_weights(weights):
        net = lraspp_mobilenet_v3_large(weights=None, weights_backbone=weights, num_classes=num_classes)
    return PadToStride(_bn_momentum(net), 32)
