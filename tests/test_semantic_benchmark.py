"""The semantic benchmark's own parts: the Fashion-MNIST IDX loader, the teacher checkpoint, and the two measures."""

import gzip
import importlib.util
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


BENCHMARK_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "semantic.py"


@pytest.fixture(scope="module")
def semantic():
    if str(BENCHMARK_PATH.parent) not in sys.path:  # the benchmarks import their shared `common.py` as scripts do
        sys.path.insert(0, str(BENCHMARK_PATH.parent))
    spec = importlib.util.spec_from_file_location("semantic_benchmark", BENCHMARK_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic (0, 0, 0x08, ndim), big-endian sizes, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", size) for size in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_split(folder: Path, images: np.ndarray, labels: np.ndarray, prefix: str, compress: bool) -> None:
    for stem, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        data = idx_bytes(array)
        if compress:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_loader_reads_what_was_written(semantic, tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 0, 9, 9, 1], dtype=np.uint8)
    write_split(tmp_path, images, labels, "t10k", compress)

    data = semantic.load_fashion_mnist("test", data_dir=tmp_path, dataset_name=None)

    np.testing.assert_array_equal(data.images, images)
    np.testing.assert_array_equal(data.labels, labels.astype(np.int64))
    assert data.label_names[3] == "dress" and len(data.label_names) == 10


def test_idx_loader_rejects_a_corrupt_file(semantic, tmp_path):
    images = np.zeros((4, 28, 28), dtype=np.uint8)
    write_split(tmp_path, images, np.zeros(4, dtype=np.uint8), "t10k", compress=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])  # truncated
    with pytest.raises(ValueError, match="truncated"):
        semantic.load_fashion_mnist_idx(tmp_path, "test")
    path.write_bytes(b"\x01\x02\x03\x04" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        semantic.read_idx(path)


def test_missing_folder_and_files_give_clear_errors(semantic, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*dataset-fashion-mnist"):
        semantic.load_fashion_mnist("train", data_dir=tmp_path / "nowhere", dataset_name=None)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        semantic.load_fashion_mnist("train", data_dir=tmp_path, dataset_name=None)


def test_missing_folder_falls_back_to_the_hub_and_says_when_neither_works(semantic, tmp_path, monkeypatch):
    calls = []

    def unreachable_hub(name, split):
        calls.append((name, split))
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(semantic, "load_fashion_mnist_hub", unreachable_hub)
    with pytest.raises(semantic.DataUnavailableError, match="Fashion-MNIST is not available.*nowhere.*some/fmnist.*ConnectionError"):
        semantic.load_fashion_mnist("test", data_dir=tmp_path / "nowhere", dataset_name="some/fmnist")
    assert calls == [("some/fmnist", "test")]


def test_too_few_training_images_for_the_held_out_ones_are_refused_before_any_work(semantic, capsys):
    # train.py holds 256 images out of each tokenizer's training folder: with no more than that it failed, after the
    # teacher had trained.
    with pytest.raises(SystemExit):
        semantic.parse_args(["--num_train_images", "256"])
    assert "--num_train_images must be above 256" in capsys.readouterr().err
    assert semantic.parse_args(["--num_train_images", "257"]).num_train_images == 257


def test_pixel_values_are_padded_rgb_in_model_range(semantic):
    images = np.full((2, 28, 28), 255, dtype=np.uint8)
    images[1] = 0
    pixels = semantic.to_pixel_values(images, size=32)
    assert pixels.shape == (2, 3, 32, 32)
    assert torch.all(pixels[0, :, 2:30, 2:30] == 1.0) and torch.all(pixels[0, :, :2] == -1.0)
    assert torch.all(pixels[1] == -1.0)


def test_imagefolder_holds_each_image_as_rgb_png_in_its_class_folder(semantic, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    data = semantic.LabelledImages(
        rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8), np.array([8, 9, 8]), semantic.FASHION_MNIST_LABELS
    )
    semantic.write_imagefolder(data, tmp_path)
    assert sorted(path.name for path in (tmp_path / "bag").iterdir()) == ["000000.png", "000002.png"]
    image = Image.open(tmp_path / "ankle_boot" / "000001.png")
    assert image.mode == "RGB" and image.size == (32, 32)
    np.testing.assert_array_equal(np.asarray(image)[2:30, 2:30, 1], data.images[1])


def test_prototype_agreement_counts_tokens_whose_code_label_matches(semantic):
    code_labels = ["cat", "dog", "cat", None]
    tokens = torch.tensor([[0, 2, 1, 3], [1, 1, 1, 0]])
    # image 0 ("cat"): codes 0 and 2 are "cat" -> 2/4; image 1 ("dog"): three "dog" codes -> 3/4.
    assert semantic.prototype_agreement(tokens, code_labels, ["cat", "dog"]) == pytest.approx((0.5 + 0.75) / 2)
    assert semantic.prototype_agreement(tokens, code_labels, ["bird", "bird"]) == 0.0
    with pytest.raises(ValueError, match="no code has a labelled prototype"):
        semantic.prototype_agreement(tokens, [None] * 4, ["cat", "dog"])
    with pytest.raises(ValueError, match="code ids up to 3"):
        semantic.prototype_agreement(tokens, ["cat", "dog"], ["cat", "dog"])


def test_majority_code_labels_pick_each_codes_most_frequent_class(semantic):
    tokens = torch.tensor([[0, 0, 1], [0, 1, 1], [1, 1, 1]])
    labels = np.array([2, 0, 0])
    # code 0: class 2 twice, class 0 once -> "c"; code 1: class 2 once, class 0 five times -> "a"; code 2 unused.
    assert semantic.majority_code_labels(tokens, labels, 3, ["a", "b", "c"]) == ["c", "a", None]


def test_linear_probe_separates_what_is_separable_and_not_noise(semantic):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=300)
    centres = np.array([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]])
    features = centres[labels] + rng.normal(size=(300, 2))
    assert semantic.linear_probe_accuracy(features[:200], labels[:200], features[200:], labels[200:]) > 0.95
    noise = rng.normal(size=(300, 2))
    assert semantic.linear_probe_accuracy(noise[:200], labels[:200], noise[200:], labels[200:]) < 0.6
    with pytest.raises(ValueError, match="same D"):
        semantic.linear_probe_accuracy(features, labels, features[:, :1], labels)


