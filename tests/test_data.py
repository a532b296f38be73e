"""Image data: loading folders, decoding (and skipping) images, augmentation and the resumable sampler."""

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cdb_tokenizer.tools.data import (
    EpochSampler,
    SplitNotFoundError,
    TrainImages,
    collate_images,
    decode_image,
    fixed_crops,
    load_image_dataset,
    sample_photos,
    train_transform,
)


def _write_images(folder, count, size=(40, 48), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(seed)
    for index in range(count):
        array = generator.integers(0, 255, (*size, 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f"image_{index}.png")


@pytest.fixture
def image_folder(tmp_path):
    _write_images(tmp_path / "images", 4)
    (tmp_path / "images" / "broken.png").write_bytes(b"this is not a png")
    return tmp_path / "images"


def test_sample_photos_are_real_rgb_photos():
    train, held_out = sample_photos("skimage"), sample_photos("sklearn")
    assert len(train) == 16 and len(held_out) == 2
    assert all(photo.mode == "RGB" and min(photo.size) >= 256 for photo in train + held_out)
    with pytest.raises(ValueError, match="source must be"):
        sample_photos("imagenet")


def test_the_demo_trains_on_more_colours_than_the_benchmark_photos():
    import numpy as np

    benchmark, demo = sample_photos("skimage"), sample_photos("demo")
    assert len(demo) == 16 and all(photo.mode == "RGB" for photo in demo)
    # The demo's first 13 images are benchmark photos (the benchmarks' training set stays as it was measured) ...
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(demo[:13], benchmark[:13]))

    def green_blue_share(photos) -> float:  # pixels where green or blue clearly leads red: sky, foliage, teal
        pixels = np.concatenate([np.asarray(photo, dtype=np.int16).reshape(-1, 3) for photo in photos])
        return float((pixels[:, 1:].max(1) > pixels[:, 0] + 40).mean())

    # ... and its colour wheels bring the greens and blues the photos lack.
    assert green_blue_share(demo[13:]) > 3 * green_blue_share(benchmark)


def test_load_image_folder_keeps_images_undecoded(image_folder):
    dataset = load_image_dataset(train_data_dir=str(image_folder))
    assert len(dataset) == 5
    values = [row["image"] for row in dataset]
    assert all(isinstance(value, dict) and value["path"] for value in values)
    decoded = [decode_image(value) for value in values]
    assert sum(image is None for image in decoded) == 1  # the broken file
    assert all(image.size == (48, 40) and image.mode == "RGB" for image in decoded if image is not None)


def test_a_saved_data_set_naming_files_outside_its_folder_is_refused(tmp_path):
    # load_from_disk reads whatever state.json names: a copied folder trained on another folder's images.
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (32, 32), (index * 40, 0, 0)) for index in range(4)]
    datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()})).save_to_disk(
        str(tmp_path / "a")
    )
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    arrow = next((tmp_path / "b").glob("*.arrow"))
    arrow.unlink()
    state = json.loads((tmp_path / "b" / "state.json").read_text())
    (tmp_path / "b" / "state.json").write_text(json.dumps({**state, "_data_files": [{"filename": f"../a/{arrow.name}"}]}))
    with pytest.raises(ValueError, match=r"saved in .*b.* is damaged: .*state.json names data files outside the folder"):
        load_image_dataset(train_data_dir=str(tmp_path / "b"))
    assert len(load_image_dataset(train_data_dir=str(tmp_path / "a"))) == 4


