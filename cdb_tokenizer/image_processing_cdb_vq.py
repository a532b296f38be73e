# Copyright 2025 The cdb-tokenizer authors.
# Licensed under the Apache License, Version 2.0.
"""Image processor for the CDB-VQ image tokenizer.

`CDBVQImageProcessor` turns images (PIL, NumPy or torch) into the `pixel_values` the model expects
(float32, `(B, 3, H, W)`, in `[-1, 1]` with the default settings) and, through `postprocess`, turns the
model's reconstructions back into images.

This file is shipped as Hugging Face Hub remote code, so it imports only torch, numpy, PIL and
transformers. All image operations run in torch (no torchvision needed), on the device of the input
or the one passed as `device=`.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import ChannelDimension, PILImageResampling, SizeDict

from .configuration_cdb_vq import _is_int, json_kind, plain_value


# PIL resampling filters that torch's `interpolate` can reproduce (torchvision makes the same choice).
_TORCH_INTERPOLATION = {
    PILImageResampling.NEAREST: "nearest-exact",
    PILImageResampling.BILINEAR: "bilinear",
    PILImageResampling.BICUBIC: "bicubic",
}
_POSTPROCESS_RETURN_TYPES = ("PIL.Image.Image", "np", "pt")
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
# Premultiplied-alpha modes, read through their straight-alpha twin (PIL cannot convert "La" to anything else).
_STRAIGHT_ALPHA = {"La": "LA", "RGBa": "RGBA"}
# Modes whose bands are intensities (and alpha), taken as they are with do_convert_rgb=False: 1, 3 or 4 channels, as
# for arrays ("LA" would make 2, which no model takes).
_MODES_TAKEN_AS_THEY_ARE = ("L", "RGB", "RGBA")
# Keys transformers writes (or once wrote) into preprocessor_config.json beside the settings.
_SAVED_KEYS = frozenset(
    {"image_processor_type", "processor_class", "_processor_class", "feature_extractor_type", "auto_map",
     "_valid_processor_keys", "_valid_kwargs_names"}  # the last two: some 4.x versions
)  # fmt: skip
# Settings given as numbers: NumPy/torch numbers become Python ones, and ints where floats are expected become floats.
_NUMBER_SETTINGS = ("size", "resample", "rescale_factor", "image_mean", "image_std")
_FLOAT_SETTINGS = ("rescale_factor", "image_mean", "image_std")
# `postprocess` clamps values up to this many half-widths of the normalised range from its centre ([-10, 10] by
# default) and refuses the rest. Wider than the model's 0.5 input tolerance: an untrained or briefly trained decoder
# overshoots to about +-3, while raw [0, 255] pixels (which clamping would turn flat white) reach far more.
_OUTPUT_RANGE_LIMIT = 10.0


class CDBVQImageProcessor(BaseImageProcessor):
    r"""
    Image processor for CDB-VQ: resize, centre crop, rescale and normalise images into `pixel_values`, and
    `postprocess` decoded `pixel_values` back into images.

    Inputs may be a single image or a list of images, each a `PIL.Image.Image`, a NumPy array (`(H, W, C)` or
    greyscale `(H, W)`; a 4-D array is a batch) or a `torch.Tensor` (`(C, H, W)` or `(H, W)`; a 4-D tensor is a
    batch). Integer images are read as `[0, 255]` (`uint16` as `[0, 65535]`), floating-point images as
    `[0, 1]`, so the same picture gives the same `pixel_values` whatever its type. Greyscale, RGBA (composited
    on white), palette and LA images are converted to RGB.

    A 3-D array or tensor is one image. Its channel axis is the one of size 1, 3 or 4: a NumPy array is read as
    channels-last `(H, W, C)` when its last axis has such a size, else as channels-first `(C, H, W)`; a tensor the
    other way round (channels-first unless only its last axis fits). Pass `input_data_format` to settle a shape both
    readings fit, such as `(3, 8, 3)`. Three greyscale images stacked as one `(3, H, W)` array are read as one colour
    image: pass them as a list of `(H, W)` images (or a `(3, H, W, 1)` batch) instead.

    PIL greyscale images of modes `"I"` and `"F"` are read by their values: `"I"` as `[0, 255]` when no value exceeds
    255, else as `[0, 65535]` (16-bit data); `"F"` as `[0, 1]` (like float arrays) when no value exceeds 1, else as
    `[0, 255]`; `"I;16"` always as `[0, 65535]`. Values outside those ranges are refused. Premultiplied `"La"` and
    `"RGBa"` images are read as their straight-alpha `"LA"` and `"RGBA"` equivalents.

    Every setting is checked when the processor is built (hence when a saved config loads) and when a call overrides
    it, with the same rules: an unknown name (a typo such as `do_resise`) is a `TypeError` naming the nearest valid
    one, the `do_*` flags must be `True` or `False`, and ints and NumPy numbers are accepted wherever a number is.

    Args:
        do_resize (`bool`, *optional*, defaults to `True`):
            Whether to resize the image to `size`.
        size (`int`, `tuple[int, int]` or `dict[str, int]`, *optional*, defaults to `{"height": 256, "width": 256}`):
            Output size. An `int` means a square, a tuple is `(height, width)`. `{"height": h, "width": w}` gives
            exactly `h x w` images. `{"shortest_edge": s}` resizes the shorter side to `s` keeping the aspect ratio
            (with `do_center_crop`, the result is then cropped to `s x s`).
        resample (`PILImageResampling` or `int`, *optional*, defaults to `PILImageResampling.BICUBIC`):
            Resampling filter: `NEAREST`, `BILINEAR` or `BICUBIC` (antialiased when downscaling).
        do_center_crop (`bool`, *optional*, defaults to `True`):
            Preserve the aspect ratio: resize so that the image covers `size`, then crop its centre to exactly
            `size`. When `False`, images are resized straight to `size` (and may be stretched).
        do_rescale (`bool`, *optional*, defaults to `True`):
            Whether to multiply the `[0, 255]` intensities by `rescale_factor`. Every input is taken to that scale
            first, float images in `[0, 1]` included, so a call with `False` and float images (transformers' idiom
            for images already in `[0, 1]`) is refused: they are taken as they are with the default.
        rescale_factor (`float`, *optional*, defaults to `1/255`):
            Scale applied when `do_rescale` is set.
        do_normalize (`bool`, *optional*, defaults to `True`):
            Whether to normalise with `(x - image_mean) / image_std`.
        image_mean (`float` or `list[float]`, *optional*, defaults to `[0.5, 0.5, 0.5]`):
            Per-channel mean used for normalisation.
        image_std (`float` or `list[float]`, *optional*, defaults to `[0.5, 0.5, 0.5]`):
            Per-channel standard deviation used for normalisation.
        do_convert_rgb (`bool`, *optional*, defaults to `True`):
            Whether to convert greyscale, RGBA, palette and LA images to RGB.

    Example:

    ```python
    >>> processor = CDBVQImageProcessor()
    >>> pixel_values = processor(images, return_tensors="pt").pixel_values  # (B, 3, 256, 256) in [-1, 1]
    >>> pil_images = processor.postprocess(reconstruction, return_tensors="PIL.Image.Image").pixel_values
    ```
    """

    model_input_names = ["pixel_values"]

    # Class-level defaults, read by `BaseImageProcessor._set_attributes` and `preprocess`.
    do_resize = True
    size = {"height": 256, "width": 256}
    resample = PILImageResampling.BICUBIC
    do_center_crop = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)
    do_convert_rgb = True

    def __init__(
        self,
        do_resize: bool = True,
        size: int | tuple[int, int] | dict[str, int] | None = None,
        resample: PILImageResampling | int = PILImageResampling.BICUBIC,
        do_center_crop: bool = True,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        do_convert_rgb: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.update(
            do_resize=do_resize,
            size=size,
            resample=resample,
            do_center_crop=do_center_crop,
            do_rescale=do_rescale,
            rescale_factor=rescale_factor,
            do_normalize=do_normalize,
            image_mean=image_mean,
            image_std=image_std,
            do_convert_rgb=do_convert_rgb,
        )
        # `None` means "class default": drop it so the base class does not store it as an attribute.
        kwargs = {key: value for key, value in kwargs.items() if value is not None}
        # `from_dict` (hence `from_pretrained`) builds through here too, so a saved config with a mistyped key or a bad
        # value fails on load, by name. Until `_set_attributes` runs, `getattr` reads the class defaults.
        kwargs = self._checked_overrides(kwargs, known=set(self.valid_kwargs.__annotations__) | _SAVED_KEYS)
        super().__init__(**kwargs)
        # Resolve every setting (kwarg or class default); sizes become `SizeDict`, mean/std tuples.
        self._set_attributes(**kwargs)

    @property
    def backend(self) -> str:
        """`str`: the backend that runs the image operations (plain torch, no torchvision)."""
        return "torch"

    # ------------------------------------------------------------------ preprocessing

    @classmethod
    def get_image_processor_dict(
        cls, pretrained_model_name_or_path: Any, **kwargs: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """transformers' reading of `preprocessor_config.json`, except that a file holding an array or a string, not an
        object of settings, is named (it failed later with "'list' object has no attribute 'update'")."""
        image_processor_dict, kwargs = super().get_image_processor_dict(pretrained_model_name_or_path, **kwargs)
        if not isinstance(image_processor_dict, dict):
            raise ValueError(f"{pretrained_model_name_or_path}: its preprocessor_config.json holds "
                             f"{json_kind(image_processor_dict)}, not an object of image processor settings.")  # fmt: skip
        return image_processor_dict, kwargs

    @classmethod
    def from_dict(
        cls, image_processor_dict: dict[str, Any], **kwargs: Any
    ) -> CDBVQImageProcessor | tuple[CDBVQImageProcessor, dict]:
        """transformers' `from_dict` (hence `from_pretrained`), except that a keyword that reads like a setting but is
        none (`do_resise=False`), which it would drop without a word, is refused; loading options pass through."""
        settings = list(cls.valid_kwargs.__annotations__)
        misspelled = {key: value for key, value in kwargs.items()
                      if key not in settings and difflib.get_close_matches(key, settings, n=1, cutoff=0.8)}  # fmt: skip
        _check_names(misspelled, settings)
        return super().from_dict(image_processor_dict, **kwargs)

    def preprocess(self, images: Any, **kwargs: Any) -> BatchFeature:
        """
        Turn an image or a list of images into `pixel_values`.

        Args:
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The images. See the class docstring for the accepted layouts and value ranges.
            **kwargs:
                Any constructor setting (`size`, `do_center_crop`, ...) to override for this call, plus
                `return_tensors` (`"pt"`, `"np"` or `None` for a list of tensors), `input_data_format`
                (`"channels_first"` / `"channels_last"`, to settle an ambiguous array layout) and `device`
                (where to run the resize; defaults to each input's device).

        Returns:
            [`BatchFeature`]: with `pixel_values`, float32 `(B, 3, H, W)` (a list of `(3, H, W)` tensors when
            `return_tensors` is `None`).

        Raises:
            TypeError: for an input of an unsupported type or dtype, or an unknown setting.
            ValueError: for an empty list, a channel count other than 1, 3 or 4, NaN or infinite values, float
                values outside `[0, 1]`, or bad or inconsistent settings.
        """
        # Checked here, with the constructor's messages: transformers' own type check would refuse `image_std=1` (an
        # int) and report `image_std=0` as a type mismatch.
        kwargs = self._checked_overrides(kwargs, known=self.valid_kwargs.__annotations__)
        return super().preprocess(images, **kwargs)

    def _checked_overrides(self, overrides: dict[str, Any], known: Collection[str] | None = None) -> dict[str, Any]:
        """`overrides` of this processor's settings, with numbers made plain (`_plain_numbers`), checked together with
        the settings they override. With `known`, other names are refused (naming the nearest known one)."""
        if known is not None:
            _check_names(overrides, known)
        overrides = _plain_numbers(overrides)
        current = {name: getattr(self, name, None) for name in self.valid_kwargs.__annotations__}
        self._check_settings({**current, **overrides})
        return overrides

    def _check_settings(self, settings: dict[str, Any]) -> None:
        """Reject bad values (named) and settings this processor does not implement, rather than silently ignore
        them. The one check for the constructor (hence saved configs), call-time overrides and `postprocess`."""
        for name, value in settings.items():
            # A string flag would be truthy: "false" in a JSON config would turn the step on.
            if name.startswith("do_") and value is not None and not isinstance(value, bool):
                raise ValueError(f"`{name}` must be True or False, got {value!r}.")
        data_format = settings.get("data_format")
        if data_format is not None and str(getattr(data_format, "value", data_format)) != ChannelDimension.FIRST.value:
            raise ValueError(
                f"`data_format` {data_format!r} is not supported: pixel_values are always channels-first (B, 3, H, W), "
                f"the layout the model takes. (`input_data_format` describes the input images.)"
            )
        _check_size(settings.get("size"))
        if settings.get("resample") is not None:
            _to_resampling(settings["resample"])
        # Without RGB conversion an image keeps its 1, 3 or 4 channels.
        channels = (1, 3, 4) if settings.get("do_convert_rgb") is False else (3,)
        _check_scaling(settings.get("rescale_factor"), settings.get("image_mean"), settings.get("image_std"), channels)
        if settings.get("crop_size") is not None:
            raise ValueError(
                "`crop_size` is not used: CDBVQImageProcessor centre-crops to `size`; set `size` instead."
            )
        if settings.get("do_pad"):
            raise ValueError("`do_pad` is not supported by CDBVQImageProcessor.")
        # transformers' other shared settings, which this processor would otherwise store and ignore.
        for name in _UNUSED_SETTINGS:
            if settings.get(name) is not None and settings.get(name) is not False:
                raise ValueError(f"`{name}` is not used by CDBVQImageProcessor (it neither pads nor groups images).")
        if settings.get("default_to_square") is False:
            raise ValueError(
                "`default_to_square=False` is not supported: an int `size` is a square here; for the shorter side, "
                "give `size={'shortest_edge': s}`."
            )

    def _validate_preprocess_kwargs(self, **kwargs: Any) -> None:
        """Validate the merged settings of one `preprocess` call (their values were checked in `preprocess`)."""
        if kwargs.get("do_rescale") and kwargs.get("rescale_factor") is None:
            raise ValueError("`rescale_factor` must be set when `do_rescale` is True.")
        if kwargs.get("do_normalize") and (kwargs.get("image_mean") is None or kwargs.get("image_std") is None):
            raise ValueError("`image_mean` and `image_std` must be set when `do_normalize` is True.")
        if (kwargs.get("do_resize") or kwargs.get("do_center_crop")) and kwargs.get("size") is None:
            raise ValueError("`size` must be set when `do_resize` or `do_center_crop` is True.")

    def _prepare_images_structure(self, images: Any, expected_ndims: int = 3) -> list[Any]:
        """Flatten the input (one image, a 4-D batch, or a list of either) into a list of single images."""
        if isinstance(images, (list, tuple)):
            if len(images) == 0:
                raise ValueError("`images` is an empty list: pass at least one image.")
            flat = []
            for image in images:
                nested = isinstance(image, (list, tuple)) or _is_batch(image)
                flat.extend(self._prepare_images_structure(image) if nested else [image])
            return flat
        if isinstance(images, torch.Tensor):
            _check_tensor_data(images)  # before a batch is split: a sparse one cannot be
        if _is_batch(images):
            if len(images) == 0:
                raise ValueError("`images` is an empty batch: pass at least one image.")
            return list(images)
        return [images]

    def process_image(
        self,
        image: Any,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """
        Convert one image into a float32 `(C, H, W)` tensor of `[0, 255]` intensities (`C` is 3 after RGB
        conversion).
        """
        if isinstance(image, PIL.Image.Image):
            tensor = _pil_to_tensor(image, do_convert_rgb=bool(do_convert_rgb))
            tensor = tensor.to(device) if device is not None else tensor
            return tensor
        if isinstance(image, np.ndarray):
            # A copy where torch cannot share the memory (`np.asarray(pil_image)` is read-only: torch would warn).
            array = np.ascontiguousarray(image) if image.flags.writeable else np.array(image)
            tensor, default_format = torch.from_numpy(array), ChannelDimension.LAST
        elif isinstance(image, torch.Tensor):
            _check_tensor_data(image)
            tensor, default_format = image.detach(), ChannelDimension.FIRST
        else:
            raise TypeError(
                f"Unsupported image type {type(image).__module__}.{type(image).__name__}: expected a "
                "PIL.Image.Image, a numpy.ndarray or a torch.Tensor (or a list of them)."
            )
        if device is not None:
            tensor = tensor.to(device)
        tensor = _to_channels_first(tensor, input_data_format, default_format)
        if tensor.is_floating_point() and kwargs.get("do_rescale") is False:
            # transformers' idiom for float images already in [0, 1] (`ToTensor` output); here they would be taken to
            # [0, 255] like every input, with no rescale to bring them back: pixel values up to 509, not an error.
            raise ValueError(
                "do_rescale=False with float images: CDBVQImageProcessor takes float images in [0, 1] as they are "
                "with the default do_rescale=True (it maps every input to [0, 255] intensities, which the rescale "
                "brings back); drop do_rescale=False."
            )
        tensor = _to_intensity_scale(tensor)
        if do_convert_rgb:
            tensor = _convert_to_rgb(tensor)
        return tensor

    def resize(
        self,
        image: torch.Tensor,
        size: SizeDict,
        resample: PILImageResampling | int = PILImageResampling.BICUBIC,
        do_center_crop: bool = True,
        **kwargs: Any,
    ) -> torch.Tensor:
        """
        Resize a `(C, H, W)` float tensor to `size`. With `do_center_crop` (or a `shortest_edge` size) the aspect
        ratio is kept: the image is scaled to cover the target (crop with `center_crop` afterwards).
        """
        height, width = image.shape[-2:]
        if size.shortest_edge is not None:
            scale = size.shortest_edge / min(height, width)
            if do_center_crop:  # only the centre square survives: cut the rest first, as for a {height, width} size
                image = _centre_to_keep(image, size.shortest_edge / scale, size.shortest_edge / scale, scale)
                height, width = image.shape[-2:]
            new_size = (max(size.shortest_edge, round(height * scale)), max(size.shortest_edge, round(width * scale)))
        elif do_center_crop:
            scale = max(size.height / height, size.width / width)
            image = _centre_to_keep(image, size.height / scale, size.width / scale, scale)
            height, width = image.shape[-2:]
            new_size = (max(size.height, round(height * scale)), max(size.width, round(width * scale)))
        else:
            new_size = (size.height, size.width)
        if new_size == (height, width):
            return image
        mode = _TORCH_INTERPOLATION[_to_resampling(resample)]
        antialias = mode in ("bilinear", "bicubic")
        out = F.interpolate(image[None], size=new_size, mode=mode, antialias=antialias, align_corners=None)[0]
        # Bicubic overshoots at edges; keep the intensities in their valid range.
        return out.clamp_(0.0, 255.0)

    def center_crop(self, image: torch.Tensor, size: SizeDict, **kwargs: Any) -> torch.Tensor:
        """Crop the centre `size` (`height x width`, or `shortest_edge` square) out of a `(C, H, W)` tensor."""
        crop_h, crop_w = _target_hw(size)
        height, width = image.shape[-2:]
        if crop_h > height or crop_w > width:
            raise ValueError(
                f"Cannot centre-crop a {height}x{width} image to {crop_h}x{crop_w}: it is smaller than the crop. "
                "Enable `do_resize` or lower `size`."
            )
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        return image[..., top : top + crop_h, left : left + crop_w]

    def rescale(self, image: torch.Tensor, scale: float, **kwargs: Any) -> torch.Tensor:
        """Multiply the image by `scale`."""
        return image * scale

    def normalize(
        self,
        image: torch.Tensor,
        mean: float | Sequence[float],
        std: float | Sequence[float],
        **kwargs: Any,
    ) -> torch.Tensor:
        """Normalise a `(C, H, W)` (or `(B, C, H, W)`) tensor channel-wise: `(image - mean) / std`."""
        mean_t = _per_channel(mean, image, "image_mean")
        std_t = _per_channel(std, image, "image_std")
        return (image - mean_t) / std_t

    def _preprocess(
        self,
        images: list[torch.Tensor],
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling | int,
        do_center_crop: bool,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | Sequence[float],
        image_std: float | Sequence[float],
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Resize, crop, rescale and normalise prepared `(C, H, W)` tensors, then batch them."""
        processed = []
        for image in images:
            if do_resize:
                image = self.resize(image, size=size, resample=resample, do_center_crop=do_center_crop)
            if do_center_crop:
                image = self.center_crop(image, size=size)
            if do_rescale:
                image = self.rescale(image, rescale_factor)
            if do_normalize:
                image = self.normalize(image, image_mean, image_std)
            processed.append(image.to(torch.float32).contiguous())

        if return_tensors is None:
            return BatchFeature(data={"pixel_values": processed})
        if do_resize:
            fix = "use a {'height', 'width'} size or do_center_crop=True"
        else:
            fix = "set do_resize=True, or do_center_crop=True with a size no larger than the smallest image"
        batch = _stack(processed, f"with return_tensors={return_tensors!r}, {fix}, or return_tensors=None.")
        if return_tensors == "np":
            return BatchFeature(data={"pixel_values": batch.cpu().numpy()})
        return BatchFeature(data={"pixel_values": batch}, tensor_type=return_tensors)

    # ----------------------------------------------------------------- postprocessing

    def postprocess(
        self,
        images: torch.Tensor | np.ndarray | list[torch.Tensor] | list[np.ndarray],
        do_rescale: bool | None = None,
        rescale_factor: float | None = None,
        do_normalize: bool | None = None,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        return_tensors: str = "PIL.Image.Image",
    ) -> BatchFeature:
        """
        Turn model output `pixel_values` back into images: the reverse of `preprocess` (un-normalise, undo the
        rescale, clamp to the valid range).

        Args:
            images (`torch.Tensor`, `np.ndarray` or a list of them):
                `(B, 3, H, W)` or `(3, H, W)` pixel values in the processor's normalised range (`[-1, 1]` by
                default), i.e. the model's output. A list may hold `(3, H, W)` images and `(B, 3, H, W)` batches alike:
                they are joined into one batch, in order. Values outside the range (decoder overshoot) are clamped,
                up to 10 times its half-width from its centre (`[-10, 10]` by default); values further out, such as
                images already in `[0, 255]`, are refused.
            do_rescale, rescale_factor, do_normalize, image_mean, image_std (*optional*):
                The preprocessing settings to invert; default to this processor's.
            return_tensors (`str`, *optional*, defaults to `"PIL.Image.Image"`):
                - `"PIL.Image.Image"`: a list of RGB `PIL.Image.Image`.
                - `"np"`: a `uint8` array of shape `(B, H, W, 3)`.
                - `"pt"`: a float32 tensor in `[0, 1]` of shape `(B, 3, H, W)`, on the input's device.

        Returns:
            [`BatchFeature`]: with the images under `pixel_values` (as Emu3 and Janus do).

        Raises:
            ValueError: for an unknown `return_tensors`, a shape other than `(B, 3, H, W)` / `(3, H, W)`, a list of
                images of different sizes, NaN or infinite values, values far outside the normalised range, or a bad
                setting.
            TypeError: for an input that is not a floating-point tensor or array.
        """
        if return_tensors not in _POSTPROCESS_RETURN_TYPES:
            raise ValueError(
                f"Unsupported return_tensors={return_tensors!r} for postprocess: use one of "
                f"{', '.join(repr(t) for t in _POSTPROCESS_RETURN_TYPES)}."
            )
        given = dict(
            do_rescale=do_rescale,
            rescale_factor=rescale_factor,
            do_normalize=do_normalize,
            image_mean=image_mean,
            image_std=image_std,
        )
        given = self._checked_overrides({name: value for name, value in given.items() if value is not None})
        do_rescale = given.get("do_rescale", self.do_rescale)
        rescale_factor = given.get("rescale_factor", self.rescale_factor)
        do_normalize = given.get("do_normalize", self.do_normalize)
        image_mean = given.get("image_mean", self.image_mean)
        image_std = given.get("image_std", self.image_std)

        pixel_values = _stack_model_output(images).to(torch.float32)
        if not torch.isfinite(pixel_values).all():
            raise ValueError("`images` contains NaN or infinite values; cannot convert them to images.")

        # Undo normalisation and rescaling, back to [0, 255] intensities.
        batch = pixel_values
        if do_normalize:
            batch = batch * _per_channel(image_std, batch, "image_std") + _per_channel(image_mean, batch, "image_mean")
        if do_rescale:
            batch = batch / rescale_factor
        if (batch - 127.5).abs().max() > 127.5 * _OUTPUT_RANGE_LIMIT:
            scaling = (do_rescale, rescale_factor, do_normalize, image_mean, image_std)
            raise ValueError(self._out_of_range_message(pixel_values, *scaling))
        batch = batch.clamp(0.0, 255.0)

        if return_tensors == "pt":
            return BatchFeature(data={"pixel_values": batch / 255.0})
        array = batch.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        if return_tensors == "np":
            return BatchFeature(data={"pixel_values": array})
        return BatchFeature(data={"pixel_values": [PIL.Image.fromarray(image) for image in array]})

    def _out_of_range_message(
        self,
        pixel_values: torch.Tensor,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | Sequence[float],
        image_std: float | Sequence[float],
    ) -> str:
        """Why `postprocess` refuses `pixel_values`, with the normalised range it expected (`[-1, 1]` by default)."""
        ends = torch.tensor([0.0, 255.0]).expand(3, 1, 2)  # the intensities preprocess maps to the range's ends
        ends = self.rescale(ends, rescale_factor) if do_rescale else ends
        ends = self.normalize(ends, image_mean, image_std) if do_normalize else ends
        low, high = ends[..., 0].min().item(), ends[..., 1].max().item()
        return (
            f"postprocess expects the model's output, pixel values in the processor's normalised range "
            f"[{low:.4g}, {high:.4g}] (overshoot is clamped), but these range from {pixel_values.min().item():.4g} to "
            f"{pixel_values.max().item():.4g}, far outside it: raw [0, 255] or otherwise unnormalised pixels?"
        )


# ---------------------------------------------------------------------- helpers


def _is_batch(images: Any) -> bool:
    """A 4-D array or tensor is a batch of images."""
    return isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _centre_to_keep(image: torch.Tensor, keep_height: float, keep_width: float, scale: float) -> torch.Tensor:
    """The centre of a `(C, H, W)` image that survives a resize by `scale` and a centre crop of `keep_height x
    keep_width` source pixels, with a margin for the resampling filter: cut out before resizing when the rest is most
    of the image. A strip far from the target's shape (2 x 100,000 pixels) would otherwise be scaled to cover the
    target whole first: tens of GB for a few kilobytes of input. Images near the target's shape are left whole."""
    height, width = image.shape[-2:]
    # The bicubic filter reaches 2 / scale source pixels on each side when shrinking (antialiased); keep 3 / scale
    # on each side, plus a pixel for rounding, so that the cut never shows in the resized crop.
    margin = 2 * math.ceil(3 / min(scale, 1.0)) + 2
    keep_h, keep_w = min(height, math.ceil(keep_height) + margin), min(width, math.ceil(keep_width) + margin)
    if 4 * keep_h * keep_w >= height * width:
        return image
    top, left = (height - keep_h) // 2, (width - keep_w) // 2
    return image[..., top : top + keep_h, left : left + keep_w]


def _to_resampling(resample: PILImageResampling | int) -> PILImageResampling:
    """The filter of a supported `resample` value (an int such as a JSON config holds, never a float or a bool)."""
    if _is_int(resample) and int(resample) in [int(mode) for mode in _TORCH_INTERPOLATION]:
        return PILImageResampling(int(resample))
    named = repr(resample)
    if _is_int(resample) and int(resample) in [int(mode) for mode in PILImageResampling]:
        # Name the filter (PIL's LANCZOS is 1: "got 1" says little).
        named = f"{PILImageResampling(int(resample)).name} ({int(resample)}), which torch cannot resize with"
    raise ValueError(f"`resample` must be PILImageResampling.NEAREST, BILINEAR or BICUBIC, got {named}.")


def _check_size(size: Any) -> None:
    """`size` must be an int, a (height, width) pair or a dict of the keys this processor uses, of positive ints."""
    if size is None:
        return
    if _is_int(size):
        values = {"height": size, "width": size}
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        values = dict(zip(("height", "width"), size))
    elif isinstance(size, (dict, SizeDict)):
        values = {key: value for key, value in dict(size).items() if value is not None}
    else:
        values = {}
    if set(values) not in ({"height", "width"}, {"shortest_edge"}):
        raise ValueError(
            f"`size` must be an int, a (height, width) pair, {{'height': h, 'width': w}} or {{'shortest_edge': s}}; "
            f"got {size!r}."
        )
    if not all(_is_int(value) and value > 0 for value in values.values()):
        raise ValueError(f"`size` values must be positive integers, got {values}.")


def _check_scaling(rescale_factor: Any, image_mean: Any, image_std: Any, channels: tuple[int, ...]) -> None:
    """Check the rescale factor and the normalisation statistics (each skipped when None): finite numbers, the
    statistics one number or one per channel (`channels`: the channel counts images can have), std positive."""
    if rescale_factor is not None and not (_is_finite_number(rescale_factor) and rescale_factor > 0):
        raise ValueError(f"`rescale_factor` must be a positive finite number, got {rescale_factor!r}.")
    lengths = {}
    for name, value in (("image_mean", image_mean), ("image_std", image_std)):
        if value is None:
            continue
        value = plain_value(value)
        is_list = isinstance(value, (list, tuple))
        values = list(value) if is_list else [value]
        if not all(_is_finite_number(v) for v in values):
            raise ValueError(f"`{name}` must be a finite number or a list of them, got {value!r}.")
        if is_list:
            if len(values) not in channels:
                counts = "3 numbers (one per RGB channel)" if channels == (3,) else "1, 3 or 4 (one per channel)"
                raise ValueError(f"`{name}` must be a number or {counts}, got {len(values)}: {values}.")
            lengths[name] = len(values)
        if name == "image_std" and min(values) <= 0:
            raise ValueError(f"`image_std` must be positive, got {values if is_list else value}.")
    if len(set(lengths.values())) > 1:
        mean, std = lengths["image_mean"], lengths["image_std"]
        raise ValueError(f"`image_mean` has {mean} values but `image_std` has {std}: give one per channel for both.")


# transformers' shared processor settings that this processor has no use for (refused when set).
_UNUSED_SETTINGS = ("pad_size", "image_seq_length", "disable_grouping")


def _check_names(settings: dict[str, Any], known: Collection[str]) -> None:
    """Refuse a setting name that is not `known` (a typo would otherwise be stored, or ignored, without a word)."""
    unknown = [name for name in settings if name not in known]
    if not unknown:
        return
    # Never hint at transformers' own keys, nor at settings that are refused when set.
    refused = (*_UNUSED_SETTINGS, "crop_size", "do_pad")
    settings_only = [name for name in known if name not in _SAVED_KEYS and name not in refused]
    nearest = {name: difflib.get_close_matches(name, settings_only, n=1) for name in unknown}
    hints = [f"{name!r} (did you mean {match[0]!r}?)" if match else repr(name) for name, match in nearest.items()]
    message = f"CDBVQImageProcessor has no setting {', '.join(hints)}"
    if not all(nearest.values()):
        message += f"; its settings are: {', '.join(sorted(settings_only))}"
    raise TypeError(message + ".")


def _plain_numbers(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` with numbers as a JSON config holds them: NumPy and torch numbers and arrays as Python numbers and
    lists (`size=np.int64(32)`), and ints where floats are expected as floats (`image_std=1`). Bools and other types
    are left as they are, for `_check_settings` to refuse by name."""
    settings = dict(settings)
    for name in _NUMBER_SETTINGS:
        if name in settings:
            settings[name] = plain_value(settings[name])
    for name in _FLOAT_SETTINGS:
        value = settings.get(name)
        if isinstance(value, list):
            settings[name] = [float(item) if _is_int(item) else item for item in value]
        elif _is_int(value):
            settings[name] = float(value)
    for name, value in settings.items():
        if name.startswith("do_") and isinstance(value, np.bool_):
            settings[name] = bool(value)
    return settings


def _target_hw(size: SizeDict) -> tuple[int, int]:
    if size.shortest_edge is not None:
        return size.shortest_edge, size.shortest_edge
    return size.height, size.width


def _per_channel(value: float | Iterable[float], image: torch.Tensor, name: str) -> torch.Tensor:
    """Broadcastable `(C, 1, 1)` tensor for a scalar or per-channel statistic."""
    num_channels = image.shape[-3]
    value = plain_value(value)
    values = [float(value)] * num_channels if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != num_channels:
        raise ValueError(f"`{name}` has {len(values)} values but the image has {num_channels} channels.")
    return torch.tensor(values, dtype=image.dtype, device=image.device).view(-1, 1, 1)


def _pil_to_tensor(image: PIL.Image.Image, do_convert_rgb: bool) -> torch.Tensor:
    """PIL image -> float `(C, H, W)` tensor of [0, 255] intensities; modes are converted with PIL's own rules."""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"Image has an empty size {image.width}x{image.height}.")
    try:
        image.load()  # PIL decodes lazily: a truncated or closed file fails here, not deep inside a conversion
    except Exception as error:  # noqa: BLE001 - PIL's decoders raise OSError, SyntaxError, AssertionError (closed)
        reason = str(error).strip() or "its file was closed, or it cannot be decoded"
        raise ValueError(f"PIL cannot decode the image ({type(error).__name__}: {reason}).") from None
    image = _straight_alpha(upright(image))
    grey = greyscale_intensities(image)
    if grey is not None:
        return _convert_to_rgb(grey) if do_convert_rgb else grey
    if do_convert_rgb:
        image = composite_on_white(image).convert("RGB")
        return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1).contiguous()
    if image.mode not in _MODES_TAKEN_AS_THEY_ARE:
        # Their bands are no intensities: HSV, LAB or YCbCr read as RGB, palette indices or CMYK inks as grey levels.
        raise ValueError(
            f"a PIL image of mode {image.mode!r} cannot be taken as it is (do_convert_rgb=False takes modes "
            f"{', '.join(_MODES_TAKEN_AS_THEY_ARE)} and greyscale ones); pass do_convert_rgb=True to convert it to RGB."
        )
    tensor = torch.from_numpy(np.array(image))
    tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    return _to_intensity_scale(tensor)


def greyscale_intensities(image: PIL.Image.Image) -> torch.Tensor | None:
    """(1, H, W) float [0, 255] intensities of a float ("F") or 16/32-bit integer ("I;16", "I") greyscale image,
    whose values PIL's convert("RGB") would clip at 255; None for any other mode.

    "I;16" is read as [0, 65535], and so is "I" from a PNG or PGM file (16-bit samples; PIL scales a PGM's maxval to
    65535). Another "I" (`convert("I")` of an 8-bit image, a TIFF of 32-bit integers) is read as [0, 255] when no
    value exceeds 255, else as [0, 65535]. "F" is read as [0, 1] (as float arrays are) when no value exceeds 1, else as
    PIL's [0, 255]; values that reach just past 1 (at most 1.5: a [0, 1] image that overshoots, or an all but black
    [0, 255] one) are refused as ambiguous, since read as [0, 255] a [0, 1] image comes out black. Values outside
    those ranges are refused. A tRNS colour key becomes white.
    """
    if not (image.mode in ("F", "I") or image.mode.startswith("I;16")):
        return None
    array = np.asarray(image, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"Image (PIL mode {image.mode}) contains NaN or infinite values.")
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if image.mode == "F":
        top = 1.0 if high <= 1.0 else 255.0
        if 1.0 < high <= 1.5:
            raise ValueError(
                f"a float (PIL mode F) image whose values reach just past 1 (up to {high:g}): its scale is ambiguous "
                f"([0, 1] with overshoots, or an all but black [0, 255] image); clip it to [0, 1], or give it on "
                f"PIL's [0, 255] scale."
            )
    elif image.mode == "I" and high <= 255 and image.format not in ("PNG", "PPM"):
        top = 255.0
    else:
        top = 65535.0
    if low < 0 or high > top:
        raise ValueError(f"greyscale images of PIL mode {image.mode} must have values in [0, {top:g}], got [{low:g}, {high:g}].")
    intensities = array * (255.0 / top)
    key = image.info.get("transparency")
    if isinstance(key, (int, float)) and not isinstance(key, bool):  # a tRNS colour key: transparent, so white
        intensities[np.asarray(image) == key] = 255.0
    return torch.from_numpy(intensities)[None]


def upright(image: PIL.Image.Image) -> PIL.Image.Image:
    """Apply the EXIF orientation (a photo a camera stored on its side comes out upright); the image itself if none.
    (The processor and cdb-vq's data loading both read images through this.)"""
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: keep the pixels as stored
        return image
    return PIL.ImageOps.exif_transpose(image) if orientation not in (None, 1) else image


def _straight_alpha(image: PIL.Image.Image) -> PIL.Image.Image:
    """A premultiplied-alpha image ("La", "RGBa") as straight alpha, which PIL's conversions take; others as they are."""
    return image.convert(_STRAIGHT_ALPHA[image.mode]) if image.mode in _STRAIGHT_ALPHA else image


def composite_on_white(image: PIL.Image.Image) -> PIL.Image.Image:
    """An image with transparency (an alpha band, or a tRNS colour key in "L", "RGB" or "P") composited on white, as
    transformers' convert_to_rgb does (RGBA); any other image as it is."""
    image = _straight_alpha(image)  # PIL cannot convert "La" to RGBA
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba)
    return image


def _to_channels_first(
    tensor: torch.Tensor, input_data_format: str | ChannelDimension | None, default: ChannelDimension
) -> torch.Tensor:
    """Return a `(C, H, W)` view of a `(H, W)`, `(H, W, C)` or `(C, H, W)` image, checking C is 1, 3 or 4."""
    if tensor.ndim == 2:
        tensor = tensor[None]
    elif tensor.ndim != 3:
        raise ValueError(
            f"Expected an image with 2 (H, W) or 3 dimensions, got shape {tuple(tensor.shape)}; a batch must be "
            "a 4-D array/tensor or a list of images."
        )
    elif input_data_format is not None:
        if ChannelDimension(input_data_format) == ChannelDimension.LAST:
            tensor = tensor.permute(2, 0, 1)
    else:
        first_ok, last_ok = tensor.shape[0] in (1, 3, 4), tensor.shape[-1] in (1, 3, 4)
        channels_last = last_ok and (default == ChannelDimension.LAST or not first_ok)
        if not (first_ok or last_ok):
            raise ValueError(
                f"Unsupported number of channels: image of shape {tuple(tensor.shape)} has no channel axis of "
                "size 1, 3 or 4 (greyscale, RGB or RGBA)."
            )
        if channels_last:
            tensor = tensor.permute(2, 0, 1)
    if tensor.shape[0] not in (1, 3, 4):
        raise ValueError(
            f"Unsupported number of channels: {tensor.shape[0]} (expected 1, 3 or 4: greyscale, RGB or RGBA)."
        )
    if tensor.shape[1] == 0 or tensor.shape[2] == 0:
        raise ValueError(f"Image has an empty size {tensor.shape[1]}x{tensor.shape[2]}.")
    return tensor


def _check_tensor_data(tensor: torch.Tensor) -> None:
    """Refuse tensors without dense pixel data, which torch's own errors (from `.item()`, `aminmax`, strides) name
    neither as an image nor by their cause."""
    if tensor.is_meta:
        raise TypeError("Image is a meta tensor (a shape without data): load its pixels first.")
    if tensor.layout != torch.strided:
        raise TypeError(f"Image is a {tensor.layout} tensor: pass a dense one (tensor.to_dense()).")


def _to_intensity_scale(tensor: torch.Tensor) -> torch.Tensor:
    """Map integer images ([0, 255]; uint16 [0, 65535]) and float images ([0, 1]) to float32 [0, 255]."""
    # float8 too: its range and precision are no image format (and torch cannot take its min and max)
    if tensor.dtype == torch.bool or tensor.is_complex() or (tensor.is_floating_point() and tensor.element_size() == 1):
        raise TypeError(f"Unsupported image dtype {tensor.dtype}: use uint8 or a float type in [0, 1].")
    if tensor.is_floating_point():
        tensor = tensor.to(torch.float32)
        if not torch.isfinite(tensor).all():
            raise ValueError("Image contains NaN or infinite values.")
        low, high = tensor.min().item(), tensor.max().item()
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"Floating-point images must have values in [0, 1], got [{low:.4g}, {high:.4g}]; pass uint8 "
                "data or divide by 255."
            )
        return tensor * 255.0
    if tensor.dtype == torch.uint8:
        return tensor.to(torch.float32)
    if tensor.dtype == torch.uint16:
        return tensor.to(torch.float32) * (255.0 / 65535.0)
    tensor = tensor.to(torch.float32)
    low, high = tensor.min().item(), tensor.max().item()
    if low < 0 or high > 255:
        raise ValueError(f"Integer images must have values in [0, 255], got [{low:.0f}, {high:.0f}].")
    return tensor


def _convert_to_rgb(tensor: torch.Tensor) -> torch.Tensor:
    """(1|3|4, H, W) [0, 255] float -> (3, H, W): greyscale is repeated, RGBA is composited on white."""
    if tensor.shape[0] == 1:
        return tensor.expand(3, -1, -1).contiguous()
    if tensor.shape[0] == 4:
        alpha = tensor[3:] / 255.0
        return tensor[:3] * alpha + 255.0 * (1.0 - alpha)
    return tensor


def _stack(images: list[torch.Tensor], advice: str) -> torch.Tensor:
    """Batch same-shaped tensors; for shapes that differ, name them all (torch.stack names two, by index)."""
    shapes = sorted({tuple(image.shape) for image in images})
    if len(shapes) > 1:
        raise ValueError(f"Cannot batch images of different shapes {shapes}: {advice}")
    return torch.stack(images)


def _stack_model_output(images: Any) -> torch.Tensor:
    """Model output (tensor/array, `(B, 3, H, W)` or `(3, H, W)`, or a list of those) -> one `(B, 3, H, W)` batch;
    the batches of a list are joined in order."""
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("`images` is an empty list: nothing to postprocess.")
        singles = [single for image in images for single in _stack_model_output(image)]
        return _stack(singles, "postprocess them one at a time.")
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images if images.flags.writeable else np.array(images))  # read-only: a copy
    if not isinstance(images, torch.Tensor):
        raise TypeError(
            f"postprocess expects a torch.Tensor or numpy.ndarray of pixel values, got {type(images).__name__}."
        )
    _check_tensor_data(images)
    if not images.is_floating_point():
        # Model output is floating point; complex would lose its imaginary part, bool and integer values are not
        # normalised pixels (uint8 images are already images).
        raise TypeError(
            f"postprocess expects floating-point pixel values (the model's output), got dtype {images.dtype}."
        )
    images = images.detach()
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"postprocess expects pixel values of shape (B, 3, H, W) or (3, H, W), got {tuple(images.shape)}."
        )
    if images.numel() == 0:
        raise ValueError(f"postprocess got no pixels (shape {tuple(images.shape)}): nothing to postprocess.")
    return images


__all__ = ["CDBVQImageProcessor"]
