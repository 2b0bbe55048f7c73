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


BIG_OPTS = {"unet": {"base": 8}, "fcn8s": {"base": 8}}  # slimmer for the large sizes: padding is size-only


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_keeps_the_input_size(name):
    model = get_model(name).eval()
    n = count_parameters(model)
    print(f"{name}: {n:,} parameters")
    assert n == 644 if name == "single_conv" else n > 100_000
    with torch.no_grad():
        for h, w in ((37, 53), (64, 96), (101, 67)):
            assert model(torch.randn(1, 3, h, w)).shape == (1, 23, h, w)
        big = get_model(name, **BIG_OPTS.get(name, {})).eval()
        for h, w in ((400, 600), (1000, 1500)):
            assert big(torch.randn(1, 3, h, w)).shape == (1, 23, h, w)


def test_unet_width_and_depth():
    small, deep = get_model("unet", base=8, depth=3), get_model("unet", base=8, depth=5)
    assert count_parameters(small) < count_parameters(deep)
    assert deep(torch.randn(1, 3, 50, 70)).shape == (1, 23, 50, 70)


def test_load_weights_full_and_backbone(tmp_path):
    from torchvision.models import mobilenet_v3_large
    from models import load_weights

    a, b = get_model("unet", base=8), get_model("unet", base=8)
    torch.save({"model": a.state_dict()}, tmp_path / "ck.pt")
    assert "all" in load_weights(b, tmp_path / "ck.pt")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    backbone = mobilenet_v3_large()
    torch.save(backbone.state_dict(), tmp_path / "mnv3.pth")
    seg = get_model("lraspp_mobilenet")
    msg = load_weights(seg, tmp_path / "mnv3.pth")
    assert "backbone" in msg
    assert torch.equal(seg.state_dict()["net.backbone.0.0.weight"], backbone.state_dict()["features.0.0.weight"])
    torch.save({"something": torch.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt: no tensor in this file fits"):
        load_weights(seg, tmp_path / "bad.pt")
