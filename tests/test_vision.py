"""Vision: adaptive patch grids, preprocessing, the safe image loader's errors, and the UME encoder."""

import struct
import warnings
import zlib

import pytest
import torch
from PIL import Image

from apertis_core import ConfigError, ModelConfig
from apertis_core.vision import (
    Augment,
    ImageCache,
    ImageError,
    file_image_tokens,
    image_grid,
    num_image_tokens,
    open_image,
    preprocess_image,
)
from apertis_core.vision.encoder import UnifiedMultimodalEncoder


def encoder_config(kind="vit", **overrides):
    base = dict(
        d_model=32, n_heads=4, image_encoder=kind, image_patch_size=8, image_max_patches=16, image_encoder_layers=2
    )
    base.update(overrides)
    return ModelConfig(**base)


def two_halves(width, height, left=(200, 60, 60), right=(60, 60, 200)):
    img = Image.new("RGB", (width, height), right)
    img.paste(left, (0, 0, width // 2, height))
    return img


# ---- patch grids ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "width, height, max_patches, expected",
    [
        (64, 64, 64, (8, 8)),  # a small square is scaled up to use the budget
        (640, 480, 64, (7, 9)),  # 4:3 -> 9 columns x 7 rows (63); 8 x 6 would waste 16 patches
        (100, 30, 16, (2, 7)),  # two rows of 16 px: width 106.7 px -> 7 columns
        (5, 90, 16, (16, 1)),  # tall and thin: one column
        (1000, 1, 64, (1, 64)),  # a one-pixel line still gets at least one row
        (3, 3, 1, (1, 1)),
    ],
)
def test_image_grid_hand_checked_sizes(width, height, max_patches, expected):
    assert image_grid(width, height, 16, max_patches) == expected


def test_image_grid_never_exceeds_budget_and_keeps_aspect():
    for width in (1, 7, 31, 64, 129, 333, 1920):
        for height in (1, 9, 48, 100, 1080):
            for max_patches in (1, 5, 16, 64):
                rows, cols = image_grid(width, height, 14, max_patches)
                assert rows >= 1 and cols >= 1 and rows * cols <= max_patches
                # The scaled image fills one side exactly and the other to within one patch (the padding).
                assert cols == -(-rows * width // height) or rows == -(-cols * height // width)


@pytest.mark.parametrize("size", [(100, 30), (31, 77), (64, 64), (1, 500)])
def test_preprocess_shape_matches_grid_and_token_count(size):
    tensor = preprocess_image(Image.new("RGB", size, (10, 200, 30)), patch_size=8, max_patches=16)
    rows, cols = image_grid(*size, 8, 16)
    assert tensor.shape == (3, rows * 8, cols * 8) and tensor.dtype == torch.float32
    assert num_image_tokens(tensor, 8) == rows * cols == num_image_tokens(tuple(tensor.shape[1:]), 8)


def test_preprocess_keeps_aspect_and_pads_right_with_zeros():
    # 100x30 into rows of 16 px, 2 rows: the image becomes 107x32 and 5 columns of padding follow.
    tensor = preprocess_image(Image.new("RGB", (100, 30), (255, 255, 255)), patch_size=16, max_patches=16)
    assert tensor.shape == (3, 32, 112)
    assert (tensor[:, :, 107:] == 0).all()
    assert (tensor[:, :, :107] > 1).all()  # white, normalised with ImageNet statistics


def test_train_augmentation_changes_colours_but_never_flips():
    img = two_halves(32, 32)
    plain = preprocess_image(img, 8, 16)
    for _ in range(5):
        augmented = preprocess_image(img, 8, 16, train=True)
        assert augmented.shape == plain.shape and not torch.equal(augmented, plain)
        assert (augmented[0, :, :8] > augmented[2, :, :8]).all()  # the left stays red
        assert (augmented[2, :, -8:] > augmented[0, :, -8:]).all()  # the right stays blue


def test_transparent_pixels_become_white_not_black():
    tensor = preprocess_image(Image.new("RGBA", (16, 16), (0, 0, 0, 0)), 8, 4)
    white = preprocess_image(Image.new("RGB", (16, 16), (255, 255, 255)), 8, 4)
    assert torch.allclose(tensor, white)


def test_file_token_count_matches_the_preprocessed_image_even_when_exif_rotates_it(tmp_path):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees": a 60x20 sensor image is shown 20 wide, 60 tall
    two_halves(60, 20).save(path, exif=exif)
    count = file_image_tokens(path, 8, 16)
    assert count == num_image_tokens(preprocess_image(path, 8, 16), 8)
    assert image_grid(20, 60, 8, 16)[0] > image_grid(20, 60, 8, 16)[1]  # taller than wide after rotation


def test_image_cache_gives_the_plain_preprocessing_and_fresh_augmentation(tmp_path):
    path = tmp_path / "a.png"
    two_halves(50, 30).save(path)
    cache = ImageCache(8, 16)
    assert torch.equal(cache.image(path, train=False), preprocess_image(path, 8, 16))
    assert torch.equal(cache.image(path, train=True), preprocess_image(path, 8, 16))  # no Augment: none applied
    jittered = ImageCache(8, 16, Augment(brightness=0.5))
    assert not torch.equal(jittered.image(path, train=True), jittered.image(path, train=True))
    assert cache.batch([[path], [], [path, path]], train=False) is not None
    assert len(cache.batch([[path], [], [path, path]], train=False)) == 3
    assert cache.batch([[], []], train=False) is None


def test_num_image_tokens_rejects_unpadded_sizes():
    with pytest.raises(ValueError, match="preprocess_image"):
        num_image_tokens(torch.zeros(3, 30, 32), 8)


# ---- the safe loader --------------------------------------------------------------------------------


def png_claiming_size(path, width, height):
    """A tiny valid-looking PNG whose header claims width x height pixels (a decompression bomb)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    bomb = png_claiming_size(tmp_path / "bomb.png", 100_000, 100_000)
    assert bomb.stat().st_size < 200
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no PIL warning leaks out
        with pytest.raises(ImageError, match=r"bomb\.png.*decompression bomb"):
            open_image(bomb)


def test_pixel_cap_is_configurable(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    assert open_image(tmp_path / "big.png").size == (100, 100)
    with pytest.raises(ImageError, match=r"big\.png: image too large \(100x100 = 10,000 pixels; limit 5,000 pixels\)"):
        open_image(tmp_path / "big.png", max_pixels=5000)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_gives_clear_error(tmp_path, fmt):
    path = tmp_path / f"cut.{fmt.lower()}"
    Image.effect_noise((64, 64), 50).convert("RGB").save(path, format=fmt)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ImageError, match=rf"cut\.{fmt.lower()}: damaged or truncated image"):
        open_image(path)
    with pytest.raises(ImageError, match="damaged or truncated"):
        preprocess_image(path, 8, 16)


def test_non_image_and_missing_files(tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(ImageError, match=r"notes\.png: not an image"):
        open_image(tmp_path / "notes.png")
    with pytest.raises(ImageError, match=r"absent\.png: file not found"):
        open_image(tmp_path / "absent.png")


# ---- the encoder ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, patch", [("vit", 8), ("resnet18", 16)])
def test_encoder_output_shapes_for_mixed_sizes(kind, patch):
    encoder = UnifiedMultimodalEncoder(encoder_config(kind, image_patch_size=patch))
    images = [
        preprocess_image(Image.new("RGB", size, (9, 99, 199)), patch, 16) for size in [(40, 40), (100, 30), (5, 90)]
    ]
    out = encoder(images)
    assert [o.shape for o in out] == [(num_image_tokens(i, patch), 32) for i in images]
    assert [o.shape[0] for o in out] == [16, 14, 16]


@pytest.mark.parametrize("kind, patch", [("vit", 8), ("resnet18", 16)])
def test_image_encoded_alone_equals_in_mixed_batch(kind, patch):
    encoder = UnifiedMultimodalEncoder(encoder_config(kind, image_patch_size=patch)).eval()
    small, wide = torch.randn(3, 16, 16), torch.randn(3, 2 * patch, 7 * patch)  # different patch counts
    together = encoder([wide, small, wide])
    assert torch.allclose(encoder([small])[0], together[1], atol=1e-5)  # padding never leaks in
    assert torch.allclose(encoder([wide])[0], together[0], atol=1e-5)


@pytest.mark.parametrize("kind, patch", [("vit", 8), ("resnet18", 16)])
def test_different_images_give_different_embeddings(kind, patch):
    encoder = UnifiedMultimodalEncoder(encoder_config(kind, image_patch_size=patch)).eval()
    red_left = preprocess_image(two_halves(32, 32), patch, 16)
    red_right = preprocess_image(two_halves(32, 32, left=(60, 60, 200), right=(200, 60, 60)), patch, 16)
    a, b = encoder([red_left, red_right])
    assert not torch.allclose(a, b, atol=1e-3)


def test_vit_gradients_reach_every_part():
    encoder = UnifiedMultimodalEncoder(encoder_config("vit"))
    out = encoder([torch.randn(3, 16, 24), torch.randn(3, 32, 32)])
    torch.cat(out).pow(2).sum().backward()
    vit = encoder.backbone
    for name, param in [
        ("patchify", vit.patchify.weight), ("row_embed", vit.row_embed.weight), ("col_embed", vit.col_embed.weight),
        ("attention", vit.blocks[0].qkv.weight), ("ffn", vit.blocks[-1].ffn.down.weight),
        ("projector", encoder.projector[0].weight), ("modality", encoder.modality),
    ]:  # fmt: skip
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def distance_encoder(curve: torch.Tensor | None = None) -> UnifiedMultimodalEncoder:
    """A one-block ViT whose heads all have the distance curve `curve` (knots from 0 to the diagonal)."""
    torch.manual_seed(0)
    encoder = UnifiedMultimodalEncoder(encoder_config(image_encoder_layers=1, image_distance_bias=True)).eval()
    if curve is not None:
        encoder.backbone.distance_bias.curves.data[:] = curve
    return encoder


def test_distance_bias_starts_as_a_no_op():
    plain = UnifiedMultimodalEncoder(encoder_config(image_encoder_layers=1)).eval()
    biased = distance_encoder()
    missing = biased.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["backbone.distance_bias.curves"]
    images = [torch.randn(3, 32, 32), torch.randn(3, 16, 24)]  # two grids, so padding is masked too
    for a, b in zip(plain(images), biased(images), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("direction", ["falling", "rising"])
def test_distance_curves_make_a_patch_read_near_or_far_patches(direction):
    """Patch 0 (top left) of a 4 x 4 grid: a steeply falling curve makes it read only itself, so changing the
    far corner's pixels leaves it as it was; a rising one makes it read only the far corner, so changing its
    neighbour leaves it as it was. With a flat curve both changes reach it."""
    image = torch.rand(3, 32, 32)
    far, near = image.clone(), image.clone()
    far[:, 24:, 24:] = torch.rand(3, 8, 8)  # patch 15
    near[:, :8, 8:16] = torch.rand(3, 8, 8)  # patch 1

    def change(encoder, changed):
        with torch.no_grad():
            return float((encoder([image])[0][0] - encoder([changed])[0][0]).abs().max())

    steep = torch.linspace(0, 60, 16)
    flat = distance_encoder()
    assert change(flat, far) > 1e-3 and change(flat, near) > 1e-3
    if direction == "falling":
        assert change(distance_encoder(-steep), far) < 1e-5 < change(distance_encoder(-steep), image * 0.5)
    else:
        assert change(distance_encoder(steep), near) < 1e-5 < change(distance_encoder(steep), far)


def test_distance_bias_keeps_padding_out():
    encoder = distance_encoder(torch.randn(16) * 3)
    small, wide = torch.randn(3, 16, 16), torch.randn(3, 16, 56)
    together = encoder([wide, small])
    assert torch.allclose(encoder([small])[0], together[1], atol=1e-5)
    assert torch.allclose(encoder([wide])[0], together[0], atol=1e-5)


def test_resnet_gradients_reach_the_stem():
    encoder = UnifiedMultimodalEncoder(encoder_config("resnet18", image_patch_size=16))
    torch.cat(encoder([torch.randn(3, 32, 48)])).sum().backward()
    assert encoder.backbone.body.conv1.weight.grad.abs().sum() > 0


def test_encoder_rejects_bad_images_and_configs():
    encoder = UnifiedMultimodalEncoder(encoder_config("vit"))
    with pytest.raises(ValueError, match="whole number of 8-pixel patches"):
        encoder([torch.randn(3, 20, 16)])
    with pytest.raises(ValueError, match="exceeds image_max_patches=16"):
        encoder([torch.randn(3, 40, 40)])
    with pytest.raises(ValueError, match=r"expected a \(3, H, W\) tensor"):
        encoder([torch.randn(1, 16, 16)])
    with pytest.raises(ConfigError, match="image_patch_size must be one of"):
        UnifiedMultimodalEncoder(encoder_config("resnet18", image_patch_size=14))
    with pytest.raises(ConfigError, match="image_distance_bias .* needs image_encoder vit"):
        encoder_config("resnet18", image_patch_size=16, image_distance_bias=True)


def test_pretrained_weights_come_only_from_the_cache(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    encoder = UnifiedMultimodalEncoder(encoder_config("resnet18", image_patch_size=16, image_pretrained=True))
    with pytest.warns(UserWarning, match="no cached ImageNet weights"):
        assert encoder.load_pretrained_backbone() is False

    cached = torchvision.models.resnet18(weights=None).state_dict()
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(cached, tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1])
    assert encoder.load_pretrained_backbone() is True
    assert torch.equal(encoder.backbone.body.layer3[0].conv1.weight, cached["layer3.0.conv1.weight"])