def test_load_image_dataset_errors_name_the_problem(image_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        load_image_dataset(train_data_dir=str(tmp_path / "does_not_exist"))
    with pytest.raises(ValueError, match=r"'photo' is not a column.*\['image'\]"):
        load_image_dataset(train_data_dir=str(image_folder), image_column="photo")
    with pytest.raises(SplitNotFoundError, match="validation"):
        load_image_dataset(train_data_dir=str(image_folder), split="validation")
    with pytest.raises(ValueError, match="exactly one image source"):
        load_image_dataset()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no pictures here")
    with pytest.raises(FileNotFoundError, match="found no images in the folder"):
        load_image_dataset(train_data_dir=str(tmp_path / "notes"))
    for label in ("cats", "dogs"):  # a class-labelled folder: `label` is a column, but not one of images
        _write_images(tmp_path / "labelled" / label, 1)
    with pytest.raises(ValueError, match=r"image_column 'label' .* holds ClassLabel\(names=\['cats', 'dogs'\]\), not images"):
        load_image_dataset(train_data_dir=str(tmp_path / "labelled"), image_column="label")  # pyarrow's error before


def test_streaming_folder_yields_undecoded_images(image_folder):
    stream = load_image_dataset(train_data_dir=str(image_folder), streaming=True)
    values = [row["image"] for row in stream]
    assert len(values) == 5
    # Still the file's reference, not a PIL image: decoding (and refusing what cannot be read) is decode_image's job.
    assert all(isinstance(value, dict) and set(value) == {"bytes", "path"} for value in values), values
    assert all(value["path"] or value["bytes"] for value in values)
    decoded = [decode_image(value) for value in values]
    assert sum(image is None for image in decoded) == 1  # the broken file, skipped instead of failing the stream


def test_decode_image_accepts_every_form_and_returns_none_for_garbage(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red: composited on white
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    assert decode_image({"bytes": buffer.getvalue(), "path": None}).getpixel((0, 0)) == (255, 255, 255)
    grey = Image.new("L", (3, 3), 7)
    grey.save(tmp_path / "grey.png")
    assert decode_image(str(tmp_path / "grey.png")).getpixel((1, 1)) == (7, 7, 7)
    assert decode_image(np.zeros((2, 2, 3), dtype=np.uint8)).size == (2, 2)
    truncated = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    assert decode_image({"bytes": truncated, "path": None}) is None
    assert decode_image({"bytes": None, "path": str(tmp_path / "missing.png")}) is None
    assert decode_image(12345) is None


def test_a_transparent_colour_key_is_composited_on_white_like_an_alpha_channel():
    # A PNG's tRNS chunk makes one grey level (or RGB colour) transparent: those pixels came out black.
    grey = np.full((4, 4), 7, dtype=np.uint8)
    grey[:, :2] = 0
    colour = np.full((4, 4, 3), (10, 20, 30), dtype=np.uint8)
    colour[:, :2] = 0
    for array, key, kept in ((grey, 0, (7, 7, 7)), (colour, (0, 0, 0), (10, 20, 30))):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG", transparency=key)
        image = decode_image(buffer.getvalue())
        assert image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((3, 3)) == kept


def test_the_pixel_budget_governs_pils_own_decompression_bomb_limit(tmp_path, monkeypatch):
    # PIL refuses images over twice its MAX_IMAGE_PIXELS (about 179 MP) even when max_pixels=0 says "no limit".
    Image.new("RGB", (20, 20)).save(tmp_path / "large.png")  # 400 pixels, over twice the limit below
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    assert decode_image(str(tmp_path / "large.png"), max_pixels=0) is not None
    assert decode_image((tmp_path / "large.png").read_bytes(), max_pixels=1_000) is not None
    assert decode_image(str(tmp_path / "large.png"), max_pixels=300) is None  # the budget itself still holds
    assert Image.MAX_IMAGE_PIXELS == 50  # lifted only while decoding
    # TIFF: PIL checks its limit again when it loads the pixels, after opening.
    Image.new("RGB", (20, 20)).save(tmp_path / "large.tif")
    assert decode_image(str(tmp_path / "large.tif"), max_pixels=0) is not None


def test_decode_image_keeps_16_bit_and_float_greyscale_values(tmp_path):
    # PIL's convert("RGB") clips these modes at 255: a 16-bit ramp came out nearly all white, a float one black.
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    decoded = np.asarray(decode_image(str(tmp_path / "ramp16.png")))[..., 0].astype(np.float64)
    np.testing.assert_allclose(decoded, ramp / 257.0, atol=0.51)
    as_float = Image.fromarray((ramp / 65535.0).astype(np.float32))
    assert as_float.mode == "F"
    np.testing.assert_allclose(np.asarray(decode_image(as_float))[..., 1], ramp / 257.0, atol=0.51)


def test_streamed_crops_differ_between_processes():
    import datasets

    from cdb_tokenizer.tools.data import StreamingTrainImages

    features = datasets.Features({"image": datasets.Image()})
    stream = datasets.Dataset.from_dict({"image": [sample_photos("skimage")[0]] * 4}, features=features).to_iterable_dataset()
    crops = [
        torch.stack([item["pixel_values"] for item in StreamingTrainImages(stream, train_transform(32, (0.1, 0.5)),
                                                                            seed=0, shuffle_buffer=1, process_index=rank)])
        for rank in (0, 1)
    ]  # fmt: skip
    # The same picture at the same position of each process's share: the crops must still differ.
    assert not torch.equal(crops[0], crops[1])


def test_train_images_skip_unreadable_images_and_count_them(image_folder):
    dataset = load_image_dataset(train_data_dir=str(image_folder))
    broken = next(i for i, row in enumerate(dataset) if row["image"]["path"].endswith("broken.png"))
    images = TrainImages(dataset, train_transform(16), seed=0)
    sample = images[broken]
    assert sample["skipped"] == 1 and sample["pixel_values"].shape == (3, 16, 16)
    batch = collate_images([images[i] for i in range(len(images))])
    assert batch["skipped"] == 1 and batch["pixel_values"].shape == (5, 3, 16, 16)


def test_train_transform_maps_pixel_values_to_minus_one_to_one():
    crop = train_transform(8)(Image.new("RGB", (20, 12), (0, 255, 51)))  # a flat colour stays flat under any crop
    expected = torch.tensor([-1.0, 1.0, 51 / 255 * 2 - 1]).view(3, 1, 1).expand(3, 8, 8)
    torch.testing.assert_close(crop, expected)


def test_crops_are_a_function_of_seed_epoch_and_index():
    photos = sample_photos("skimage")[:3]
    images = TrainImages(photos, train_transform(32, (0.1, 0.5)), seed=3)
    torch.manual_seed(123)
    first = images[1]["pixel_values"]
    torch.manual_seed(456)  # the global RNG does not matter
    assert torch.equal(images[1]["pixel_values"], first)
    images.set_epoch(1)
    assert not torch.equal(images[1]["pixel_values"], first)
    held_out = fixed_crops(sample_photos("sklearn"), 32, crops_per_image=3)
    assert held_out.shape == (6, 3, 32, 32) and torch.equal(held_out, fixed_crops(sample_photos("sklearn"), 32, 3))


def test_epoch_sampler_shards_and_resumes():
    samplers = [EpochSampler(23, batch_size=3, seed=5, num_replicas=2, rank=rank) for rank in range(2)]
    orders = [list(sampler) for sampler in samplers]
    assert len(orders[0]) == len(orders[1]) == 9 and samplers[0].batches_per_epoch == 3
    assert not set(orders[0]) & set(orders[1])
    samplers[0].set_epoch(0, skip_batches=2)
    assert list(samplers[0]) == orders[0][6:] and len(samplers[0]) == 3
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != orders[0]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochSampler(5, batch_size=3, num_replicas=2)
    with pytest.raises(ValueError, match="skip_batches must be in"):  # its length would go negative
        samplers[0].set_epoch(2, skip_batches=4)


def test_image_folder_splits_only_on_train_validation_test_folders(tmp_path):
    # datasets made a split of any name starting with a split keyword: class folders keyboards/, mice/,
    # training_shoes/ trained on training_shoes/ alone (10 images dropped without a word); a stray test.png left
    # no train split at all.
    for label in ("keyboards", "mice", "training_shoes"):
        _write_images(tmp_path / "classes" / label, 2)
    Image.new("RGB", (8, 8)).save(tmp_path / "classes" / "test.png")
    dataset = load_image_dataset(train_data_dir=str(tmp_path / "classes"))
    assert len(dataset) == 7
    _write_images(tmp_path / "splits" / "train" / "dev_boards", 3)
    _write_images(tmp_path / "splits" / "validation" / "dev_boards", 2)
    assert len(load_image_dataset(train_data_dir=str(tmp_path / "splits"))) == 3
    assert len(load_image_dataset(train_data_dir=str(tmp_path / "splits"), split="validation")) == 2


def test_top_level_entries_beside_split_folders_are_named_since_they_are_ignored(tmp_path, caplog):
    # With a train/ folder, val/, stray images and other folders were dropped without a word.
    _write_images(tmp_path / "splits" / "train", 3)
    _write_images(tmp_path / "splits" / "validation", 1)
    with caplog.at_level("WARNING"):
        load_image_dataset(train_data_dir=str(tmp_path / "splits"))
    (tmp_path / "splits" / "README.md").write_text("# my photos")  # no images: nothing to say about it
    (tmp_path / "splits" / "LICENSE").write_text("CC-BY")
    with caplog.at_level("WARNING"):
        load_image_dataset(train_data_dir=str(tmp_path / "splits"))
    assert "are ignored" not in caplog.text  # nothing ignored, nothing said
    _write_images(tmp_path / "splits" / "val", 2)
    _write_images(tmp_path / "splits" / "extra_class", 2)
    Image.new("RGB", (8, 8)).save(tmp_path / "splits" / "stray.png")
    (tmp_path / "splits" / ".DS_Store").write_bytes(b"")  # hidden: datasets skips it anyway
    with caplog.at_level("WARNING"):
        assert len(load_image_dataset(train_data_dir=str(tmp_path / "splits"))) == 3
    assert "at the top (3) are ignored: extra_class, stray.png, val." in caplog.text
    assert "validation/ or test/" in caplog.text
    for index in range(4):
        Image.new("RGB", (8, 8)).save(tmp_path / "splits" / f"photo_{index}.jpg")
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_image_dataset(train_data_dir=str(tmp_path / "splits"))
    assert "at the top (7) are ignored: extra_class, photo_0.jpg, photo_1.jpg, photo_2.jpg, photo_3.jpg and 2 more." in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_image_dataset(train_data_dir=str(tmp_path / "splits"), split="validation")
    assert "are ignored" not in caplog.text  # said once, when the training split is read


def test_a_folder_named_like_a_glob_pattern_reads_only_its_own_images(tmp_path):
    # The folder went to datasets as a glob pattern: `run[1]` trained on a sibling `run1`, `set*1` also read
    # `set_other1`, and `photos [2024]` found no images.
    for name, count in (("run[1]", 2), ("run1", 5), ("set*1", 3), ("set_other1", 4), ("photos [2024]", 1)):
        _write_images(tmp_path / name, count)
    for name, count in (("run[1]", 2), ("set*1", 3), ("photos [2024]", 1)):
        dataset = load_image_dataset(train_data_dir=str(tmp_path / name))
        assert len(dataset) == count and {row["image"]["path"].split("/")[-2] for row in dataset} == {name}
    _write_images(tmp_path / "splits[1]" / "train", 2)
    _write_images(tmp_path / "splits1" / "train", 3)
    assert len(load_image_dataset(train_data_dir=str(tmp_path / "splits[1]"))) == 2
    # A local data set folder goes to datasets as it is (it builds the patterns itself): refused, not misread.
    import pandas

    for name, count in (("table[1]", 2), ("table1", 5)):
        (tmp_path / name).mkdir()
        pandas.DataFrame({"image": ["a.png"] * count}).to_parquet(tmp_path / name / "train.parquet")
    with pytest.raises(ValueError, match=r"glob character"):
        load_image_dataset(dataset_name=str(tmp_path / "table[1]"))


def test_images_inside_an_archive_are_read(tmp_path):
    # datasets gives such images as paths like zip://image_0.png::/folder/images.zip (and Hub files as hf://...),
    # which PIL cannot open: every image was "unreadable".
    import zipfile

    _write_images(tmp_path / "loose", 2)
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        for path in sorted((tmp_path / "loose").iterdir()):
            archive.write(path, path.name)
    image = decode_image({"bytes": None, "path": f"zip://image_1.png::{tmp_path / 'images.zip'}"})
    assert image is not None and image.size == (48, 40)
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(tmp_path / "loose" / "image_1.png")))


