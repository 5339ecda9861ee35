import hashlib
import json

import pytest
import torch

from genre_pipeline.data.images import PreprocessSpec
from genre_pipeline.genres import GENRES
from genre_pipeline.model.architectures import (
    ARCHS,
    PRETRAINED_ARCHS,
    WeightsUnavailableError,
    architecture,
    build_model,
    default_preprocess,
    fold_batchnorm,
    weights_source,
)
from genre_pipeline.model.checkpoints import CheckpointError, ModelMeta, load_checkpoint, read_meta, save_checkpoint


@pytest.mark.parametrize("arch", ["baseline", "cnn", "resnet50"])
def test_each_arch_returns_finite_logits_per_genre(arch):
    torch.manual_seed(0)
    model = build_model(arch=arch, num_genres=18).eval()
    # resnet is size-agnostic: a small input keeps the test quick
    size = default_preprocess(arch).image_size if arch != "resnet50" else 64
    with torch.inference_mode():
        logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 18)
    assert torch.isfinite(logits).all()


def test_resnet50_has_the_study_head():
    head = build_model(arch="resnet50", num_genres=18).head
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert (head[0].in_features, head[0].out_features, head[2].p, head[3].out_features) == (2048, 1024, 0.3, 18)


def test_weights_file_loads_into_the_backbone(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(1)
    imagenet_like = resnet50()
    path = tmp_path / "resnet50.pth"
    torch.save(imagenet_like.state_dict(), path)
    model = build_model(arch="resnet50", num_genres=18, weights=str(path))
    assert torch.equal(model.backbone.conv1.weight, imagenet_like.conv1.weight)


def test_unusable_weights_say_how_to_provide_them(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="only resnet50"):
        build_model(arch="cnn", num_genres=18, pretrained=True)
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    with pytest.raises(WeightsUnavailableError, match="junk.pth: cannot read weights file"):
        build_model(arch="resnet50", num_genres=18, weights=str(tmp_path / "junk.pth"))


def test_pretrained_offline_fails_with_instructions(tmp_path, monkeypatch):
    # No network here and an empty cache: torchvision's download must fail, with advice on --weights.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    try:
        build_model(arch="resnet50", num_genres=18, pretrained=True)
    except WeightsUnavailableError as error:
        assert "--weights" in str(error)
    else:
        pytest.skip("this machine can download ImageNet weights")


def meta(**overrides) -> ModelMeta:
    return ModelMeta(**{"arch": "cnn", "genres": list(GENRES), "preprocess": PreprocessSpec(image_size=32),
                        "thresholds": [0.3] * 18, "epoch": 3, **overrides})


def test_checkpoint_round_trip(tmp_path):
    model = build_model(arch="cnn", num_genres=18).eval()
    saved = save_checkpoint(tmp_path / "ckpt", model, meta(metrics={"val_map_at_1": 0.5}))
    assert saved.model_version.startswith("cnn-e3-")
    loaded, loaded_meta = load_checkpoint(str(tmp_path / "ckpt"))
    assert loaded_meta == saved
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))


def test_unreadable_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no meta.json"):
        read_meta(str(tmp_path))
    save_checkpoint(tmp_path / "ckpt", build_model(arch="cnn", num_genres=18), meta())
    (tmp_path / "ckpt" / "model.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.pt: sha256 .* does not match .* refusing them"):
        load_checkpoint(str(tmp_path / "ckpt"))
    # Garbage its meta vouches for (a checkpoint written by a broken saver) is named as unreadable.
    meta_file = tmp_path / "ckpt" / "meta.json"
    recorded = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**recorded, "weights_sha256": hashlib.sha256(b"garbage").hexdigest()}))
    with pytest.raises(CheckpointError, match="model.pt: unreadable weights"):
        load_checkpoint(str(tmp_path / "ckpt"))


def test_checkpoint_records_the_pooled_stages_and_older_checkpoints_still_load(tmp_path):
    spec = default_preprocess("efficientnet_lite0", 64)
    lite = meta(arch="efficientnet_lite0", preprocess=spec)
    images = torch.randn(1, 3, *spec.shape)
    for pooled, name in (((5, 6), "pooled"), ((), "older")):
        model = build_model(arch="efficientnet_lite0", num_genres=18, pooled_blocks=pooled).eval()
        saved = save_checkpoint(tmp_path / name, model, lite)  # the meta does not say: the model does
        assert saved.pooled_blocks == list(pooled)
        meta_file = tmp_path / name / "meta.json"
        if not pooled:  # a checkpoint from before the field existed
            meta_file.write_text(json.dumps({k: v for k, v in json.loads(meta_file.read_text()).items()
                                             if k != "pooled_blocks"}))
        loaded, loaded_meta = load_checkpoint(str(tmp_path / name))
        assert loaded_meta.pooled_blocks == list(pooled)
        assert loaded.head[1].in_features == (3584 if pooled else 2560)
        with torch.inference_mode():
            assert torch.equal(loaded(images), model(images))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_registered_arch_builds_preprocesses_names_its_weights_and_folds(arch):
    spec = architecture(arch)
    assert spec.name == arch and (arch in PRETRAINED_ARCHS) == spec.pretrained
    preprocess = default_preprocess(arch)
    assert preprocess == spec.preprocess(None) and default_preprocess(arch, 48).image_size == 48
    torch.manual_seed(0)
    model = build_model(arch=arch, num_genres=len(GENRES)).eval()
    size = min(preprocess.image_size, 64)
    images = torch.rand(2, 3, 8 * round(size * (preprocess.shape[0] / preprocess.shape[1]) / 8), size)
    with torch.inference_mode():
        expected = model(images)
        folded = fold_batchnorm(model, arch)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        torch.testing.assert_close(folded(images), expected, atol=1e-4, rtol=1e-4)
    assert expected.shape == (2, len(GENRES))
    assert weights_source(arch=arch, pretrained=False, weights=None) == {"kind": "random"}
    if spec.has_imagenet_weights:
        source = weights_source(arch=arch, pretrained=True, weights=None)
        assert source["kind"] == ("torchvision" if arch == "resnet50" else "package")
    else:
        with pytest.raises(WeightsUnavailableError, match=f"no pretrained weights exist for arch '{arch}'"):
            weights_source(arch=arch, pretrained=True, weights=None)


def test_an_unknown_arch_names_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown arch 'vit'; choose one of \('baseline', 'cnn', 'resnet50'"):
        build_model(arch="vit", num_genres=18)
    with pytest.raises(ValueError, match="pooled_blocks applies to efficientnet_lite0, efficientnet_lite2, not 'cnn'"):
        build_model(arch="cnn", num_genres=18, pooled_blocks=(4,))