def test_encode_split_pools_the_quantized_codes(semantic, photo_batch):
    from conftest import tiny_model

    model = tiny_model()
    model.train()
    model(photo_batch)  # k-means initialises the codebook from these latents
    tokens, pooled, head_prototypes = semantic.encode_split(model, photo_batch, batch_size=3)
    assert tokens.shape == (4, 64) and pooled.shape == (4, 8)
    expected = model.quantizer.lookup(tokens).mean(dim=1)
    torch.testing.assert_close(pooled, expected)
    assert head_prototypes is None  # no prototypes, nothing to agree with


def test_encode_split_reads_the_prototype_nearest_each_predicted_semantic_feature(semantic, photo_batch):
    from conftest import tiny_model

    model = tiny_model().eval()
    prototypes = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    model.set_prototypes(prototypes)
    _, _, head_prototypes = semantic.encode_split(model, photo_batch, batch_size=3)
    features = model.encode(photo_batch).semantic_features.flatten(2).transpose(1, 2)  # (4, 64, 32)
    expected = torch.nn.functional.cosine_similarity(features[:, :, None], prototypes[None, None], dim=-1).argmax(-1)
    assert head_prototypes.shape == (4, 64) and torch.equal(head_prototypes, expected)
    assert head_prototypes.unique().numel() > 1  # a real choice among the prototypes, not one constant


@torch.no_grad()
def image_embeddings(model, semantic, pixels):
    return model.encode_image(semantic.teacher_pixels(pixels))