def test_a_streamed_hold_out_never_reaches_training_with_several_shards(tmp_path):
    # take(n) / skip(n) ran before the stream was split over loader workers (or processes); each share then skipped
    # its own first images: a held-out image was trained on and another never seen.
    import datasets
    from accelerate import Accelerator

    import training.train as train_script

    features = datasets.Features({"image": datasets.Image()})
    for part in range(2):
        rows = []
        for index in range(part * 6, part * 6 + 6):
            buffer = io.BytesIO()
            Image.fromarray(np.full((36, 36, 3), index * 20, dtype=np.uint8)).save(buffer, format="PNG")
            rows.append({"bytes": buffer.getvalue(), "path": None})
        datasets.Dataset.from_dict({"image": rows}, features=features).to_parquet(tmp_path / "data" / f"part{part}.parquet")
    args = train_script.parse_args(["--dataset_name", str(tmp_path / "data"), "--streaming", "--max_train_steps", "3",
                                    "--num_validation_images", "3", "--dataloader_num_workers", "2", "--resolution", "32",
                                    "--random_crop_scale", "1", "1", "--train_batch_size", "1", "--model_preset", "tiny",
                                    "--clip_model", "none", "--output_dir", str(tmp_path / "run")])  # fmt: skip
    train, validation, _ = train_script.load_data(args, Accelerator(cpu=True))
    loader, _ = train_script.build_train_loader(args, train, Accelerator(cpu=True))

    def ids(pixel_values):
        return sorted(round(float((image.mean() + 1) / 2 * 255) / 20) for image in pixel_values)

    trained = sorted(index for batch in loader for index in ids(batch["pixel_values"]))
    held_out = ids(validation)  # a shuffled sample of the stream, not its first images
    assert len(set(held_out)) == 3 and held_out != [0, 1, 2]
    assert sorted(trained + held_out) == list(range(12))  # every image trained on or held out, never both


