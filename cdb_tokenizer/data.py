"""Image data for training and evaluation (training-only: never imported by the modeling files).

`sample_photos` gives the real photos that ship inside pip packages, so the embedded default, the tests and the
benchmarks run with no network: scikit-image's sample photos for training, scikit-learn's two sample photos
(a different source, so no leakage) for held-out evaluation.
"""

from __future__ import annotations

from PIL import Image


# scikit-image photos that ship inside the wheel (no download); greyscale ones are converted to RGB.
SKIMAGE_PHOTOS = (
    "astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket",
    "stereo_motorcycle", "camera", "brick", "grass", "gravel", "moon", "coins", "clock",
)  # fmt: skip


def sample_photos(source: str = "skimage") -> list[Image.Image]:
    """Real RGB photos shipped with a pip package: `"skimage"` (scikit-image, 16 photos) or `"sklearn"` (2 photos)."""
    if source == "skimage":
        import skimage.data

        photos = []
        for name in SKIMAGE_PHOTOS:
            image = getattr(skimage.data, name)()
            for array in image[:2] if isinstance(image, tuple) else [image]:  # the stereo pair gives two photos
                photos.append(Image.fromarray(array).convert("RGB"))
        return photos
    if source == "sklearn":
        from sklearn.datasets import load_sample_images

        return [Image.fromarray(array).convert("RGB") for array in load_sample_images().images]
    raise ValueError(f"source must be 'skimage' or 'sklearn', got {source!r}.")