def test_saved_teacher_loads_through_open_clip_and_train_py_loader(semantic, tmp_path):
    import open_clip

    config = semantic.teacher_model_config(layers=1, width=64, embed_dim=16)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(16, 28, 28), dtype=np.uint8)
    data = semantic.LabelledImages(images, rng.integers(0, 10, size=16), semantic.FASHION_MNIST_LABELS)
    model, tokenizer = semantic.train_teacher(data, config, steps=2, batch_size=8, show_progress=False)
    config_path, checkpoint_path = semantic.save_teacher(model, config, tmp_path / "teacher")
    pixels = semantic.to_pixel_values(data.images)
    expected = image_embeddings(model, semantic, pixels)

    # As open_clip users load it: a registered config plus `pretrained=PATH`, or a local-dir folder.
    open_clip.add_model_config(config_path)
    loaded = open_clip.create_model(config_path.stem, pretrained=str(checkpoint_path)).eval()
    torch.testing.assert_close(image_embeddings(loaded, semantic, pixels), expected)
    local_dir = open_clip.create_model(f"local-dir:{config_path.parent}").eval()
    torch.testing.assert_close(image_embeddings(local_dir, semantic, pixels), expected)

    # As train.py loads it; the average-pooled tower makes its image embedding the mean of its patch features.
    teacher = semantic.load_teacher(config_path, checkpoint_path)
    torch.testing.assert_close(teacher.patch_features(pixels).mean(dim=(2, 3)), expected, atol=1e-4, rtol=1e-4)

    with torch.no_grad():
        captions = tokenizer([f"a photo of a {name}." for name in data.label_names])
        text = torch.nn.functional.normalize(model.encode_text(captions), dim=-1)
    predictions = (torch.nn.functional.normalize(expected, dim=-1) @ text.t()).argmax(-1).numpy()
    assert semantic.zero_shot_accuracy(teacher, data) == pytest.approx(float((predictions == data.labels).mean()))
    patches = torch.nn.functional.normalize(teacher.patch_features(pixels).flatten(2).transpose(1, 2), dim=-1)
    patch_hits = (patches @ teacher.encode_text(list(data.label_names)).t()).argmax(-1) == torch.as_tensor(data.labels)[:, None]
    assert semantic.teacher_patch_agreement(teacher, data) == pytest.approx(float(patch_hits.float().mean()))


def test_token_label_maps_picture_has_a_row_per_class_and_a_column_per_tokenizer(semantic, tmp_path):
    from PIL import Image

    from conftest import tiny_model

    rng = np.random.default_rng(0)
    test = semantic.LabelledImages(
        images=rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8), labels=np.array([0, 1, 2, 0, 1, 2]),
        label_names=("shirt", "shoe", "bag"),
    )
    models = {}
    for name in ("one", "two"):
        model = tiny_model().eval()
        model.config.prototype_labels = ["shirt", "shoe", "bag", "shirt", "shoe", "bag", "shirt", "shoe"]
        model.set_prototypes(torch.randn(8, 32, generator=torch.Generator().manual_seed(0)))
        models[name] = model
    path = semantic.save_token_label_maps(models, test, tmp_path / "maps.png", resolution=32, count=3)
    width, height = Image.open(path).size
    # 1.6 inches at 80 dpi per row (one per class) and per tokenizer column, plus the image and legend columns.
    assert (width, height) == (round((1.6 * 2 + 3.2) * 80), round(1.6 * 3 * 80))


def test_the_reports_command_carries_no_local_path(semantic):
    import common

    command = common.command_line(["--fashion_mnist_dir", "/home/jdoe/data/fmnist", "--max_train_steps", "10"],
                                  script=semantic.__file__)  # fmt: skip
    assert command == "python benchmarks/semantic.py --fashion_mnist_dir fmnist --max_train_steps 10"


def test_the_whole_benchmark_runs_end_to_end_on_local_idx_files(semantic, tmp_path):
    # main() itself: a name it used twice (the report's command function and a loop variable) made every run fail at
    # start-up with UnboundLocalError, which tests of its parts never met.
    rng = np.random.default_rng(0)
    data = tmp_path / "idx"
    data.mkdir()
    for prefix, count in (("train", 300), ("t10k", 20)):
        labels = np.arange(count, dtype=np.uint8) % 10
        images = (rng.integers(0, 60, size=(count, 28, 28)) + 19 * labels[:, None, None]).astype(np.uint8)
        write_split(data, images, labels, prefix, compress=False)
    report = tmp_path / "report.md"

    results = semantic.main([
        "--fashion_mnist_dir", str(data), "--dataset_name", "none", "--num_train_images", "300",
        "--num_probe_images", "40", "--teacher_steps", "2", "--teacher_batch_size", "16", "--teacher_layers", "1",
        "--teacher_width", "32", "--teacher_embed_dim", "16", "--cases", "nearest", "--max_train_steps", "2",
        "--train_batch_size", "8", "--output_dir", str(tmp_path / "out"), "--report", str(report), "--num_threads", "1",
    ])  # fmt: skip

    measures = results["tokenizers"]["nearest"]
    assert 0 <= measures["linear_probe_accuracy"] <= 1 and measures["psnr"] > 0
    text = report.read_text()
    assert "nearest" in text and "semantic.py" in text
    assert (tmp_path / "out" / "results.json").is_file()