def test_an_unreadable_image_at_the_end_of_a_stream_is_counted():
    # Skips rode on the next readable image: one after the share's last readable image was never counted.
    import datasets

    from cdb_tokenizer.tools.data import StreamingTrainImages

    buffer = io.BytesIO()
    sample_photos("skimage")[0].save(buffer, format="PNG")
    rows = [{"bytes": buffer.getvalue(), "path": None}] * 3 + [{"bytes": b"not an image", "path": "broken.png"}]
    stream = datasets.Dataset.from_dict({"image": rows}, features=datasets.Features({"image": datasets.Image(decode=False)}))
    items = list(StreamingTrainImages(stream.to_iterable_dataset(), train_transform(32, (0.5, 1.0)), seed=0, shuffle_buffer=1))
    assert len(items) == 3 and sum(item["skipped"] for item in items) == 1
    assert [name for item in items for name in item["skipped_ids"]] == ["broken.png"]


def test_a_linked_sub_folder_is_named_since_its_images_are_not_used(tmp_path, caplog):
    # datasets' file search does not follow links to folders: their images were dropped without a word.
    _write_images(tmp_path / "data" / "real", 2)
    _write_images(tmp_path / "elsewhere", 3)
    (tmp_path / "data" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with caplog.at_level("WARNING"):
        dataset = load_image_dataset(train_data_dir=str(tmp_path / "data"))
    assert len(dataset) == 2
    assert "sub-folders that are links are not followed" in caplog.text and "linked" in caplog.text


def test_a_link_loop_in_the_folder_is_skipped_not_a_crash(tmp_path):
    # The link check's is_dir() raised "Too many levels of symbolic links": train.py died with a traceback, the CLI's
    # --data refused the whole folder, where datasets itself reads the images and skips the loop.
    _write_images(tmp_path / "data", 2)
    (tmp_path / "data" / "a").symlink_to(tmp_path / "data" / "b")
    (tmp_path / "data" / "b").symlink_to(tmp_path / "data" / "a")
    _write_images(tmp_path / "split" / "train", 2)
    (tmp_path / "split" / "loop").symlink_to(tmp_path / "split" / "loop")  # at the top, beside train/: the other walk
    assert len(load_image_dataset(train_data_dir=str(tmp_path / "data"))) == 2
    assert len(load_image_dataset(train_data_dir=str(tmp_path / "split"))) == 2


def test_linked_split_folders_are_read_and_not_named(tmp_path, caplog):
    # datasets reads train/ and validation/ themselves when they are links; only links inside them are skipped.
    _write_images(tmp_path / "real_train", 3)
    _write_images(tmp_path / "real_validation", 2)
    _write_images(tmp_path / "elsewhere", 4)
    (tmp_path / "real_train" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "data").mkdir()
    for split in ("train", "validation"):
        (tmp_path / "data" / split).symlink_to(tmp_path / f"real_{split}", target_is_directory=True)
    with caplog.at_level("WARNING"):
        assert len(load_image_dataset(train_data_dir=str(tmp_path / "data"))) == 3
        assert len(load_image_dataset(train_data_dir=str(tmp_path / "data"), split="validation")) == 2
    assert caplog.text.count("are not used: train/linked.") == 2 and "validation." not in caplog.text


@pytest.mark.parametrize("streaming", [False, True])
def test_a_data_set_opens_only_its_own_image_files_never_others_it_names(tmp_path, caplog, streaming):
    # A stranger's data set that names /home/me/private.png (or a URL) had the run read that file and show it in
    # the validation pictures, which publishing uploads.
    import pandas

    private, own = tmp_path / "private.png", tmp_path / "data" / "own.png"
    own.parent.mkdir()
    for path, shade in ((private, 200), (own, 50)):
        Image.fromarray(np.full((8, 8, 3), shade, dtype=np.uint8)).save(path)
    # A chained path is opened from its first part: a local file dressed as an archive member of a Hub file.
    rows = [str(private), "http://127.0.0.1:9/x.png", f"{private}::hf://datasets/org/set/x.zip", str(own)]
    pandas.DataFrame({"image": rows}).to_parquet(tmp_path / "data" / "train.parquet")
    dataset = load_image_dataset(dataset_name=str(tmp_path / "data"), streaming=streaming)
    with caplog.at_level("WARNING"):
        images = [decode_image(item["image"]) for item in dataset]
    assert images[:3] == [None, None, None]  # never opened, never fetched
    assert images[3] is not None and np.asarray(images[3])[0, 0, 0] == 50  # the data set's own file
    assert "names image files outside it" in caplog.text


def test_one_split_of_a_data_set_is_read_without_preparing_the_others(tmp_path):
    # datasets downloads and prepares every split for one: `eval --protocol imagenet` on ILSVRC/imagenet-1k fetched
    # the 140 GB training set to score the validation one. A broken training shard proves it is no longer read.
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "eel"])})
    (tmp_path / "repo" / "data").mkdir(parents=True)
    for split, count in (("train", 6), ("validation", 3)):
        images = [Image.new("RGB", (8, 8), (index * 30, 0, 0)) for index in range(count)]
        rows = datasets.Dataset.from_dict({"image": images, "label": [index % 3 for index in range(count)]}, features=features)
        rows.to_parquet(str(tmp_path / "repo" / "data" / f"{split}-00000-of-00001.parquet"))
    (tmp_path / "repo" / "data" / "train-00000-of-00001.parquet").write_bytes(b"not parquet")
    validation = load_image_dataset(dataset_name=str(tmp_path / "repo"), split="validation")
    assert len(validation) == 3 and validation.features["label"].names == ["cat", "dog", "eel"]
    # An image folder names its classes from the files it reads: it is read whole, so that validation's ids are
    # training's even where validation lacks a class.
    for split, classes in (("train", ("ant", "bee")), ("validation", ("bee",))):
        for name in classes:
            (tmp_path / "folder" / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "folder" / split / name / "a.png")
    validation = load_image_dataset(dataset_name=str(tmp_path / "folder"), split="validation")
    assert validation.features["label"].names == ["ant", "bee"] and validation[0]["label"] == 1


