"""Watermarking pieces in plain PyTorch: attacks, training noise layers, MBRS."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vision.watermark.attacks import ATTACKS, attack, chain, crop, jpeg, jpeg_size
from vision.watermark.mbrs import (
    MBRS,
    bit_error_rate,
    discriminator_loss,
    hidden_tiny,
    mbrs_128_30_diffusion,
    mbrs_128_64,
    mbrs_losses,
    mbrs_tiny,
    mbrs_tiny_diffusion,
    psnr,
)
from vision.watermark.noise import NOISE_LAYERS, Combined, DiffJpeg, JpegMask, RealJpeg, build_noise


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    import skimage.data

    return np.asarray(Image.fromarray(skimage.data.astronaut()).resize((128, 128), Image.LANCZOS))


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255.0


# ----------------------------------------------------------------------------- attacks

def test_jpeg_quality_orders_file_size_and_error(photo):
    qualities = [10, 30, 50, 70, 90, 95]
    sizes = [jpeg_size(photo, q) for q in qualities]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    errors = [np.abs(jpeg(photo, q).astype(float) - photo).mean() for q in qualities]
    assert errors == sorted(errors, reverse=True)
    assert jpeg_size(photo, 50, "444") > jpeg_size(photo, 50, "420")  # full-resolution chroma costs bytes
    with pytest.raises(ValueError, match="1..100"):
        jpeg(photo, 0)


def test_geometric_and_pixel_attacks_do_what_they_say(photo):
    for fraction in (0.25, 0.5, 0.9):
        kept = crop(photo, fraction)
        assert kept.shape[0] * kept.shape[1] / (128 * 128) == pytest.approx(fraction, abs=0.02)
    assert attack(photo, "crop_resize", 0.5).shape == photo.shape
    assert attack(photo, "resize", 0.5).shape == (64, 64, 3)
    inverse = 255 - photo  # differs from the photo in every pixel
    dropped = attack(photo, "dropout", 0.7, seed=1, cover=inverse)
    assert (dropped != photo).any(-1).mean() == pytest.approx(0.3, abs=0.03)
    kept = attack(photo, "cropout", 0.25, seed=1, cover=inverse)
    assert (kept == photo).all(-1).mean() == pytest.approx(0.25, abs=0.02)
    masked = attack(photo + (photo == 0), "crop_black", 0.25, seed=1)  # no black pixel of its own
    assert (masked != 0).all(-1).mean() == pytest.approx(0.25, abs=0.02) and masked.shape == photo.shape
    rows, cols = np.nonzero((masked != 0).all(-1))
    assert (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) == len(rows)  # one rectangle, in place
    assert np.array_equal(masked[rows, cols], (photo + (photo == 0))[rows, cols])
    peppered = attack(photo, "salt_pepper", 0.1, seed=2)
    assert (peppered != photo).any(-1).mean() == pytest.approx(0.1, abs=0.02)
    assert np.array_equal(attack(photo, "rotation", 0), photo)
    assert attack(photo, "gaussian_blur", 2.0).std() < photo.std()
    noisy = attack(photo, "gaussian_noise", 5.0, seed=3)
    assert (noisy.astype(float) - photo).std() == pytest.approx(5.0, rel=0.15)
    assert attack(photo, "brightness", 1.3).mean() > photo.mean()
    assert np.array_equal(attack(photo, "jpeg420", 50), jpeg(photo, 50, "420"))
    chained = chain(photo, [("crop_resize", 0.5), ("jpeg", 50)])
    assert chained.shape == photo.shape and not np.array_equal(chained, photo)
    assert {"jpeg", "crop", "cropout", "dropout", "median_filter", "contrast"} <= set(ATTACKS)
    with pytest.raises(ValueError, match="available"):
        attack(photo, "sharpen", 1.0)


# ----------------------------------------------------------------------------- noise layers

@pytest.mark.parametrize("quality", [10, 50, 90])
@pytest.mark.parametrize("subsampling", ["420", "444"])
def test_differentiable_jpeg_is_close_to_pillow(photo, quality, subsampling):
    original = to_tensor(photo)
    pillow = to_tensor(jpeg(photo, quality, subsampling))
    ours = DiffJpeg(quality, subsampling)(original)
    ours_vs_pillow = float((ours - pillow).abs().mean()) * 255
    jpeg_error = float((original - pillow).abs().mean()) * 255
    assert ours_vs_pillow < 1.5  # grey levels; the compression error itself is 3-13
    assert ours_vs_pillow < 0.4 * jpeg_error


def test_quantisation_tables_are_libjpegs_at_every_quality():
    import io

    from vision.watermark.noise import CHROMA_TABLE, LUMA_TABLE, quality_table

    for quality in range(1, 101):
        buffer = io.BytesIO()
        Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as image:
            tables = image.quantization
        assert torch.equal(torch.tensor(tables[0], dtype=torch.float32).view(8, 8), quality_table(LUMA_TABLE, quality))
        assert torch.equal(torch.tensor(tables[1], dtype=torch.float32).view(8, 8), quality_table(CHROMA_TABLE, quality))


def test_gradients_flow_through_every_training_noise_layer():
    torch.manual_seed(0)
    cover = torch.rand(2, 3, 32, 32)
    for name, layer_class in NOISE_LAYERS.items():
        layer = layer_class() if name != "real_jpeg" else RealJpeg(straight_through=True)
        encoded = (cover + 0.05 * torch.randn_like(cover)).clamp(0, 1).requires_grad_(True)
        out = layer(encoded, cover)
        assert out.shape == cover.shape, name
        (out * torch.randn_like(out)).sum().backward()
        assert encoded.grad is not None and torch.isfinite(encoded.grad).all() and encoded.grad.abs().sum() > 0, name
    encoded = cover.clone().requires_grad_(True)
    assert not RealJpeg()(encoded).requires_grad  # the paper's real JPEG: no gradient to the encoder


def test_jpeg_mask_keeps_low_frequencies_only():
    from vision.watermark.noise import dct_matrix

    dct = dct_matrix()

    def tiled(row: int, col: int) -> torch.Tensor:  # one 8x8 DCT basis image in every block, grey
        basis = torch.zeros(8, 8)
        basis[row, col] = 1.0
        block = dct.T @ basis @ dct
        return (0.5 + 0.1 * block.repeat(4, 4))[None, None].expand(1, 3, 32, 32)

    mask = JpegMask(subsampling="444")
    low, high = tiled(1, 2), tiled(6, 7)
    assert float((mask(low) - low).abs().max()) < 1e-3
    assert float((mask(high) - 0.5).abs().max()) < 1e-3  # that frequency is gone


def test_combined_draws_one_layer_per_batch_and_specs_build():
    combined = build_noise(["identity", {"diff_jpeg": {"quality": 50}}, "jpeg_mask"])
    assert isinstance(combined, Combined) and len(combined.layers) == 3
    seen = set()
    for _ in range(30):
        combined(torch.rand(1, 3, 16, 16))
        seen.add(combined.last)
    assert seen == {0, 1, 2}
    with pytest.raises(ValueError, match="available"):
        build_noise("jpeg2000")


# ----------------------------------------------------------------------------- MBRS

def test_mbrs_presets_and_their_shapes():
    for model, bits in ((mbrs_128_64(channels=8, blocks=2), 64), (mbrs_128_30_diffusion(channels=8, blocks=2), 30),
                        (mbrs_tiny_diffusion(), 16)):
        cover = torch.rand(2, 3, model.size, model.size)
        message = torch.randint(0, 2, (2, bits))
        assert model.embed(cover, message).shape == cover.shape
        assert model.extract(cover).shape == (2, bits)
    with pytest.raises(ValueError, match="not a square"):
        MBRS(128, 30)
    model = mbrs_tiny()
    cover = torch.rand(2, 3, 32, 32)
    assert torch.equal(model.embed(cover, torch.randint(0, 2, (2, 16)), strength=0.0), cover)
    assert sum(isinstance(m, torch.nn.Sigmoid) for m in hidden_tiny().modules()) == 0  # no SE blocks


def test_a_tiny_mbrs_learns_to_carry_its_message():
    from vision.forensics.synthetic import photographs, real_video

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = photographs()
    data = torch.cat([torch.from_numpy(real_video(rng, images, 32, 1)) for _ in range(400)]).float()
    train, test = data[:300], data[300:]
    model = mbrs_tiny()
    noise = build_noise("identity")
    optimizer = torch.optim.Adam([*model.encoder.parameters(), *model.decoder.parameters()], lr=1e-3)
    critic = torch.optim.Adam(model.discriminator.parameters(), lr=1e-3)
    for _ in range(120):
        cover = train[torch.randint(0, 300, (32,))]
        bits = torch.randint(0, 2, (32, 16))
        losses, encoded, _ = mbrs_losses(model, cover, bits, noise)
        optimizer.zero_grad()
        losses.total.backward()
        optimizer.step()
        critic.zero_grad()
        discriminator_loss(model, cover, encoded).backward()
        critic.step()
    model.eval()
    with torch.no_grad():
        bits = torch.randint(0, 2, (100, 16))
        watermarked = model.embed(test, bits)
        assert bit_error_rate(model.extract(watermarked), bits) < 0.01  # chance is 0.5
        assert float(psnr(watermarked, test).mean()) > 15.0


# ----------------------------------------------------------------------------- methods

def test_mbrs_method_restores_from_its_checkpoint(tmp_path, photo):
    from vision.watermark.methods import MBRSMethod, build_method, save_mbrs

    torch.manual_seed(0)
    model = mbrs_tiny().eval()
    path = save_mbrs(model, tmp_path / "mbrs.pt")
    method = build_method("mbrs", checkpoint=str(path))
    direct = MBRSMethod(model)
    bits = np.random.default_rng(0).integers(0, 2, 16)
    image = photo[:32, :32].copy()
    assert np.array_equal(method.embed(image, bits), direct.embed(image, bits))
    assert np.array_equal(method.extract(photo), direct.extract(photo))  # any size: resized to 32 first
    assert method.extract(photo).shape == (16,)
    with pytest.raises(ValueError, match="available: mbrs, hidden, dwtDct"):
        build_method("stegastamp")


def test_shipped_weights_carry_their_message_through_what_they_were_trained_for():
    """The built-in MBRS weights on crops of photographs none of them trained on: the JPEG model
    reads its bits back after JPEG Q50; the diffusion model after MBRS's Crop (a quarter of the
    image kept, black elsewhere), which the plain model cannot survive."""
    import skimage.data

    from vision.watermark.methods import builtin_weights, build_method

    assert {"mbrs_tiny_jpeg", "mbrs_tiny_diffusion_crop"} <= set(builtin_weights())
    jpeg_model = build_method("mbrs", checkpoint="builtin:mbrs_tiny_jpeg")
    crop_model = build_method("mbrs", checkpoint="builtin:mbrs_tiny_diffusion_crop")
    rng = np.random.default_rng(0)
    pictures = [skimage.data.retina(), skimage.data.immunohistochemistry(), skimage.data.colorwheel()[..., :3]]
    covers = []
    for index in range(24):
        picture = pictures[index % len(pictures)]
        top, left = rng.integers(0, picture.shape[0] - 96), rng.integers(0, picture.shape[1] - 96)
        crop_ = np.ascontiguousarray(picture[top: top + 96, left: left + 96])
        covers.append(np.asarray(Image.fromarray(crop_).resize((32, 32), Image.LANCZOS)))

    def errors(method, attack_name, strength):
        wrong, quality = [], []
        for index, cover in enumerate(covers):
            bits = rng.integers(0, 2, 16)
            marked = method.embed(cover, bits)
            quality.append(float(psnr(to_tensor(marked), to_tensor(cover))))
            wrong.append(np.mean(method.extract(attack(marked, attack_name, strength, seed=index)) != bits))
        return float(np.mean(wrong)), float(np.mean(quality))

    jpeg_ber, jpeg_psnr = errors(jpeg_model, "jpeg420", 50)
    assert jpeg_ber <= 0.02 and jpeg_psnr > 32.0  # chance is 0.5; trained for a high PSNR (35.5 dB on the benchmark)
    crop_ber, _ = errors(crop_model, "crop_black", 0.25)
    plain_crop_ber, _ = errors(jpeg_model, "crop_black", 0.25)
    assert crop_ber <= 0.03 and plain_crop_ber > crop_ber + 0.2
    with pytest.raises(ValueError, match="no built-in MBRS weights 'mbrs_huge'; available: builtin:mbrs_tiny"):
        build_method("mbrs", checkpoint="builtin:mbrs_huge")


@pytest.mark.parametrize("kind", ["dwtDct", "dwtDctSvd", "rivaGan"])
def test_invisible_watermark_adapter_round_trips_a_message(photo, kind):
    from vision.watermark.methods import build_method

    image = np.asarray(Image.fromarray(photo).resize((256, 256), Image.LANCZOS))
    method = build_method(kind, message_length=32)
    bits = np.random.default_rng(1).integers(0, 2, 32)
    watermarked = method.embed(image, bits)
    assert watermarked.shape == image.shape and watermarked.dtype == np.uint8
    assert float(psnr(to_tensor(watermarked), to_tensor(image))) > 30.0
    assert np.mean(method.extract(watermarked) == bits) >= 0.9
