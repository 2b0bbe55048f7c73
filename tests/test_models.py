import io
from contextlib import redirect_stdout

import pytest
import torch
from torchsummary import summary

from models import MODELS, SingleConvolution, count_parameters, get_model


def test_single_convolution_shape_and_parameters():
    model = SingleConvolution()
    assert count_parameters(model) == 644
    conv = model.conv
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == (3, 23, (3, 3), (1, 1))
    out = model(torch.randn(2, 3, 40, 60))
    assert out.shape == (2, 23, 40, 60)
    assert (out >= 0).all()  # the blog's ReLU on the scores


def test_torchsummary_table():
    buf = io.StringIO()
    with redirect_stdout(buf):
        summary(SingleConvolution(), (3, 400, 600), device="cpu")
    text = buf.getvalue()
    assert "[-1, 23, 400, 600]" in text
    assert "Total params: 644" in text


def test_registry():
    assert "single_conv" in MODELS
    assert count_parameters(get_model("single_conv")) == 644
    with pytest.raises(ValueError, match="unknown model"):
        get_model("no-such-model")