def test_a_hub_data_set_reaches_only_its_own_repository():
    # Another repository's files would be fetched with the user's token (a private one included).
    from cdb_tokenizer.tools.data import DataSetImagePaths

    screen = DataSetImagePaths("image", repo_id="org/set")
    assert screen.allowed("hf://datasets/org/set/images/a.png") and screen.allowed("hf://datasets/org/set@main/a.png")
    assert screen.allowed("zip://a.png::hf://datasets/org/set/images.zip")
    assert not screen.allowed("hf://datasets/victim/private/a.png") and not screen.allowed("hf://datasets/org/settings/a.png")
    assert not screen.allowed("/home/me/a.png::hf://datasets/org/set/images.zip")
    assert not screen.allowed("file:///home/me/a.png") and not screen.allowed("images/a.png")
    # `..` climbs out of the repository once the URL is resolved; `~` is opened as written, not expanded.
    assert not screen.allowed("hf://datasets/org/set/../../evil/private/resolve/main/x.png")
    assert not screen.allowed("hf://datasets/org/set@main/../../evil/x.png") and not screen.allowed("~/a.png")
    # Of the Hub cache, only this repository's files.
    from huggingface_hub import constants

    assert screen.allowed(f"{constants.HF_HUB_CACHE}/datasets--org--set/snapshots/abc/a.png")
    assert not screen.allowed(f"{constants.HF_HUB_CACHE}/datasets--me--private/snapshots/abc/photo.png")


