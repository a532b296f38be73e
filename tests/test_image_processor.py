"""Tests for CDBVQImageProcessor on real photos from skimage.data (CPU, offline, fast)."""

import io
import json

import numpy as np
import PIL.Image
import pytest
import torch
from skimage import data
from transformers import BatchFeature
from transformers.image_utils import PILImageResampling

from cdb_tokenizer.image_processing_cdb_vq import CDBVQImageProcessor


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()  # (512, 512, 3) uint8


@pytest.fixture(scope="module")
def coffee() -> np.ndarray:
    return data.coffee()  # (400, 600, 3) uint8, landscape


@pytest.fixture(scope="module")
def camera() -> np.ndarray:
    return data.camera()  # (512, 512) uint8 greyscale


def pil_resize_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Independent reference: PIL bicubic resize to cover (height, width), then centre crop."""
    h, w = image.shape[:2]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    resized = np.asarray(PIL.Image.fromarray(image).resize((new_w, new_h), PIL.Image.BICUBIC))
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return resized[top : top + height, left : left + width]


def to_uint8(processor: CDBVQImageProcessor, pixel_values: torch.Tensor) -> np.ndarray:
    return processor.postprocess(pixel_values, return_tensors="np")["pixel_values"]


# ----------------------------------------------------------------------------- preprocess


def test_output_shape_dtype_and_range(astronaut, coffee):
    processor = CDBVQImageProcessor()
    out = processor([astronaut, coffee], return_tensors="pt")
    assert isinstance(out, BatchFeature)
    assert list(out.keys()) == processor.model_input_names == ["pixel_values"]
    pixel_values = out["pixel_values"]
    assert pixel_values.shape == (2, 3, 256, 256)
    assert pixel_values.dtype == torch.float32
    assert pixel_values.min() >= -1.0 and pixel_values.max() <= 1.0
    # Really normalised to [-1, 1], not left in [0, 1] or [0, 255].
    assert pixel_values.min() < -0.9 and pixel_values.max() > 0.9


def test_single_image_is_a_batch_of_one(astronaut):
    processor = CDBVQImageProcessor()
    single = processor(astronaut, return_tensors="pt")["pixel_values"]
    listed = processor([astronaut], return_tensors="pt")["pixel_values"]
    assert single.shape == (1, 3, 256, 256)
    torch.testing.assert_close(single, listed)


def test_4d_batches(astronaut):
    processor = CDBVQImageProcessor()
    batch_np = np.stack([astronaut, astronaut[::-1]])  # (B, H, W, C)
    batch_pt = torch.from_numpy(batch_np).permute(0, 3, 1, 2)  # (B, C, H, W)
    out_np = processor(batch_np, return_tensors="pt")["pixel_values"]
    out_pt = processor(batch_pt, return_tensors="pt")["pixel_values"]
    assert out_np.shape == (2, 3, 256, 256)
    torch.testing.assert_close(out_np, out_pt)
    assert not torch.allclose(out_np[0], out_np[1])


def test_return_tensors_np_and_none(astronaut):
    processor = CDBVQImageProcessor()
    as_np = processor(astronaut, return_tensors="np")["pixel_values"]
    as_list = processor(astronaut)["pixel_values"]
    as_pt = processor(astronaut, return_tensors="pt")["pixel_values"]
    assert isinstance(as_np, np.ndarray) and as_np.dtype == np.float32 and as_np.shape == (1, 3, 256, 256)
    assert isinstance(as_list, list) and len(as_list) == 1 and as_list[0].shape == (3, 256, 256)
    np.testing.assert_allclose(as_np, as_pt.numpy())
    torch.testing.assert_close(as_list[0], as_pt[0])


def test_greyscale_becomes_three_channels(camera):
    processor = CDBVQImageProcessor()
    for image in (camera, PIL.Image.fromarray(camera), torch.from_numpy(camera)):
        pixel_values = processor(image, return_tensors="pt")["pixel_values"]
        assert pixel_values.shape == (1, 3, 256, 256)
        torch.testing.assert_close(pixel_values[0, 0], pixel_values[0, 1])
        torch.testing.assert_close(pixel_values[0, 0], pixel_values[0, 2])
    # The grey values themselves are kept.
    expected = pil_resize_crop(camera, 256, 256).astype(np.float64)
    recovered = to_uint8(processor, processor(camera, return_tensors="pt")["pixel_values"])[0, ..., 0]
    assert np.abs(recovered - expected).mean() < 2.0


def test_float_and_16_bit_greyscale_pil_images_keep_their_values(camera):
    # PIL's convert("RGB") clips modes "F" and "I" at 255: a [0, 1] float image came out black, a 16-bit one white.
    processor = CDBVQImageProcessor(do_resize=False, do_center_crop=False)
    expected = processor(camera, return_tensors="pt")["pixel_values"]
    images = {
        "F in [0, 1]": PIL.Image.fromarray(camera.astype(np.float32) / 255.0),
        "F in [0, 255]": PIL.Image.fromarray(camera).convert("F"),  # PIL's own scale
        "I, 16-bit": PIL.Image.fromarray(camera.astype(np.int32) * 257),
        "I, 8-bit": PIL.Image.fromarray(camera).convert("I"),
        "I;16": PIL.Image.fromarray(camera.astype(np.uint16) * 257),
    }
    for name, image in images.items():
        assert image.mode == name.split(",")[0].split(" ")[0], name
        torch.testing.assert_close(processor(image, return_tensors="pt")["pixel_values"], expected, atol=1e-5, rtol=0, msg=name)
    with pytest.raises(ValueError, match=r"PIL mode F must have values in \[0, 255\]"):
        processor(PIL.Image.fromarray(camera.astype(np.float32) * 2))
    with pytest.raises(ValueError, match=r"PIL mode I must have values in \[0, 65535\]"):
        processor(PIL.Image.fromarray(camera.astype(np.int32) * 1000))


def test_16_bit_and_wide_integer_arrays_and_tensors_keep_their_values(astronaut):
    processor = CDBVQImageProcessor(do_resize=False, do_center_crop=False)
    expected = processor(astronaut, return_tensors="pt")["pixel_values"]
    sixteen_bit = astronaut.astype(np.uint16) * 257  # 255 -> 65535: the same picture on the 16-bit scale
    images = {
        "uint16 array": sixteen_bit,
        "uint16 tensor": torch.from_numpy(sixteen_bit).permute(2, 0, 1),
        "int32 array in [0, 255]": astronaut.astype(np.int32),
        "int64 tensor in [0, 255]": torch.from_numpy(astronaut).permute(2, 0, 1).long(),
    }
    for name, image in images.items():
        torch.testing.assert_close(processor(image, return_tensors="pt")["pixel_values"], expected, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("low, high", [(0, 256), (-1, 255), (0, 65535)])
def test_wide_integer_images_outside_0_255_are_refused(astronaut, low, high):
    # Only uint16 says "16-bit": an int32 or int16 image with a value past 255 has no scale the processor could know.
    image = astronaut.astype(np.int32)
    image[0, 0, 0], image[1, 1, 1] = low, high
    with pytest.raises(ValueError, match=rf"Integer images must have values in \[0, 255\], got \[{low}, {high}\]"):
        CDBVQImageProcessor()(image)
    with pytest.raises(ValueError, match=r"Integer images must have values in \[0, 255\]"):
        CDBVQImageProcessor()(torch.from_numpy(image).permute(2, 0, 1))


def test_single_channel_hwc_array(camera):
    processor = CDBVQImageProcessor()
    a = processor(camera[..., None], return_tensors="pt")["pixel_values"]
    b = processor(camera, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(a, b)


def test_rgba_becomes_rgb_composited_on_white(astronaut):
    processor = CDBVQImageProcessor(do_resize=False, do_center_crop=False)
    alpha = np.full(astronaut.shape[:2] + (1,), 255, dtype=np.uint8)
    alpha[:, :100] = 0  # transparent strip on the left
    rgba = np.concatenate([astronaut, alpha], axis=-1)
    rgb = processor(astronaut, return_tensors="pt")["pixel_values"]
    for image in (rgba, PIL.Image.fromarray(rgba, mode="RGBA"), torch.from_numpy(rgba).permute(2, 0, 1)):
        pixel_values = processor(image, return_tensors="pt")["pixel_values"]
        assert pixel_values.shape == (1, 3, 512, 512)
        torch.testing.assert_close(pixel_values[..., 100:], rgb[..., 100:])  # opaque: unchanged
        assert torch.all(pixel_values[..., :100] == 1.0)  # transparent: white


def _reopened(image: PIL.Image.Image, format: str, **options) -> PIL.Image.Image:
    """`image` as PIL opens it from a file of `format` (mode, info and `image.format` as a user's file gives them)."""
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    buffer.seek(0)
    return PIL.Image.open(buffer)


def test_greyscale_files_are_read_on_their_own_scale_and_ambiguous_floats_refused(camera):
    # A dark 16-bit PGM (PIL opens it as mode "I") whose values stayed <= 255 was read as 8-bit: ~257x too bright. A
    # [0, 1] float image with one pixel at 1.01 was read as [0, 255]: black.
    processor = CDBVQImageProcessor(do_resize=False, do_center_crop=False)
    dark = (camera // 2).astype(np.uint16)  # at most 127 of 65535: nearly black
    expected = processor(dark.astype(np.float32) / 65535.0, return_tensors="pt")["pixel_values"]
    for name, image in {"PGM": _reopened(PIL.Image.fromarray(dark), "PPM"),
                        "PNG": _reopened(PIL.Image.fromarray(dark), "PNG")}.items():  # fmt: skip
        torch.testing.assert_close(processor(image, return_tensors="pt")["pixel_values"], expected, atol=1e-5, rtol=0, msg=name)
    overshoot = camera.astype(np.float32) / 255.0
    overshoot[0, 0] = 1.01
    with pytest.raises(ValueError, match=r"values reach just past 1 \(up to 1.01\): its scale is ambiguous.*clip it"):
        processor(PIL.Image.fromarray(overshoot))
    # A dark image on PIL's [0, 255] scale with a small bright spot is no overshoot: read as it always was.
    spot = np.zeros((100, 100), np.uint8)
    spot[:9, :9] = 255
    expected = processor(spot, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(processor(PIL.Image.fromarray(spot).convert("F"), return_tensors="pt")["pixel_values"], expected)


@pytest.mark.parametrize("mode", ["L", "RGB", "I;16"])
def test_a_transparency_colour_key_is_composited_on_white(mode):
    # The processor composited only alpha bands and palettes: a PNG's tRNS key came out black, where cdb-vq's data
    # loading (decode_image) made it white; a 16-bit key neither did.
    from cdb_tokenizer.tools.data import decode_image

    array = np.zeros((32, 32), np.uint16 if mode == "I;16" else np.uint8)
    array[:, 16:] = 30000 if mode == "I;16" else 128
    image = PIL.Image.fromarray(np.stack([array] * 3, -1) if mode == "RGB" else array)
    image = _reopened(image, "PNG", transparency=(0, 0, 0) if mode == "RGB" else 0)
    assert image.mode == mode and "transparency" in image.info
    pixels = CDBVQImageProcessor(do_resize=False, do_center_crop=False)(image, return_tensors="pt")["pixel_values"][0]
    assert torch.all(pixels[:, :, :16] == 1.0) and torch.all(pixels[:, :, 16:] < 0.5)  # the key white, the rest not
    assert np.all(np.asarray(decode_image(image))[:, :16] == 255)


def test_an_image_pil_cannot_decode_is_a_value_error_naming_why(tmp_path, astronaut):
    # A truncated file surfaced as PIL's OSError from deep inside a conversion, a closed one as a bare AssertionError.
    path = tmp_path / "photo.jpg"
    PIL.Image.fromarray(astronaut).save(path)
    (tmp_path / "cut.jpg").write_bytes(path.read_bytes()[:5000])
    processor = CDBVQImageProcessor()
    with pytest.raises(ValueError, match=r"PIL cannot decode the image \(OSError: image file is truncated"):
        processor(PIL.Image.open(tmp_path / "cut.jpg"))
    with PIL.Image.open(path) as image:
        pass
    with pytest.raises(ValueError, match=r"PIL cannot decode the image \(AssertionError: its file was closed"):
        processor(image)


def test_palette_and_la_modes_become_rgb(astronaut, camera):
    processor = CDBVQImageProcessor()
    palette = PIL.Image.fromarray(astronaut).convert("P")
    la = PIL.Image.fromarray(camera).convert("LA")
    out_p = processor(palette, return_tensors="pt")["pixel_values"]
    out_la = processor(la, return_tensors="pt")["pixel_values"]
    assert out_p.shape == out_la.shape == (1, 3, 256, 256)
    # Palette quantisation is lossy, but the picture must still be the astronaut.
    ref = processor(astronaut, return_tensors="pt")["pixel_values"]
    assert (out_p - ref).abs().mean() < 0.05
    # Fully opaque LA is the greyscale image.
    torch.testing.assert_close(out_la, processor(camera, return_tensors="pt")["pixel_values"])


def test_numpy_pil_and_torch_inputs_agree(coffee):
    processor = CDBVQImageProcessor()
    reference = processor(coffee, return_tensors="pt")["pixel_values"]
    chw_uint8 = torch.from_numpy(coffee).permute(2, 0, 1)
    inputs = {
        "pil": PIL.Image.fromarray(coffee),
        "torch_uint8": chw_uint8,
        "torch_float": chw_uint8.float() / 255.0,
        "numpy_float": coffee.astype(np.float32) / 255.0,
        "numpy_float64": coffee / 255.0,
        "numpy_chw_forced": np.ascontiguousarray(coffee.transpose(2, 0, 1)),
    }
    for name, image in inputs.items():
        kwargs = {"input_data_format": "channels_first"} if name == "numpy_chw_forced" else {}
        out = processor(image, return_tensors="pt", **kwargs)["pixel_values"]
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_non_square_image_is_centre_cropped(coffee):
    processor = CDBVQImageProcessor(size={"height": 200, "width": 200})
    pixel_values = processor(coffee, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 200, 200)
    recovered = to_uint8(processor, pixel_values)[0].astype(np.float64)
    expected = pil_resize_crop(coffee, 200, 200).astype(np.float64)  # 200x300 then the middle 200 columns
    assert np.abs(recovered - expected).mean() < 2.0
    # Neither a stretched resize nor a left-aligned crop would match.
    stretched = np.asarray(PIL.Image.fromarray(coffee).resize((200, 200), PIL.Image.BICUBIC)).astype(np.float64)
    left = np.asarray(PIL.Image.fromarray(coffee).resize((300, 200), PIL.Image.BICUBIC))[:, :200].astype(np.float64)
    assert np.abs(recovered - stretched).mean() > 10.0
    assert np.abs(recovered - left).mean() > 10.0


def test_non_square_target_size(astronaut, coffee):
    processor = CDBVQImageProcessor(size=(128, 192))
    pixel_values = processor([astronaut, coffee], return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (2, 3, 128, 192)
    recovered = to_uint8(processor, pixel_values).astype(np.float64)
    assert np.abs(recovered[0] - pil_resize_crop(astronaut, 128, 192)).mean() < 2.0
    assert np.abs(recovered[1] - pil_resize_crop(coffee, 128, 192)).mean() < 2.0


def test_size_forms(coffee):
    assert CDBVQImageProcessor(size=64)(coffee, return_tensors="pt")["pixel_values"].shape == (1, 3, 64, 64)
    short = CDBVQImageProcessor(size={"shortest_edge": 64})
    assert short(coffee, return_tensors="pt")["pixel_values"].shape == (1, 3, 64, 64)
    no_crop = short(coffee, do_center_crop=False, return_tensors="pt")["pixel_values"]
    assert no_crop.shape == (1, 3, 64, 96)  # aspect ratio kept
    stretched = CDBVQImageProcessor(size=64, do_center_crop=False)(coffee, return_tensors="pt")["pixel_values"]
    assert stretched.shape == (1, 3, 64, 64)
    assert not torch.allclose(stretched, CDBVQImageProcessor(size=64)(coffee, return_tensors="pt")["pixel_values"])


def test_call_time_overrides_do_not_change_settings(astronaut):
    processor = CDBVQImageProcessor()
    out = processor(astronaut, size={"height": 32, "width": 48}, do_normalize=False, return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 32, 48)
    assert out["pixel_values"].min() >= 0.0  # [0, 1] without normalisation
    assert processor(astronaut, return_tensors="pt")["pixel_values"].shape == (1, 3, 256, 256)


# ---------------------------------------------------------------------------- postprocess


def test_postprocess_round_trip_is_close_to_resized_original(astronaut, coffee):
    processor = CDBVQImageProcessor()
    pixel_values = processor([astronaut, coffee], return_tensors="pt")["pixel_values"]
    recovered = to_uint8(processor, pixel_values).astype(np.float64)
    for got, original in zip(recovered, (astronaut, coffee)):
        assert np.abs(got - pil_resize_crop(original, 256, 256)).mean() < 2.0


def test_postprocess_round_trip_is_exact_without_resizing(astronaut):
    processor = CDBVQImageProcessor(do_resize=False, size=512)
    pixel_values = processor(astronaut, return_tensors="pt")["pixel_values"]
    np.testing.assert_array_equal(to_uint8(processor, pixel_values)[0], astronaut)


def test_postprocess_return_types(astronaut):
    processor = CDBVQImageProcessor(size=(64, 96))
    pixel_values = processor([astronaut, astronaut[:, ::-1]], return_tensors="pt")["pixel_values"]

    pil_images = processor.postprocess(pixel_values, return_tensors="PIL.Image.Image")["pixel_values"]
    assert isinstance(pil_images, list) and len(pil_images) == 2
    assert all(isinstance(im, PIL.Image.Image) and im.mode == "RGB" and im.size == (96, 64) for im in pil_images)

    arrays = processor.postprocess(pixel_values, return_tensors="np")["pixel_values"]
    assert isinstance(arrays, np.ndarray) and arrays.dtype == np.uint8 and arrays.shape == (2, 64, 96, 3)

    tensors = processor.postprocess(pixel_values, return_tensors="pt")["pixel_values"]
    assert isinstance(tensors, torch.Tensor) and tensors.dtype == torch.float32 and tensors.shape == (2, 3, 64, 96)
    assert tensors.min() >= 0.0 and tensors.max() <= 1.0
    torch.testing.assert_close(tensors, (pixel_values + 1) / 2)

    # The three modes describe the same pictures.
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in pil_images]), arrays)
    expected_uint8 = (tensors * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(arrays, expected_uint8)
    # Default is PIL.
    assert isinstance(processor.postprocess(pixel_values)["pixel_values"][0], PIL.Image.Image)


def test_postprocess_clamps_and_accepts_single_and_numpy():
    processor = CDBVQImageProcessor()
    values = torch.tensor([-3.0, -1.0, 0.5, 1.0, 5.0]).view(1, 1, 5).expand(3, 1, 5)  # single (3, H, W)
    arrays = processor.postprocess(values, return_tensors="np")["pixel_values"]
    assert arrays.shape == (1, 1, 5, 3)
    np.testing.assert_array_equal(arrays[0, 0, :, 0], [0, 0, 191, 255, 255])
    tensors = processor.postprocess(values.numpy(), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(tensors[0, 0, 0], torch.tensor([0.0, 0.0, 0.75, 1.0, 1.0]))


def test_postprocess_inverts_custom_normalisation(astronaut):
    processor = CDBVQImageProcessor(image_mean=[0.48, 0.45, 0.40], image_std=[0.26, 0.26, 0.27], size=64)
    pixel_values = processor(astronaut, return_tensors="pt")["pixel_values"]
    recovered = to_uint8(processor, pixel_values).astype(np.float64)[0]
    assert np.abs(recovered - pil_resize_crop(astronaut, 64, 64)).mean() < 2.0


def test_postprocess_unknown_return_tensors_raises(astronaut):
    processor = CDBVQImageProcessor()
    pixel_values = processor(astronaut, return_tensors="pt")["pixel_values"]
    for bad in ("pil", "tf", None):
        with pytest.raises(ValueError, match=r"return_tensors.*'PIL\.Image\.Image', 'np', 'pt'"):
            processor.postprocess(pixel_values, return_tensors=bad)


def test_postprocess_bad_inputs():
    processor = CDBVQImageProcessor()
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        processor.postprocess(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        processor.postprocess(torch.full((1, 3, 8, 8), float("nan")))
    with pytest.raises(TypeError, match="torch.Tensor or numpy.ndarray"):
        processor.postprocess("not pixels")
    with pytest.raises(ValueError, match="empty"):
        processor.postprocess([])


@pytest.mark.parametrize("dtype", [torch.complex64, torch.bool, torch.int64, torch.uint8])
def test_postprocess_refuses_pixel_values_that_are_not_floating_point(dtype):
    # Before: complex values lost their imaginary part with only a warning, bools and integers became images.
    processor = CDBVQImageProcessor()
    with pytest.raises(TypeError, match=f"floating-point.*got dtype {dtype}"):
        processor.postprocess(torch.zeros(1, 3, 8, 8, dtype=dtype))
    with pytest.raises(TypeError, match=f"got dtype {dtype}"):
        processor.postprocess([torch.zeros(3, 8, 8, dtype=dtype)])


def test_postprocess_names_the_sizes_of_a_list_it_cannot_batch():
    # Before: torch's "stack expects each tensor to be equal size".
    processor = CDBVQImageProcessor()
    with pytest.raises(ValueError, match=r"different shapes \[\(3, 4, 4\), \(3, 8, 8\)\]"):
        processor.postprocess([torch.zeros(3, 8, 8), torch.zeros(3, 4, 4)])


def test_postprocess_refuses_infinite_values_and_bad_overrides():
    processor = CDBVQImageProcessor()
    with pytest.raises(ValueError, match="NaN or infinite"):
        processor.postprocess(torch.full((1, 3, 8, 8), float("inf")))
    with pytest.raises(ValueError, match="rescale_factor"):
        processor.postprocess(torch.zeros(1, 3, 8, 8), rescale_factor=0.0)
    with pytest.raises(ValueError, match="image_std"):
        processor.postprocess(torch.zeros(1, 3, 8, 8), image_std=[0.5, 0.0, 0.5])


# ------------------------------------------------------------------------- serialisation


def test_save_and_load_round_trip(tmp_path, coffee):
    processor = CDBVQImageProcessor(
        size={"height": 96, "width": 128},
        resample=PILImageResampling.BILINEAR,
        do_center_crop=False,
        rescale_factor=1 / 127.5,
        do_normalize=True,
        image_mean=[0.1, 0.2, 0.3],
        image_std=[0.9, 0.8, 0.7],
        do_convert_rgb=False,
    )
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    loaded = CDBVQImageProcessor.from_pretrained(tmp_path)

    assert loaded.to_dict() == processor.to_dict()
    assert dict(loaded.size) == {"height": 96, "width": 128}
    assert int(loaded.resample) == int(PILImageResampling.BILINEAR)
    assert loaded.do_center_crop is False and loaded.do_convert_rgb is False
    assert loaded.rescale_factor == pytest.approx(1 / 127.5)
    assert tuple(loaded.image_mean) == (0.1, 0.2, 0.3) and tuple(loaded.image_std) == (0.9, 0.8, 0.7)
    torch.testing.assert_close(
        loaded(coffee, return_tensors="pt")["pixel_values"], processor(coffee, return_tensors="pt")["pixel_values"]
    )
    # And the defaults survive a round trip too.
    default = CDBVQImageProcessor()
    default.save_pretrained(tmp_path / "default")
    assert CDBVQImageProcessor.from_pretrained(tmp_path / "default").to_dict() == default.to_dict()


def test_defaults():
    processor = CDBVQImageProcessor()
    assert dict(processor.size) == {"height": 256, "width": 256}
    assert int(processor.resample) == int(PILImageResampling.BICUBIC)
    assert processor.do_resize and processor.do_center_crop and processor.do_rescale
    assert processor.do_normalize and processor.do_convert_rgb
    assert processor.rescale_factor == pytest.approx(1 / 255)
    assert tuple(processor.image_mean) == tuple(processor.image_std) == (0.5, 0.5, 0.5)


# ---------------------------------------------------------------------------- bad inputs


def test_unsupported_input_type_raises():
    processor = CDBVQImageProcessor()
    with pytest.raises(TypeError, match="Unsupported image type.*str"):
        processor("astronaut.png")
    with pytest.raises(TypeError, match="Unsupported image type.*dict"):
        processor([{"image": 1}])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: torch.zeros(3, 40, 40, device="meta"), "Image is a meta tensor"),
        (lambda: torch.zeros(2, 3, 40, 40, device="meta"), "Image is a meta tensor"),  # a batch
        (lambda: torch.zeros(3, 40, 40).to_sparse(), "Image is a torch.sparse_coo tensor: pass a dense one"),
        (lambda: torch.zeros(2, 3, 40, 40).to_sparse(), "Image is a torch.sparse_coo tensor"),
        (lambda: torch.zeros(3, 40, 40).to(torch.float8_e4m3fn), "Unsupported image dtype torch.float8_e4m3fn"),
    ],
)
def test_tensors_without_dense_pixel_data_are_named(make, message):
    # Torch's errors named neither the image nor the cause: "Tensor.item() cannot be called on meta tensors",
    # aminmax's NotImplementedError for sparse and float8 tensors.
    processor = CDBVQImageProcessor(size=32)
    with pytest.raises(TypeError, match=message):
        processor(make())
    if message.startswith("Image is a"):
        with pytest.raises(TypeError, match=message):
            processor.postprocess(make())


def test_unsupported_dtype_raises(astronaut):
    processor = CDBVQImageProcessor()
    with pytest.raises(TypeError, match="dtype"):
        processor(astronaut > 128)


def test_wrong_channel_count_raises(astronaut):
    processor = CDBVQImageProcessor()
    with pytest.raises(ValueError, match="number of channels"):
        processor(astronaut[..., :2])  # (H, W, 2)
    with pytest.raises(ValueError, match="number of channels"):
        processor(torch.zeros(5, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="number of channels: 2"):
        processor(np.ascontiguousarray(astronaut[..., :2].transpose(2, 0, 1)), input_data_format="channels_first")


def test_wrong_number_of_dimensions_raises(astronaut):
    processor = CDBVQImageProcessor()
    with pytest.raises(ValueError, match="dimensions"):
        processor(astronaut[None, None])
    with pytest.raises(ValueError, match="dimensions"):
        processor(astronaut[0, 0])


def test_empty_list_raises():
    processor = CDBVQImageProcessor()
    with pytest.raises(ValueError, match="empty list"):
        processor([])


@pytest.mark.parametrize("shape", [(0, 3, 32, 32), (1, 3, 0, 32)])
def test_postprocess_of_no_pixels_raises(shape):
    # Was torch's "max(): Expected reduction dim to be specified for input.numel() == 0".
    with pytest.raises(ValueError, match=r"postprocess got no pixels \(shape .*\): nothing to postprocess"):
        CDBVQImageProcessor().postprocess(torch.zeros(shape))


def test_nan_values_raise(astronaut):
    processor = CDBVQImageProcessor()
    image = astronaut.astype(np.float32) / 255.0
    image[10, 10, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        processor(image)
    tensor = torch.from_numpy(astronaut).permute(2, 0, 1).float() / 255.0
    tensor[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="infinite"):
        processor(tensor)


def test_float_values_outside_unit_range_raise(astronaut):
    processor = CDBVQImageProcessor()
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        processor(astronaut.astype(np.float32))  # floats in [0, 255]


def test_mismatched_shapes_with_tensors_raise(astronaut, coffee):
    processor = CDBVQImageProcessor(size={"shortest_edge": 32}, do_center_crop=False)
    with pytest.raises(ValueError, match="different shapes"):
        processor([astronaut, coffee], return_tensors="pt")
    shapes = [tuple(t.shape) for t in processor([astronaut, coffee])["pixel_values"]]
    assert shapes == [(3, 32, 32), (3, 32, 48)]


def test_crop_larger_than_image_raises(astronaut):
    processor = CDBVQImageProcessor(do_resize=False, size=1024)
    with pytest.raises(ValueError, match="smaller than the crop"):
        processor(astronaut)


def test_invalid_settings_raise():
    with pytest.raises(ValueError, match=r"resample.*got LANCZOS \(1\), which torch cannot resize with"):
        CDBVQImageProcessor(resample=PILImageResampling.LANCZOS)
    with pytest.raises(ValueError, match="size"):
        CDBVQImageProcessor(size={"shortest_edge": 64, "longest_edge": 128})
    with pytest.raises(ValueError, match="crop_size"):
        CDBVQImageProcessor(crop_size={"height": 64, "width": 64})
    with pytest.raises(ValueError, match="do_pad"):
        CDBVQImageProcessor()(data.astronaut(), do_pad=True)
    # transformers' other shared settings were stored, saved and ignored: a user asking for padding got none.
    with pytest.raises(ValueError, match="`pad_size` is not used by CDBVQImageProcessor"):
        CDBVQImageProcessor()(data.astronaut(), pad_size={"height": 64, "width": 64})
    for name, value in (("image_seq_length", 64), ("disable_grouping", True)):
        with pytest.raises(ValueError, match=f"`{name}` is not used"):
            CDBVQImageProcessor(**{name: value})
    with pytest.raises(ValueError, match="`default_to_square=False` is not supported"):
        CDBVQImageProcessor(size=32, default_to_square=False)
    CDBVQImageProcessor(disable_grouping=False, pad_size=None)  # the values that ask for nothing are taken
    with pytest.raises(TypeError, match="its settings are") as raised:
        CDBVQImageProcessor(foo=1)
    assert not any(name in str(raised.value) for name in ("pad_size", "image_seq_length", "disable_grouping", "do_pad"))


def test_a_read_only_numpy_image_is_taken_without_a_warning():
    # `np.asarray(pil_image)` is read-only: torch warned that it does not support non-writable tensors.
    import warnings

    image = np.asarray(PIL.Image.fromarray(data.astronaut()))
    assert not image.flags.writeable
    processor = CDBVQImageProcessor(size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixel_values = processor(image, return_tensors="pt").pixel_values
        frozen = pixel_values.numpy().copy()
        frozen.flags.writeable = False
        processor.postprocess(frozen)
    torch.testing.assert_close(pixel_values, processor(image.copy(), return_tensors="pt").pixel_values)


NAN, INF = float("nan"), float("inf")
BAD_SETTINGS = [
    ("rescale_factor", 0, "`rescale_factor` must be a positive finite number, got 0"),
    ("rescale_factor", -1 / 255, "`rescale_factor` must be a positive finite number"),
    ("rescale_factor", NAN, "`rescale_factor` must be a positive finite number, got nan"),
    ("rescale_factor", INF, "`rescale_factor` must be a positive finite number, got inf"),
    ("rescale_factor", "0.5", "`rescale_factor` must be a positive finite number, got '0.5'"),
    ("rescale_factor", True, "`rescale_factor` must be a positive finite number, got True"),
    ("image_mean", [0.5, 0.5], r"`image_mean` must be a number or 3 numbers \(one per RGB channel\), got 2"),
    ("image_mean", ["0.5", "0.5", "0.5"], "`image_mean` must be a finite number or a list of them, got"),
    ("image_mean", "0.5", "`image_mean` must be a finite number or a list of them, got '0.5'"),
    ("image_mean", {"red": 0.5}, "`image_mean` must be a finite number or a list of them"),
    ("image_mean", [NAN, 0.5, 0.5], "`image_mean` must be a finite number or a list of them"),
    ("image_std", [0.5, 0.0, 0.5], r"`image_std` must be positive, got \[0.5, 0.0, 0.5\]"),
    ("image_std", -0.5, "`image_std` must be positive"),
    ("image_std", [INF, 0.5, 0.5], "`image_std` must be a finite number or a list of them"),
    ("image_std", [0.5, None, 0.5], "`image_std` must be a finite number or a list of them"),
    ("size", {"height": 32.5, "width": 32}, "`size` values must be positive integers, got"),
    ("size", {"height": "32", "width": 32}, "`size` values must be positive integers"),
    ("size", {"height": True, "width": 32}, "`size` values must be positive integers"),
    ("size", {"shortest_edge": 0}, "`size` values must be positive integers"),
    ("size", [256], r"`size` must be an int, a \(height, width\) pair"),
    ("size", "256", r"`size` must be an int, a \(height, width\) pair"),
    ("size", 256.0, r"`size` must be an int, a \(height, width\) pair"),
    ("size", True, r"`size` must be an int, a \(height, width\) pair"),
    ("size", {"width": 32}, r"`size` must be .*got \{'width': 32\}"),
    ("resample", 2.7, "`resample` must be PILImageResampling.NEAREST, BILINEAR or BICUBIC, got 2.7"),
    ("resample", 99, "`resample` must be PILImageResampling.NEAREST, BILINEAR or BICUBIC, got 99"),
    ("resample", "bicubic", "`resample` must be"),
    ("resample", 1, "`resample` must be"),  # LANCZOS
]


@pytest.mark.parametrize("field, value, message", BAD_SETTINGS)
def test_bad_settings_in_a_saved_config_are_refused_on_load_by_name(tmp_path, field, value, message):
    # Before: most of these loaded and gave NaN or silently wrong pixel values on the first call (or a raw
    # IndexError/TypeError deep in transformers).
    config = {**CDBVQImageProcessor().to_dict(), field: value}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        CDBVQImageProcessor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        CDBVQImageProcessor(**{field: value})


@pytest.mark.parametrize("content, kind", [("[1]", "an array"), ('"x"', "a string"), ("3", "a number")])
def test_a_processor_file_that_holds_no_json_object_is_named(tmp_path, content, kind):
    # It failed with "'list' object has no attribute 'update'" (and 'copy' for a string).
    (tmp_path / "preprocessor_config.json").write_text(content)
    with pytest.raises(ValueError, match=f"preprocessor_config.json holds {kind}, not an object"):
        CDBVQImageProcessor.from_pretrained(tmp_path)


def test_statistics_of_other_lengths_need_do_convert_rgb_off(camera):
    # Without RGB conversion an image keeps 1, 3 or 4 channels, so statistics of those lengths are valid.
    processor = CDBVQImageProcessor(do_convert_rgb=False, image_mean=[0.5], image_std=[0.25], size=32)
    assert processor(camera, return_tensors="pt")["pixel_values"].shape == (1, 1, 32, 32)
    with pytest.raises(ValueError, match=r"`image_mean` must be a number or 1, 3 or 4 \(one per channel\), got 2"):
        CDBVQImageProcessor(do_convert_rgb=False, image_mean=[0.5, 0.5])
    with pytest.raises(ValueError, match="`image_mean` has 3 values but `image_std` has 1"):
        CDBVQImageProcessor(do_convert_rgb=False, image_mean=[0.5] * 3, image_std=[0.5])


@pytest.mark.parametrize("mode", ["HSV", "LAB", "YCbCr", "CMYK", "P", "1", "LA"])
def test_modes_whose_bands_are_no_intensities_need_do_convert_rgb(astronaut, mode):
    # HSV, LAB and YCbCr were read as RGB (colours off by up to the whole range), without a word; CMYK was refused
    # for its channel count, a palette image read as its indices; LA made 2 channels, which arrays may not have.
    as_is = CDBVQImageProcessor(do_convert_rgb=False, size=32)
    with pytest.raises(ValueError, match=f"a PIL image of mode '{mode}' cannot be taken as it is.*do_convert_rgb=True"):
        as_is(PIL.Image.fromarray(astronaut).convert(mode), return_tensors="pt")
    rgb = CDBVQImageProcessor(size=32)(astronaut, return_tensors="pt").pixel_values
    converted = CDBVQImageProcessor(size=32)(PIL.Image.fromarray(astronaut).convert(mode), return_tensors="pt").pixel_values
    assert converted.shape == rgb.shape


def test_images_of_different_sizes_without_resize_name_the_sizes_and_the_fix(astronaut, coffee):
    processor = CDBVQImageProcessor(do_resize=False, do_center_crop=False)
    with pytest.raises(ValueError, match=r"different shapes \[\(3, 400, 600\), \(3, 512, 512\)\].*do_resize"):
        processor([astronaut, coffee], return_tensors="pt")
    # Without do_resize, a centre crop no larger than the smallest image batches them.
    out = processor([astronaut, coffee], do_center_crop=True, size=64, return_tensors="pt")
    assert out["pixel_values"].shape == (2, 3, 64, 64)


def test_statistics_may_be_arrays_or_tensors(tmp_path):
    statistics = [(np.array([0.5, 0.5, 0.5]), np.array([0.5, 0.5, 0.5])), (torch.tensor([0.5] * 3), torch.tensor(0.5)),
                  (np.float32(0.5), np.float64(0.5)), (list(np.full(3, 0.5, np.float32)), [np.float32(0.5)] * 3)]  # fmt: skip
    for index, (mean, std) in enumerate(statistics):
        processor = CDBVQImageProcessor(image_mean=mean, image_std=std)
        pixel_values = processor(PIL.Image.new("RGB", (32, 32), (255, 0, 0)), return_tensors="pt").pixel_values
        assert torch.allclose(pixel_values[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
        # ... and save as JSON (tensors and NumPy scalars raised TypeError there, leaving an empty config behind).
        processor.save_pretrained(tmp_path / str(index))
        loaded = CDBVQImageProcessor.from_pretrained(tmp_path / str(index))
        assert torch.equal(loaded(PIL.Image.new("RGB", (32, 32), (255, 0, 0)), return_tensors="pt").pixel_values, pixel_values)
    with pytest.raises(ValueError, match="image_std"):
        CDBVQImageProcessor(image_std=np.array([0.5, 0.0, 0.5]))


@pytest.mark.parametrize("data_format", ["channels_last", "bogus"])
def test_an_output_layout_other_than_channels_first_is_refused(data_format):
    # It used to be accepted and ignored: channels-first pixel values came back whatever was asked for.
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    processor = CDBVQImageProcessor(size=32)
    assert processor(image, data_format="channels_first", return_tensors="np").pixel_values.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="`data_format` .* is not supported: pixel_values are always channels-first"):
        processor(image, data_format=data_format, return_tensors="np")
    with pytest.raises(ValueError, match="is not supported"):
        CDBVQImageProcessor(data_format=data_format)


@pytest.mark.parametrize("size", [{"height": 32, "width": 32}, {"shortest_edge": 32}])
def test_a_thin_strip_is_cut_to_its_centre_before_it_is_resized(monkeypatch, size):
    # A 2 x 100,000 strip (0.2 megapixels) was scaled to cover a 256 x 256 target whole first: a 39 GB tensor (with a
    # shortest_edge size too, until it was cut first as well).
    import torch.nn.functional as F

    import cdb_tokenizer.image_processing_cdb_vq as module

    sizes, interpolate = [], F.interpolate
    monkeypatch.setattr(module.F, "interpolate", lambda image, size, **kw: sizes.append(size) or interpolate(image, size=size, **kw))
    strip = np.random.default_rng(0).integers(0, 255, (2, 20000, 3), dtype=np.uint8)
    processor = CDBVQImageProcessor(size=size, do_normalize=False)
    pixel_values = processor(strip, return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 3, 32, 32) and max(h * w for h, w in sizes) <= 32 * 32 * 16
    # The same pixels as scaling the whole strip (32 x 320,000) and cropping its centre.
    whole = interpolate(torch.from_numpy(strip).permute(2, 0, 1)[None].float(), size=(32, 320000), mode="bicubic",
                        antialias=True).clamp(0, 255)[0, :, :, 159984:160016] / 255  # fmt: skip
    torch.testing.assert_close(pixel_values[0], whole, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- device= and partial transparency


def _device_inputs(astronaut: np.ndarray) -> dict:
    """The same uint8 photo as each input type (uint8: the meta device cannot answer the float range check)."""
    return {
        "pil": PIL.Image.fromarray(astronaut),
        "numpy": astronaut,
        "torch": torch.from_numpy(astronaut).permute(2, 0, 1),
    }


def test_device_cpu_gives_exactly_the_output_without_a_device(astronaut):
    processor = CDBVQImageProcessor(size={"height": 48, "width": 40})
    for name, image in _device_inputs(astronaut).items():
        plain = processor(image, return_tensors="pt").pixel_values
        on_cpu = processor(image, return_tensors="pt", device="cpu").pixel_values
        assert on_cpu.device.type == "cpu" and on_cpu.shape == (1, 3, 48, 40), name
        assert torch.equal(on_cpu, plain), name


def test_device_moves_each_image_there_before_the_resize(astronaut, monkeypatch):
    # `device=` is where the resize runs (process_image moves each image there first), not where the result is copied
    # to afterwards. The meta device stands in for an accelerator on CPU-only machines: every interpolation must see
    # meta tensors, and the pixel values come back on it with the right shape.
    import torch.nn.functional as F

    import cdb_tokenizer.image_processing_cdb_vq as module

    seen, interpolate = [], F.interpolate
    monkeypatch.setattr(
        module.F, "interpolate", lambda image, **kw: seen.append(image.device.type) or interpolate(image, **kw)
    )
    processor = CDBVQImageProcessor(size={"height": 32, "width": 32})
    for name, image in _device_inputs(astronaut).items():
        seen.clear()
        pixel_values = processor(image, return_tensors="pt", device="meta").pixel_values
        assert seen == ["meta"], (name, seen)  # one resize (512 -> 32), on the device asked for
        assert pixel_values.device.type == "meta" and pixel_values.shape == (1, 3, 32, 32), name
        listed = processor(image, return_tensors=None, device="meta").pixel_values
        assert [tensor.device.type for tensor in listed] == ["meta"], name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_cuda_resizes_on_the_gpu_like_on_the_cpu(astronaut):
    processor = CDBVQImageProcessor(size={"height": 64, "width": 48})
    for name, image in _device_inputs(astronaut).items():
        on_gpu = processor(image, return_tensors="pt", device="cuda").pixel_values
        assert on_gpu.device.type == "cuda", name
        torch.testing.assert_close(on_gpu.cpu(), processor(image, return_tensors="pt").pixel_values, atol=1e-4, rtol=0)


def test_half_transparent_rgba_is_blended_with_white_by_its_alpha(astronaut):
    # The rule: rgb * a + 255 * (1 - a), a = alpha / 255. Alpha 0 and 255 alone cannot tell a blend from a threshold
    # (or from compositing on black), so bands of alpha 128, 64 and 192 over the photo.
    processor = CDBVQImageProcessor(do_resize=False, do_center_crop=False)
    alpha = np.full(astronaut.shape[:2] + (1,), 128, dtype=np.uint8)
    alpha[:, 200:300], alpha[:, 300:] = 64, 192
    rgba = np.concatenate([astronaut, alpha], axis=-1)
    weight = alpha.astype(np.float64) / 255
    blended = astronaut * weight + 255.0 * (1 - weight)  # [0, 255]
    expected = torch.from_numpy(blended / 127.5 - 1).permute(2, 0, 1)[None].float()  # normalised to [-1, 1]
    for name, image in (("numpy", rgba), ("torch", torch.from_numpy(rgba).permute(2, 0, 1))):
        pixel_values = processor(image, return_tensors="pt").pixel_values
        torch.testing.assert_close(pixel_values, expected, atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    # PIL composites in 8 bits (PIL.Image.alpha_composite): the same blend to within one intensity level.
    pil = processor(PIL.Image.fromarray(rgba, mode="RGBA"), return_tensors="pt").pixel_values
    torch.testing.assert_close(pil, expected, atol=1.01 * 2 / 255, rtol=0)
    # A flat half-transparent black is mid-grey (127/255), not black (alpha ignored) nor white (alpha thresholded).
    black = np.zeros((8, 8, 4), dtype=np.uint8)
    black[..., 3] = 128
    for image in (black, PIL.Image.fromarray(black, mode="RGBA")):
        grey = processor(image, return_tensors="pt", do_normalize=False).pixel_values
        torch.testing.assert_close(grey, torch.full((1, 3, 8, 8), 127 / 255), atol=0.5 / 255, rtol=0)


# ----------------------------------------------------------------------------- review fixes


def test_postprocess_joins_a_list_of_batches_in_order():
    # Before: only the first image of each batch in the list came back (2 images for 4).
    processor = CDBVQImageProcessor(size=32)
    batch = torch.rand(2, 3, 32, 32) * 2 - 1
    single = torch.rand(3, 32, 32) * 2 - 1
    joined = processor.postprocess([batch, single, batch.numpy()], return_tensors="np").pixel_values
    expected = processor.postprocess(torch.cat([batch, single[None], batch]), return_tensors="np").pixel_values
    assert joined.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(joined, expected)
    assert len(processor.postprocess([batch, batch]).pixel_values) == 4
    with pytest.raises(ValueError, match=r"different shapes \[\(3, 16, 16\), \(3, 32, 32\)\]"):
        processor.postprocess([batch, torch.zeros(1, 3, 16, 16)])


def test_postprocess_refuses_pixels_of_another_scale_but_clamps_decoder_overshoot():
    # Before: [0, 255] values were clamped to an almost white image without a word.
    processor = CDBVQImageProcessor(size=32)
    reconstruction = torch.rand(2, 3, 32, 32) * 2 - 1
    message = r"postprocess expects the model's output, .* normalised range \[-1, 1\] .*raw \[0, 255\]"
    raw = (reconstruction + 1) * 127.5
    for pixels in (raw, raw.numpy(), [raw]):
        with pytest.raises(ValueError, match=message):
            processor.postprocess(pixels)
    with pytest.raises(ValueError, match=r"normalised range \[0, 1\]"):  # the range of the processor's own settings
        CDBVQImageProcessor(do_normalize=False).postprocess(reconstruction * 100)
    # An untrained decoder overshoots to about +-3 (the tests' tiny models do): still clamped, not refused.
    overshoot = torch.tensor([-3.3, -1.0, 1.0, 3.3]).view(1, 1, 4).expand(1, 3, 1, 4)
    values = processor.postprocess(overshoot, return_tensors="np").pixel_values[0, 0, :, 0]
    np.testing.assert_array_equal(values, [0, 0, 255, 255])


def test_premultiplied_alpha_modes_are_read_as_straight_alpha():
    # Before: mode "La" raised PIL's "conversion from La to L not supported", and "RGBa" without RGB conversion kept
    # its premultiplied values.
    processor = CDBVQImageProcessor(do_resize=False, do_center_crop=False, do_normalize=False)
    la = PIL.Image.frombytes("La", (1, 1), bytes([100, 128]))  # grey 100 premultiplied by alpha 128
    grey = processor(la, return_tensors="pt").pixel_values[0, :, 0, 0] * 255
    # On white: 100 + 255 * (1 - 128 / 255) = 227 (to within PIL's 8-bit unpremultiplying).
    torch.testing.assert_close(grey, torch.full((3,), 227.0), atol=1.0, rtol=0)
    rgba = np.array([[[200, 100, 40, 128]]], dtype=np.uint8)
    rgba_premultiplied = PIL.Image.frombytes("RGBa", (1, 1), bytes([100, 50, 20, 128]))
    keep_alpha = CDBVQImageProcessor(do_resize=False, do_center_crop=False, do_normalize=False, do_convert_rgb=False)
    for proc in (processor, keep_alpha):
        straight = proc(PIL.Image.fromarray(rgba, mode="RGBA"), return_tensors="pt").pixel_values
        premultiplied = proc(rgba_premultiplied, return_tensors="pt").pixel_values
        torch.testing.assert_close(premultiplied, straight, atol=1.5 / 255, rtol=0)
    # cdb-vq's data loading reads them alike (it skipped "La" as unreadable: one composite_on_white serves both).
    from cdb_tokenizer.tools.data import decode_image

    assert np.abs(np.asarray(decode_image(la), np.float32) - 227).max() <= 1


@pytest.mark.parametrize(
    "settings",
    [
        {"image_std": 1, "image_mean": 0},
        {"rescale_factor": 1, "do_normalize": False},
        {"size": np.int64(32)},
        {"size": {"height": np.int64(32), "width": np.int32(24)}},
        {"resample": np.int64(2), "image_mean": np.float32(0.5), "image_std": torch.tensor(0.25)},
        {"do_resize": np.bool_(True), "image_mean": (0, 0, 0)},
    ],
)
def test_call_time_settings_accept_what_the_constructor_accepts(settings):
    # Before: transformers' strict type check refused ints where floats are expected and NumPy numbers
    # ("StrictDataclassFieldValidationError: ... expected float, got int").
    image = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    expected = CDBVQImageProcessor(**{"size": 32, **settings})(image, return_tensors="pt").pixel_values
    called = CDBVQImageProcessor(size=32)(image, return_tensors="pt", **settings).pixel_values
    torch.testing.assert_close(called, expected, atol=0, rtol=0)


CALL_TIME_BAD_SETTINGS = BAD_SETTINGS + [
    ("image_std", 0, r"`image_std` must be positive, got 0.0"),
    ("do_normalize", "false", "`do_normalize` must be True or False, got 'false'"),
]


@pytest.mark.parametrize("field, value, message", CALL_TIME_BAD_SETTINGS)
def test_bad_settings_at_call_time_get_the_constructor_messages(field, value, message):
    # Before: most were transformers' type errors ("expected float, got int"), `image_std=0` among them.
    with pytest.raises(ValueError, match=message):
        CDBVQImageProcessor(size=32)(np.zeros((40, 40, 3), dtype=np.uint8), **{field: value})


def test_unknown_settings_are_refused_naming_the_nearest(tmp_path):
    # Before: `do_resise=False` was stored as an unused attribute and the images were resized anyway; a mistyped key
    # in preprocessor_config.json was ignored.
    with pytest.raises(TypeError, match=r"no setting 'do_resise' \(did you mean 'do_resize'\?\)"):
        CDBVQImageProcessor(size=32, do_resise=False)
    with pytest.raises(TypeError, match=r"'do_resise' \(did you mean 'do_resize'\?\)"):
        CDBVQImageProcessor(size=32)(np.zeros((40, 40, 3), dtype=np.uint8), do_resise=False)
    with pytest.raises(TypeError, match=r"no setting 'colour_space'; its settings are: .*do_resize"):
        CDBVQImageProcessor(colour_space="rgb")
    config = {**CDBVQImageProcessor().to_dict(), "do_center_crp": False}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(TypeError, match=r"'do_center_crp' \(did you mean 'do_center_crop'\?\)"):
        CDBVQImageProcessor.from_pretrained(tmp_path)


def test_keys_transformers_writes_still_load(tmp_path):
    import cdb_tokenizer  # noqa: F401 - registers the auto class, so save_pretrained writes `auto_map`

    processor = CDBVQImageProcessor(size=32)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert {"auto_map", "image_processor_type"} <= set(config)
    # Keys older transformers versions wrote, and ImagesKwargs fields left at their defaults.
    config.update(processor_class="CDBVQProcessor", _processor_class="CDBVQProcessor", feature_extractor_type="X",
                  default_to_square=True, crop_size=None, data_format="channels_first", do_pad=None,
                  _valid_processor_keys=["do_resize", "size"])  # fmt: skip
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    loaded = CDBVQImageProcessor.from_pretrained(tmp_path)
    loaded.save_pretrained(tmp_path / "again")
    assert dict(CDBVQImageProcessor.from_pretrained(tmp_path / "again").size) == dict(processor.size)


def test_a_misspelled_setting_given_to_from_pretrained_is_refused(tmp_path):
    # transformers' from_dict drops keywords that are not settings: `do_resise=False` loaded a processor that resized.
    CDBVQImageProcessor(size=32).save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="no setting 'do_resise' \\(did you mean 'do_resize'\\?\\)"):
        CDBVQImageProcessor.from_pretrained(tmp_path, do_resise=False)
    assert CDBVQImageProcessor.from_pretrained(tmp_path, do_resize=False).do_resize is False
    assert CDBVQImageProcessor.from_pretrained(tmp_path, return_unused_kwargs=True)[1] == {}  # loading options pass
    # A hint never points at transformers' own keys: '_processor_clas' used to get "did you mean '_processor_class'?".
    with pytest.raises(TypeError, match="no setting '_processor_clas'; its settings are: ") as error:
        CDBVQImageProcessor(_processor_clas="x")
    assert "auto_map" not in str(error.value)


def test_flags_must_be_true_or_false(tmp_path):
    # Before: `do_resize="no"` resized, and "false" in a JSON config was truthy.
    with pytest.raises(ValueError, match="`do_resize` must be True or False, got 'no'"):
        CDBVQImageProcessor(do_resize="no")
    config = {**CDBVQImageProcessor().to_dict(), "do_normalize": "false"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="`do_normalize` must be True or False, got 'false'"):
        CDBVQImageProcessor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="`do_center_crop` must be True or False, got 1"):
        CDBVQImageProcessor()(np.zeros((40, 40, 3), dtype=np.uint8), do_center_crop=1)
    with pytest.raises(ValueError, match="`do_normalize` must be True or False, got 'false'"):
        CDBVQImageProcessor().postprocess(torch.zeros(1, 3, 8, 8), do_normalize="false")
    assert CDBVQImageProcessor(do_resize=np.bool_(False)).do_resize is False


def test_do_rescale_false_with_float_images_is_refused_not_scaled_to_509():
    # transformers' idiom for images already in [0, 1]: here every input is taken to [0, 255] first, so the call gave
    # pixel values up to 509 without a word.
    processor = CDBVQImageProcessor(size={"height": 32, "width": 32})
    floats = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(0))
    for images in (floats, floats.permute(1, 2, 0).numpy()):
        with pytest.raises(ValueError, match="do_rescale=False with float images"):
            processor(images, do_rescale=False, return_tensors="pt")
    with pytest.raises(ValueError, match="do_rescale=False with float images"):
        CDBVQImageProcessor(size={"height": 32, "width": 32}, do_rescale=False)(floats, return_tensors="pt")
    pixel_values = processor(floats, return_tensors="pt").pixel_values  # the default takes them as they are
    assert -1.0 <= pixel_values.min() and pixel_values.max() <= 1.0
    # uint8 with do_rescale=False stays [0, 255] intensities, as in transformers.
    assert processor((floats * 255).to(torch.uint8), do_rescale=False, return_tensors="pt").pixel_values.max() > 100