def test_streamed_images_outside_the_data_set_are_skipped_each_under_its_own_name(tmp_path, caplog):
    # Every screened-out image became {"bytes": None, "path": None}: four of them counted as one skipped image,
    # reported as "<dict>".
    import pandas

    from cdb_tokenizer.tools.data import StreamingTrainImages

    (tmp_path / "data").mkdir()
    own = tmp_path / "data" / "own.png"
    Image.new("RGB", (16, 16)).save(own)
    private = [str(tmp_path / f"private_{index}.png") for index in range(3)]
    pandas.DataFrame({"image": [*private, private[0], str(own)]}).to_parquet(tmp_path / "data" / "train.parquet")
    stream = load_image_dataset(dataset_name=str(tmp_path / "data"), streaming=True)
    with caplog.at_level("WARNING"):
        items = list(StreamingTrainImages(stream, train_transform(8), shuffle_buffer=1))
    names = [name for item in items for name in item["skipped_ids"]]
    assert len(items) == 1 and items[0]["skipped"] == 4
    assert len(names) == 4 and len(set(names)) == 3  # private_0.png twice: one file
    assert not any("private" in name for name in names)  # named by a digest, never by the path it hides
    reason = "(the data set names this image file outside it"
    assert all(f"Skipping unreadable image {name} {reason}" in caplog.text for name in names)
    errors = []
    assert decode_image(next(iter(stream))["image"], errors=errors) is None and isinstance(errors[0], PermissionError)


def test_a_skipped_image_is_named_with_a_reason_a_user_can_read():
    # PIL's "cannot identify image file <_io.BytesIO object at 0x7f...>" showed a memory address, and reasons ending
    # in "." ended the log line in "..".
    from cdb_tokenizer.tools.data import skipped_image_message

    errors = []
    assert decode_image({"bytes": b"not an image", "path": "notes.png"}, errors=errors) is None
    assert skipped_image_message({"path": "notes.png"}, errors) == "notes.png (not an image file PIL can read)"
    nan = np.full((4, 4), np.nan, np.float32)
    errors = []
    assert decode_image(nan, errors=errors) is None
    assert skipped_image_message(nan, errors) == "<ndarray> (Image (PIL mode F) contains NaN or infinite values)"


@pytest.mark.parametrize("streaming", [False, True])
def test_a_data_set_saved_with_save_to_disk_is_read_as_either_source(tmp_path, streaming, monkeypatch):
    """A saved Dataset was refused with advice no flag could follow ("use load_from_disk"), and eval of a saved
    DatasetDict said "found no images"."""
    import datasets

    _write_images(tmp_path / "images", 5)
    paths = sorted(str(path) for path in (tmp_path / "images").glob("*.png"))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    whole = datasets.Dataset.from_dict({"image": paths, "label": list(range(5))}, features=features)
    whole.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": whole.select(range(3)), "validation": whole.select(range(3, 5))}).save_to_disk(str(tmp_path / "two"))
    for source in ("train_data_dir", "dataset_name"):
        rows = list(load_image_dataset(**{source: str(tmp_path / "one")}, streaming=streaming))
        assert [row["label"] for row in rows] == [0, 1, 2, 3, 4]
        assert decode_image(rows[4]["image"]).size == (48, 40)  # undecoded, with its bytes: no path outside is opened
        validation = list(load_image_dataset(**{source: str(tmp_path / "two")}, split="validation", streaming=streaming))
        assert [row["label"] for row in validation] == [3, 4]
    # Streamed in shards, a multiple of the processes, as processes and loader workers share a stream out by shard.
    assert load_image_dataset(train_data_dir=str(tmp_path / "one"), streaming=True).num_shards == 5  # one per row
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert load_image_dataset(train_data_dir=str(tmp_path / "one"), streaming=True).num_shards == 3
    with pytest.raises(SplitNotFoundError, match=r"saved in .*one' has no split 'validation'; its splits are \['train'\]"):
        load_image_dataset(train_data_dir=str(tmp_path / "one"), split="validation")


def test_a_split_prepared_alone_is_read_again_offline(tmp_path, monkeypatch):
    # A split read alone is cached by datasets as `default-<hash>`, which its offline lookup skips: with
    # HF_HUB_OFFLINE=1 the data set a run had just prepared was "Couldn't find cache for ...".
    import shutil

    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    (tmp_path / "photos" / "data").mkdir(parents=True)
    for split, count in (("train", 4), ("validation", 2)):
        rows = datasets.Dataset.from_dict(
            {"image": [Image.new("RGB", (8, 8))] * count, "label": [0] * count}, features=features
        )
        rows.to_parquet(str(tmp_path / "photos" / "data" / f"{split}-00000-of-00001.parquet"))
    cache = tmp_path / "cache"
    load_image_dataset(dataset_name=str(tmp_path / "photos"), split="validation", cache_dir=str(cache))
    shutil.copytree(cache / "photos", cache / "org___photos")  # where a load of the Hub's org/photos leaves it
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    validation = load_image_dataset(dataset_name="org/photos", split="validation", cache_dir=str(cache))
    assert len(validation) == 2 and validation.features["label"].names == ["cat", "dog"]
