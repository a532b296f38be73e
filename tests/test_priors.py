"""Priors over cdb-vq tokens: vocabulary layout, tokenised data sets, training, sampling (CPU, tiny models)."""

import importlib.util
import io
import json
import os
import math
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from unittest import mock

import datasets
import pytest
import torch
from conftest import SEVERAL_PROCESSES, tiny_model
from PIL import Image

from cdb_tokenizer import CDBVQImageProcessor
from cdb_tokenizer.tools.cli import codebook_fingerprint
from cdb_tokenizer.tools.data import sample_photos
from cdb_tokenizer.tools.files import plain_file_mode
from cdb_tokenizer.tools.priors import (
    ImageTokenLogitsProcessor,
    PriorCollator,
    PriorVocabulary,
    build_prior,
    check_tokens_source,
    load_prior,
    load_prior_tokenizer,
    load_tokenizer,
    photo_crops_dataset,
    prior_model_card,
    sample_image_tokens,
    sample_images,
    save_image_grid,
    save_prior,
    save_tokens,
    token_image_size,
    tokenize_dataset,
    validation_bits_per_token,
)

ROOT = Path(__file__).resolve().parents[1]
TINY_PRIOR = {"hidden_size": 32, "num_layers": 2, "num_heads": 2}


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "training" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_model().eval(), CDBVQImageProcessor(size={"height": 32, "width": 32})


@pytest.fixture(scope="module")
def photo_set():
    """Eight real photos with labels 0..3 (two each) as a `datasets` image data set."""
    photos = [photo.resize((48, 48)) for photo in sample_photos("skimage")[:8]]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=4)})
    return datasets.Dataset.from_dict({"image": photos, "label": [i // 2 for i in range(8)]}, features=features)


def token_set(num_rows: int, length: int = 4, labels: list | None = None, seed: int = 0) -> datasets.Dataset:
    """Random code ids in [0, 8), with integer labels when given."""
    rng = random.Random(seed)
    columns = {"image_tokens": [[rng.randrange(8) for _ in range(length)] for _ in range(num_rows)]}
    features = {"image_tokens": datasets.List(datasets.Value("int32"))}
    if labels is not None:
        columns["label"], features["label"] = labels, datasets.Value("int64")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def prior_argv(tokens_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """train_prior.py flags for a tiny prior over `token_set` data (8 codes, no tokenizer); `extra` wins."""
    return [
        "--tokens_dir", str(tokens_dir), "--codebook_size", "8", "--output_dir", str(output_dir),
        "--validation_split", "0.25", "--train_batch_size", "4", "--max_train_steps", "2", "--checkpointing_steps", "1",
        "--validation_steps", "100", "--lr_warmup_steps", "0", "--hidden_size", "32", "--num_layers", "2",
        "--num_heads", "2", "--report_to", "none", *extra,
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------- vocabulary
@pytest.mark.parametrize("num_classes", [0, 5])
def test_vocabulary_round_trip_and_rejects_special_ids(num_classes):
    vocabulary = PriorVocabulary(64, num_classes)
    assert vocabulary.image_token_offset == (3 if num_classes == 0 else 3 + 1 + num_classes)
    assert vocabulary.vocab_size == vocabulary.image_token_offset + 64
    codes = torch.tensor([[0, 5, 63], [17, 1, 2]])
    prior_ids = vocabulary.to_prior_ids(codes)
    assert int(prior_ids.min()) >= vocabulary.image_token_offset
    assert torch.equal(vocabulary.to_image_tokens(prior_ids), codes)

    special = [vocabulary.bos_token_id, vocabulary.eos_token_id, vocabulary.pad_token_id, vocabulary.vocab_size]
    if num_classes:
        special += [vocabulary.null_class_token_id, *vocabulary.class_token_ids(range(num_classes)).tolist()]
    for token in special:
        with pytest.raises(ValueError, match="not image tokens"):
            vocabulary.to_image_tokens(torch.tensor([vocabulary.image_token_offset, token]))
    with pytest.raises(ValueError, match="code ids in"):
        vocabulary.to_prior_ids(torch.tensor([64]))
    assert PriorVocabulary.from_dict(json.loads(json.dumps(vocabulary.to_dict()))) == vocabulary


def test_vocabulary_sequences_and_class_errors():
    vocabulary = PriorVocabulary(16, num_classes=3)
    sequences = vocabulary.build_input_ids(torch.tensor([[4, 5, 6]]), class_labels=[2])
    assert sequences.tolist() == [[0, 4 + 2, 7 + 4, 7 + 5, 7 + 6, 1]]  # BOS, class 2, image tokens, EOS
    assert vocabulary.prompt_ids(2).tolist() == [[0, 3], [0, 3]]  # no labels: the null class
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 3\)"):
        vocabulary.prompt_ids(1, class_labels=[3])
    with pytest.raises(ValueError, match="unconditional"):
        PriorVocabulary(16).prompt_ids(1, class_labels=[0])
    with pytest.raises(ValueError, match="does not match"):
        PriorVocabulary.from_dict({**vocabulary.to_dict(), "image_token_offset": 3})


def test_vocabulary_and_collator_refuse_float_ids_and_labels_rather_than_truncate():
    # A cast to long made code id 1.9 code 1 and label 1.9 class 1, without a word (class_token_ids refused floats).
    vocabulary = PriorVocabulary(10, num_classes=3)
    with pytest.raises(ValueError, match="image tokens must be integers"):
        vocabulary.to_prior_ids([1.7, 2.2])
    with pytest.raises(ValueError, match="image tokens must be integers"):
        vocabulary.build_input_ids(torch.tensor([[1.5, 2.0]]), [0])
    collator = PriorCollator(vocabulary, 2)
    with pytest.raises(ValueError, match="image tokens must be integers"):
        collator([{"image_tokens": [1.9, 2.0], "label": 1}])
    with pytest.raises(ValueError, match="class labels must be integers"):
        collator([{"image_tokens": [1, 2], "label": 1.9}])
    assert collator([{"image_tokens": [1, 2], "label": 1}])["input_ids"].tolist() == [[0, 5, 8, 9, 1]]
    assert vocabulary.to_prior_ids([]).dtype == torch.long


def test_vocabulary_from_dict_names_an_unknown_key():
    values = {**PriorVocabulary(16, num_classes=3).to_dict(), "colour_space": "rgb"}
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['colour_space'\]"):
        PriorVocabulary.from_dict(values)


def test_collator_masks_prompt_and_drops_labels():
    vocabulary = PriorVocabulary(16, num_classes=3)
    examples = [{"image_tokens": [1, 2, 3, 4], "label": 1}, {"image_tokens": [5, 6, 7, 8], "label": 2}]
    batch = PriorCollator(vocabulary, 4)(examples)
    assert batch["input_ids"][:, 1].tolist() == vocabulary.class_token_ids([1, 2]).tolist()
    assert (batch["labels"][:, :2] == -100).all() and torch.equal(batch["labels"][:, 2:], batch["input_ids"][:, 2:])
    dropped = PriorCollator(vocabulary, 4, label_dropout=1.0)(examples)
    assert (dropped["input_ids"][:, 1] == vocabulary.null_class_token_id).all()
    with pytest.raises(ValueError, match="every example must have 4 image tokens"):
        PriorCollator(vocabulary, 4)([{"image_tokens": [1, 2, 3], "label": 0}])
    with pytest.raises(ValueError, match="needs a `label`"):
        PriorCollator(vocabulary, 4)([{"image_tokens": [1, 2, 3, 4]}])


# ---------------------------------------------------------------------------------------------------- tokenising
def test_tokenize_dataset_matches_get_image_tokens(tokenizer, photo_set, tmp_path):
    model, processor = tokenizer
    cache = tmp_path / "tokens.arrow"
    tokenized = tokenize_dataset(photo_set, model, processor, batch_size=3, cache_file_name=str(cache))
    assert tokenized.column_names == ["image_tokens", "source_index", "label"]
    assert tokenized["source_index"] == list(range(len(photo_set)))
    assert tokenized.features["label"] == photo_set.features["label"]  # the ClassLabel survives
    assert tokenized["label"] == photo_set["label"]
    expected = model.get_image_tokens(processor(list(photo_set["image"]), return_tensors="pt").pixel_values)
    assert torch.equal(torch.tensor(tokenized["image_tokens"]), expected)  # raster order, 8x8 grid
    assert cache.is_file()
    again = tokenize_dataset(photo_set, model, processor, batch_size=3, cache_file_name=str(cache))
    assert again["image_tokens"] == tokenized["image_tokens"]


def test_tokenize_dataset_clear_errors(tokenizer, photo_set):
    model, processor = tokenizer
    with pytest.raises(ValueError, match="image column 'pixels' not found"):
        tokenize_dataset(photo_set, model, processor, image_column="pixels")
    with pytest.raises(ValueError, match="label column 'class' not found"):
        tokenize_dataset(photo_set, model, processor, label_column="class")
    named = datasets.Dataset.from_dict({"image": photo_set["image"][:2], "label": ["cat", "dog"]})
    with pytest.raises(ValueError, match="must hold integer class labels"):
        tokenize_dataset(named, model, processor)
    with pytest.raises(TypeError, match="pick a split"):
        tokenize_dataset(datasets.DatasetDict({"train": photo_set}), model, processor)


def test_tokenize_dataset_skips_unreadable_images(tokenizer, photo_set):
    model, processor = tokenizer
    buffer = io.BytesIO()
    photo_set[0]["image"].save(buffer, format="PNG")
    # The rows close up over the skipped one: `source_index` says which image each came from.
    values = [{"bytes": b"not an image", "path": None}, {"bytes": buffer.getvalue(), "path": None}]
    undecoded = datasets.Dataset.from_dict(
        {"image": values}, features=datasets.Features({"image": datasets.Image(decode=False)})
    )
    tokenized = tokenize_dataset(undecoded, model, processor, batch_size=1)
    assert len(tokenized) == 1 and tokenized.column_names == ["image_tokens", "source_index"]
    assert tokenized["source_index"] == [1]
    assert tokenized[0]["image_tokens"] == tokenize_dataset(photo_set.select([0]), model, processor)[0]["image_tokens"]


def test_tokenize_dataset_takes_a_pixel_budget(tokenizer, photo_set):
    model, processor = tokenizer
    buffer = io.BytesIO()
    photo_set[0]["image"].save(buffer, format="PNG")  # 48 x 48 = 2,304 pixels
    undecoded = datasets.Dataset.from_dict(
        {"image": [{"bytes": buffer.getvalue(), "path": None}]}, features=datasets.Features({"image": datasets.Image(decode=False)})
    )
    assert len(tokenize_dataset(undecoded, model, processor, max_pixels=2304)) == 1
    with pytest.raises(ValueError, match="none of the 1 images"):
        tokenize_dataset(undecoded, model, processor, max_pixels=2303)


def test_cli_tokenize_uses_max_image_pixels_throughout(tokenizer, photo_set, tmp_path, monkeypatch, capsys):
    """Images the flag allows are tokenised even when decode_image's default budget would refuse them."""
    from cdb_tokenizer.tools import data
    from cdb_tokenizer.tools.cli import main

    model, processor = tokenizer
    model.save_pretrained(tmp_path / "tokenizer")
    processor.save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "images" / "a").mkdir(parents=True)
    for index in range(3):
        photo_set[index]["image"].save(tmp_path / "images" / "a" / f"{index}.png")
    (tmp_path / "images" / "a" / "broken.png").write_bytes(b"not an image")
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 1000)  # stands in for the 64 MP default, below these photos
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # cli.main sets PIL's limit: restore it
    argv = ["tokenize", "--model", str(tmp_path / "tokenizer"), "--data", str(tmp_path / "images"),
            "--out", str(tmp_path / "tokens"), "--max_image_pixels", "3000"]  # fmt: skip
    assert main(argv) == 0
    assert "tokenized 3 images (1 unreadable skipped)" in capsys.readouterr().out
    assert len(datasets.load_from_disk(str(tmp_path / "tokens"))) == 3
    info = json.loads((tmp_path / "tokens" / "cdb_vq_tokens.json").read_text())
    assert info["codebook_size"] == model.config.codebook_size and len(info["codebook_fingerprint"]) == 16
    # Tokenised in bfloat16, the data still record the saved (float32) codebook, which train_prior.py loads.
    assert main(argv[:-4] + ["--out", str(tmp_path / "tokens_bf16"), "--max_image_pixels", "3000", "--dtype", "bfloat16"]) == 0
    loaded, _ = load_tokenizer(str(tmp_path / "tokenizer"))
    check_tokens_source(tmp_path / "tokens_bf16", loaded)  # raises when the fingerprint is of the cast codes


def test_save_tokens_never_writes_through_a_link(tokenizer, photo_set, tmp_path):
    model, processor = tokenizer
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("untouched")
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / "cdb_vq_tokens.json").symlink_to(elsewhere)
    with pytest.raises(FileExistsError, match="not a regular file"):
        save_tokens(tokenize_dataset(photo_set, model, processor), tmp_path / "tokens", model)
    assert elsewhere.read_text() == "untouched"


def test_save_tokens_removes_the_old_record_before_writing_new_ids(tokenizer, tmp_path, monkeypatch):
    rows = token_set(4)
    save_tokens(rows, tmp_path / "tokens", tokenizer[0])
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", lambda *args, **kwargs: pytest.fail("crashed while saving"))
    with pytest.raises(pytest.fail.Exception):
        save_tokens(rows, tmp_path / "tokens", tiny_model(codebook_size=32))
    assert not (tmp_path / "tokens" / "cdb_vq_tokens.json").exists()  # no record of the old tokenizer is left


def test_train_prior_refuses_tokens_of_another_tokenizer(tokenizer, photo_set, tmp_path, fresh_accelerator_state):
    model, processor = tokenizer
    save_tokens(tokenize_dataset(photo_set, model, processor), tmp_path / "tokens", model)
    other = tiny_model(seed=1).eval()  # the same codebook size, other codes
    other.save_pretrained(tmp_path / "other")
    processor.save_pretrained(tmp_path / "other")
    train_prior = load_script("train_prior")
    argv = ["--tokens_dir", str(tmp_path / "tokens"), "--tokenizer", str(tmp_path / "other"), "--output_dir",
            str(tmp_path / "prior"), "--max_train_steps", "1", "--report_to", "none", "--hidden_size", "32",
            "--num_layers", "2", "--num_heads", "2"]  # fmt: skip
    with pytest.raises(ValueError, match="tokenised by another tokenizer"):
        train_prior.main(train_prior.parse_args(argv))


def test_cli_tokenize_records_the_grid_and_train_prior_decodes_on_it(
    tokenizer, photo_set, tmp_path, capsys, fresh_accelerator_state
):
    # 64 x 16 images make a 16 x 4 grid: 64 tokens, as many as the 32 x 32 processor's 8 x 8, so the prior recorded
    # [32, 32] and decoded every sample in the wrong raster layout.
    from cdb_tokenizer.tools.cli import main

    model, processor = tokenizer
    for name, size in (("tall", {"height": 64, "width": 16}), ("tokenizer", {"height": 32, "width": 32})):
        model.save_pretrained(tmp_path / name)
        CDBVQImageProcessor(size=size).save_pretrained(tmp_path / name)
    (tmp_path / "images" / "a").mkdir(parents=True)
    for index in range(8):
        photo_set[index]["image"].save(tmp_path / "images" / "a" / f"{index}.png")
    argv = ["tokenize", "--model", str(tmp_path / "tall"), "--data", str(tmp_path / "images"), "--out"]
    assert main([*argv, str(tmp_path / "tokens")]) == 0
    info = json.loads((tmp_path / "tokens" / "cdb_vq_tokens.json").read_text())
    assert (info["image_size"], info["grid_height"], info["grid_width"]) == ([64, 16], 16, 4)

    train_prior = load_script("train_prior")
    flags = ["--tokenizer", str(tmp_path / "tokenizer"), "--max_train_steps", "1", "--num_validation_images", "2"]
    train_prior.main(train_prior.parse_args(prior_argv(tmp_path / "tokens", tmp_path / "prior", *flags)))
    assert json.loads((tmp_path / "prior" / "prior_config.json").read_text())["image_size"] == [64, 16]
    assert Image.open(tmp_path / "prior" / "samples" / "step-000001.png").size == (2 * 18 + 2, 66 + 2)
    assert Image.open(run_sample_prior(tmp_path / "prior")).size == (16, 64)  # one image, no padding

    # A processor that does not make images of its size (neither resizing nor cropping) records no wrong grid.
    CDBVQImageProcessor(size={"height": 32, "width": 32}, do_resize=False, do_center_crop=False).save_pretrained(
        tmp_path / "tall"
    )
    assert main([*argv, str(tmp_path / "uncropped")]) == 1
    # In the CLI's words, not the Python API's ("give the image_size the processor made the images at").
    error = capsys.readouterr().err
    assert "its image processor does not resize or crop to its size (32x32), and the images came out at another (144 tokens each)" in error
    assert "do_resize and do_center_crop in preprocessor_config.json" in error


def test_save_tokens_records_only_a_grid_that_holds_the_tokens(tokenizer, tmp_path):
    model = tokenizer[0]  # downsampling factor 4
    save_tokens(token_set(4, length=16), tmp_path / "tokens", model, image_size=(32, 8))
    info = json.loads((tmp_path / "tokens" / "cdb_vq_tokens.json").read_text())
    assert (info["image_size"], info["grid_height"], info["grid_width"]) == ([32, 8], 8, 2)
    with pytest.raises(ValueError, match="32x32 images have a 8x8 token grid, but the sequences hold 16 tokens"):
        save_tokens(token_set(4, length=16), tmp_path / "wrong", model, image_size=(32, 32))
    assert not (tmp_path / "wrong").exists()  # refused before anything is written


@pytest.mark.parametrize(
    "grid, message",
    [
        ({"image_size": [32, 8], "grid_height": 8}, r"\(grid_width missing beside image_size, grid_height\)"),
        ({"image_size": [32], "grid_height": 8, "grid_width": 2}, r"\(image_size \[32\], not \[height, width\]"),
        ({"image_size": [32, 8], "grid_height": 0, "grid_width": 2}, r"damaged \(grid_height 0\)"),
        ({"image_size": [32, 8], "grid_height": 8, "grid_width": "2"}, r"damaged \(grid_width '2'\)"),
        ({"image_size": [32, 8], "grid_height": 4, "grid_width": 2}, "records a 4x2 token grid .*hold 16 tokens"),
    ],
)
def test_train_prior_validates_the_recorded_grid(grid, message, tmp_path, fresh_accelerator_state):
    model = tiny_model(codebook_size=8)
    save_tokens(token_set(16, length=16), tmp_path / "tokens", model)
    info_file = tmp_path / "tokens" / "cdb_vq_tokens.json"
    info_file.write_text(json.dumps({**json.loads(info_file.read_text()), **grid}))
    train_prior = load_script("train_prior")
    with pytest.raises(ValueError, match=message):
        train_prior.main(train_prior.parse_args(prior_argv(tmp_path / "tokens", tmp_path / "prior")))
    assert not (tmp_path / "prior" / "checkpoints").exists()


def test_train_prior_records_the_image_size_its_tokens_record(tmp_path, fresh_accelerator_state):
    # Without --tokenizer no size was recorded at all; with the token folder's, sample_prior.py decodes on its grid.
    save_tokens(token_set(16, length=16), tmp_path / "tokens", tiny_model(codebook_size=8), image_size=(32, 8))
    train_prior = load_script("train_prior")
    train_prior.main(train_prior.parse_args(prior_argv(tmp_path / "tokens", tmp_path / "prior")))
    assert json.loads((tmp_path / "prior" / "prior_config.json").read_text())["image_size"] == [32, 8]


def test_train_prior_refuses_a_tokenizer_of_another_grid(tokenizer, tmp_path, fresh_accelerator_state):
    model, processor = tokenizer
    model.save_pretrained(tmp_path / "tokenizer")
    processor.save_pretrained(tmp_path / "tokenizer")
    save_tokens(token_set(16, length=64), tmp_path / "tokens", model, image_size=(64, 16))
    info_file = tmp_path / "tokens" / "cdb_vq_tokens.json"
    # Its codebook, but another grid: as if made by a tokenizer of another downsampling factor.
    info_file.write_text(json.dumps({**json.loads(info_file.read_text()), "grid_height": 8, "grid_width": 8}))
    train_prior = load_script("train_prior")
    argv = prior_argv(tmp_path / "tokens", tmp_path / "prior", "--tokenizer", str(tmp_path / "tokenizer"))
    with pytest.raises(ValueError, match=r"records 64x16 images on a 8x8 token grid \(cdb_vq_tokens.json\), but "
                                         "the tokenizer given makes a 16x4 grid at that size"):  # fmt: skip
        train_prior.main(train_prior.parse_args(argv))
    assert not (tmp_path / "prior" / "checkpoints").exists()


def test_token_folders_that_record_no_grid_keep_the_square_fallback(
    tokenizer, tmp_path, caplog, fresh_accelerator_state
):
    # Written before the grid was recorded (or without image_size): 16 tokens with a 32-pixel tokenizer still decode
    # at 16 x 16.
    model, processor = tokenizer
    model.save_pretrained(tmp_path / "tokenizer")
    processor.save_pretrained(tmp_path / "tokenizer")
    with caplog.at_level("WARNING"):
        save_tokens(token_set(16, length=16), tmp_path / "tokens", model)
    assert "no image_size given, so no token grid is recorded" in caplog.text
    assert "image_size" not in json.loads((tmp_path / "tokens" / "cdb_vq_tokens.json").read_text())
    train_prior = load_script("train_prior")
    flags = ["--tokenizer", str(tmp_path / "tokenizer"), "--max_train_steps", "1", "--num_validation_images", "1"]
    argv = prior_argv(tmp_path / "tokens", tmp_path / "prior", *flags)
    train_prior.main(train_prior.parse_args(argv))
    assert json.loads((tmp_path / "prior" / "prior_config.json").read_text())["image_size"] == [16, 16]


def test_photo_crops_dataset_labels_each_photo():
    crops = photo_crops_dataset(num_crops_per_photo=2, seed=0)
    assert len(crops) == 32 and crops.features["label"].num_classes == 16
    assert crops["label"] == [i // 2 for i in range(32)]
    assert all(image.width == image.height for image in crops["image"])
    other = photo_crops_dataset(num_crops_per_photo=2, seed=1)
    assert [image.size for image in other["image"]] != [image.size for image in crops["image"]]


# ---------------------------------------------------------------------------------------------------- training
def test_prior_loss_falls_on_repeated_data():
    torch.manual_seed(0)
    vocabulary = PriorVocabulary(64)
    sequences = [{"image_tokens": torch.randint(0, 64, (16,)).tolist()} for _ in range(4)]
    batch = PriorCollator(vocabulary, 16)(sequences)
    prior = build_prior(vocabulary, 16, architecture="gpt2", hidden_size=64, num_layers=2, num_heads=2)
    start = validation_bits_per_token(prior, [batch], vocabulary)["bits_per_token"]
    assert start > 0.8 * math.log2(64)  # an untrained prior is about uniform
    optimizer = torch.optim.AdamW(prior.parameters(), lr=1e-2)
    for _ in range(30):
        loss = prior(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    end = validation_bits_per_token(prior, [batch], vocabulary)["bits_per_token"]
    assert end < 0.25 * start, (start, end)


def test_train_tokenize_sample_decode_end_to_end(tokenizer, photo_set, tmp_path, fresh_accelerator_state):
    model, processor = tokenizer
    model.save_pretrained(tmp_path / "tokenizer")
    processor.save_pretrained(tmp_path / "tokenizer")
    save_tokens(tokenize_dataset(photo_set, model, processor), tmp_path / "tokens", model)  # records its codebook

    train_prior = load_script("train_prior")
    argv = [
        "--tokens_dir", str(tmp_path / "tokens"), "--tokenizer", str(tmp_path / "tokenizer"),
        "--output_dir", str(tmp_path / "prior"), "--validation_split", "0.25", "--train_batch_size", "3",
        "--hidden_size", "32", "--num_layers", "2", "--num_heads", "2", "--max_train_steps", "2",
        "--checkpointing_steps", "2", "--validation_steps", "2", "--num_validation_images", "2",
        "--report_to", "none",
    ]  # fmt: skip
    metrics = train_prior.main(train_prior.parse_args(argv))
    assert metrics["step"] == 2 and math.isfinite(metrics["bits_per_token"])
    assert (tmp_path / "prior" / "checkpoints" / "checkpoint-2").is_dir() and (
        tmp_path / "prior" / "samples" / "step-000002.png"
    ).is_file()
    resumed = train_prior.main(
        train_prior.parse_args(argv + ["--max_train_steps", "3", "--resume_from_checkpoint", "latest"])
    )
    assert resumed["step"] == 3
    # The model card: the Hub's metadata, this run's numbers and last grid, the tokenizer as recorded, no local path.
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "prior" / "README.md")
    assert card.data.library_name == "transformers" and "cdb-vq" in card.data.tags
    assert "for 3 steps on the tokens of `tokens`" in card.text
    assert f"**{resumed['bits_per_token']:.3f} bits per token**" in card.text
    assert "![samples drawn at the last validation](samples/step-000003.png)" in card.text
    assert (tmp_path / "prior" / "samples" / "step-000003.png").is_file()
    assert "the local folder `../tokenizer`" in card.text and "Class-conditional over 4 classes" in card.text
    assert str(tmp_path) not in card.content

    prior, vocabulary, prior_config = load_prior(tmp_path / "prior")
    assert vocabulary.num_classes == 4 and prior_config["num_image_tokens"] == 64
    assert prior_config["tokenizer"] == str(tmp_path / "tokenizer")
    assert prior_config["codebook_fingerprint"] == codebook_fingerprint(model)  # what sample_prior.py checks
    tokens = sample_image_tokens(prior, vocabulary, 3, class_labels=[0, 1, 3], seed=0)
    assert tokens.shape == (3, 64) and 0 <= int(tokens.min()) and int(tokens.max()) < model.config.codebook_size
    images = sample_images(prior, model, vocabulary, 3, class_labels=[0, 1, 3], seed=0, top_k=20, top_p=0.9)
    assert images.shape == (3, 3, 32, 32) and torch.isfinite(images).all()

    sample_prior = load_script("sample_prior")
    grid = sample_prior.main(sample_prior.parse_args(["--prior", str(tmp_path / "prior"), "--class_labels", "0", "2",
                                                      "--num_images", "3", "--guidance_scale", "2"]))  # fmt: skip
    assert Image.open(grid).size == (3 * 34 + 2, 2 * 34 + 2)  # 3 per row, 2 rows of 32 px with 2 px padding


def test_a_prior_checkpoints_its_last_step_and_resumes_only_on_its_own_codebook(
    tmp_path, fresh_accelerator_state, caplog
):
    # A run shorter than --checkpointing_steps left no checkpoint (it could not be extended); resuming on the tokens
    # of another tokenizer with as many codes went on with other codes under the same ids, without a word.
    save_tokens(token_set(16), tmp_path / "tokens", tiny_model(codebook_size=8), image_size=(8, 8))
    save_tokens(token_set(16), tmp_path / "other", tiny_model(seed=1, codebook_size=8), image_size=(8, 8))
    train_prior = load_script("train_prior")
    argv = prior_argv(tmp_path / "tokens", tmp_path / "prior", "--checkpointing_steps", "100", "--max_train_steps", "3")
    with caplog.at_level("WARNING"):
        train_prior.main(train_prior.parse_args(argv + ["--lr_warmup_steps", "5"]))
    assert "--lr_warmup_steps 5 is not below the run's 3 steps" in caplog.text  # as train.py says it
    assert [path.name for path in (tmp_path / "prior" / "checkpoints").iterdir()] == ["checkpoint-3"]
    weights = (tmp_path / "prior" / "model.safetensors").read_bytes()
    longer = argv + ["--max_train_steps", "4", "--resume_from_checkpoint", "latest"]
    other = [str(tmp_path / "other") if arg == str(tmp_path / "tokens") else arg for arg in longer]
    with pytest.raises(ValueError, match="trained on the tokens of another codebook"):
        train_prior.main(train_prior.parse_args(other))
    # Named into another run's folder with --overwrite_output_dir: refused before that run is deleted for it.
    shutil.copytree(tmp_path / "prior", tmp_path / "kept")
    into_kept = [str(tmp_path / "kept") if arg == str(tmp_path / "prior") else arg for arg in other[:-1]]
    with pytest.raises(ValueError, match="trained on the tokens of another codebook"):
        train_prior.main(train_prior.parse_args(
            into_kept + [str(tmp_path / "prior" / "checkpoints" / "checkpoint-3"), "--overwrite_output_dir"]
        ))  # fmt: skip
    assert (tmp_path / "kept" / "model.safetensors").read_bytes() == weights
    train_prior.main(train_prior.parse_args(argv + ["--resume_from_checkpoint", "latest"]))  # finished: nothing to train
    assert (tmp_path / "prior" / "model.safetensors").read_bytes() == weights
    assert train_prior.main(train_prior.parse_args(longer))["step"] == 4


def test_resuming_on_tokens_of_another_grid_or_length_is_refused(tmp_path, fresh_accelerator_state):
    # The same codebook passed the check, and a llama prior (no position weights) went on with other raster positions.
    model = tiny_model(codebook_size=8)
    save_tokens(token_set(16), tmp_path / "tokens", model, image_size=(8, 8))  # 2x2 grid
    save_tokens(token_set(16), tmp_path / "tall", model, image_size=(16, 4))  # 4x1: as many tokens
    save_tokens(token_set(16, length=16), tmp_path / "long", model, image_size=(16, 16))
    train_prior = load_script("train_prior")
    train_prior.main(train_prior.parse_args(prior_argv(tmp_path / "tokens", tmp_path / "prior")))
    longer = ["--max_train_steps", "3", "--resume_from_checkpoint", "latest"]
    for other, message in (("tall", r"image_size \[8, 8\], this run's have \[16, 4\]"),
                           ("long", "num_image_tokens 4, this run's have 16")):  # fmt: skip
        with pytest.raises(ValueError, match=f"checkpoint-2: it was trained on tokens of {message}"):
            train_prior.main(train_prior.parse_args(prior_argv(tmp_path / other, tmp_path / "prior", *longer)))
    metrics = train_prior.main(train_prior.parse_args(prior_argv(tmp_path / "tokens", tmp_path / "prior", *longer)))
    assert metrics["step"] == 3  # its own tokens resume as before


def test_the_prior_logs_the_learning_rate_each_step_trained_at(tmp_path, fresh_accelerator_state):
    # The log showed the rate after the schedule's step: the next step's (a warm-up's first step trains at 0).
    token_set(16).save_to_disk(tmp_path / "tokens")
    train_prior = load_script("train_prior")
    flags = ["--max_train_steps", "3", "--lr_scheduler", "linear", "--lr_warmup_steps", "2", "--learning_rate", "1e-3",
             "--gradient_accumulation_steps", "2"]  # fmt: skip
    train_prior.main(train_prior.parse_args(prior_argv(tmp_path / "tokens", tmp_path / "prior", *flags)))
    lines = (tmp_path / "prior" / "logs" / "train_log.jsonl").read_text().splitlines()
    rates = [row["train/learning_rate"] for row in map(json.loads, lines) if "train/learning_rate" in row]
    assert rates == pytest.approx([0.0, 5e-4, 1e-3])


def test_train_prior_needs_data_or_tokenizer():
    train_prior = load_script("train_prior")
    with pytest.raises(SystemExit):
        train_prior.parse_args(["--output_dir", "x"])


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_train_prior_refuses_a_checkpoints_total_limit_below_one(limit, capsys):
    train_prior = load_script("train_prior")
    with pytest.raises(SystemExit):
        train_prior.parse_args(prior_argv(Path("tokens"), Path("prior"), "--checkpoints_total_limit", limit))
    assert f"--checkpoints_total_limit must be at least 1, got {limit}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [(["--validation_guidance_scale", "nan"], "--validation_guidance_scale must be a finite number, got nan"),
     (["--validation_guidance_scale", "inf"], "--validation_guidance_scale must be a finite number, got inf"),
     (["--num_validation_images", "-1"], "--num_validation_images must be at least 0 (0: no samples), got -1")],
)  # fmt: skip
def test_train_prior_refuses_validation_flags_up_front(flags, message, capsys):
    # A NaN guidance scale failed at the first validation sample, after training to it.
    train_prior = load_script("train_prior")
    with pytest.raises(SystemExit):
        train_prior.parse_args(prior_argv(Path("tokens"), Path("prior"), *flags))
    assert message in capsys.readouterr().err


def test_a_train_split_named_validation_is_not_validated_on_itself(tmp_path):
    datasets.DatasetDict(train=token_set(8), validation=token_set(8, seed=1)).save_to_disk(tmp_path / "tokens")
    train_prior = load_script("train_prior")
    args = train_prior.parse_args(prior_argv(tmp_path / "tokens", tmp_path / "prior", "--train_split", "validation"))
    train, validation = train_prior.load_token_splits(args, None, None)
    assert (len(train), len(validation)) == (6, 2)  # --validation_split of the training split, not the split again
    assert not set(map(tuple, train["image_tokens"])) & set(map(tuple, validation["image_tokens"]))


def test_validation_labels_of_other_class_names_are_refused():
    train_prior = load_script("train_prior")
    args = train_prior.parse_args(prior_argv(Path("tokens"), Path("prior")))
    labelled = lambda names: token_set(4, labels=[0, 1, 0, 1]).cast_column("label", datasets.ClassLabel(names=names))
    with pytest.raises(ValueError, match=r"the validation split's classes \(dog, cat\) are not the training split's"):
        train_prior.make_vocabulary(args, labelled(["cat", "dog"]), labelled(["dog", "cat"]), 8)
    assert train_prior.make_vocabulary(args, labelled(["cat", "dog"]), labelled(["cat", "dog"]), 8).num_classes == 2


def test_make_vocabulary_reads_integer_labels_of_both_splits():
    """Plain integer labels (no ClassLabel): the classes run to the largest label of either split."""
    train_prior = load_script("train_prior")
    args = train_prior.parse_args(prior_argv(Path("tokens"), Path("prior")))
    vocabulary = train_prior.make_vocabulary(args, token_set(8, labels=[0, 1] * 4), token_set(4, labels=[0, 4, 1, 2]), 8)
    assert vocabulary.num_classes == 5


INTEGER_LABELS = [i % 3 for i in range(32)]


@pytest.mark.parametrize(
    "validation, extra, message",
    [
        (token_set(8, length=16, labels=[0] * 8), [], "the validation split has sequences of 16 to 16 image tokens, not 4"),
        (token_set(8, labels=[-1] * 8), [], r"the validation split has label -1 \(-1: unlabelled\)"),
        (token_set(8), [], "the validation split has no label column"),
        (token_set(8, labels=[0, 3] * 4), ["--num_classes", "3"], "the validation split has label 3, but the prior has 3 classes"),
        (token_set(8, labels=[0] * 8), ["--num_classes", "2"], "the training split has label 2, but the prior has 2 classes"),
    ],
)
def test_train_prior_checks_both_splits_before_training(validation, extra, message, tmp_path, fresh_accelerator_state):
    datasets.DatasetDict(train=token_set(32, labels=INTEGER_LABELS), validation=validation).save_to_disk(tmp_path / "tokens")
    train_prior = load_script("train_prior")
    with pytest.raises(ValueError, match=message):
        train_prior.main(train_prior.parse_args(prior_argv(tmp_path / "tokens", tmp_path / "prior", *extra)))
    assert not (tmp_path / "prior" / "checkpoints").exists()  # refused up front, not after training


@pytest.mark.parametrize(
    "column, message",
    [
        ([[1.5, 2.0, 3.0, 4.0]] * 16, "image_tokens column holds list<item: double>, not lists of integer code ids"),
        ([[[1, 2], [3, 4]]] * 16, "image_tokens column holds list<item: list<item: int64>>, not lists of integer"),
        (["1234"] * 16, "image_tokens column holds string, not lists of integer code ids"),
        ([[1, 2, None, 4]] * 16, "the training split has 12 null image tokens"),
        ([[1, 2, 3, 4]] * 15 + [None], r"the training split has 1 row\(s\) whose image_tokens are null"),
        ([[]] * 16, "the training split has empty token sequences"),
    ],
)
def test_train_prior_refuses_token_columns_it_cannot_train_on(column, message, tmp_path, fresh_accelerator_state):
    features = datasets.Features({"image_tokens": datasets.List(datasets.Value("int32"))}) if column[0] == [] else None
    datasets.Dataset.from_dict({"image_tokens": column}, features=features).save_to_disk(tmp_path / "tokens")
    train_prior = load_script("train_prior")
    with pytest.raises(ValueError, match=message):
        train_prior.main(train_prior.parse_args(prior_argv(tmp_path / "tokens", tmp_path / "prior")))


def test_a_token_folder_with_an_empty_split_is_one_clear_error(tmp_path, fresh_accelerator_state):
    # datasets.load_from_disk raised a bare IndexError for a DatasetDict split saved with no rows.
    features = datasets.Features({"image_tokens": datasets.List(datasets.Value("int32"))})
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image_tokens": [[1, 2, 3, 4]] * 8}, features=features),
        "validation": datasets.Dataset.from_dict({"image_tokens": []}, features=features),
    }).save_to_disk(tmp_path / "tokens")  # fmt: skip
    train_prior = load_script("train_prior")
    with pytest.raises(ValueError, match="holds a split with no rows"):
        train_prior.main(train_prior.parse_args(prior_argv(tmp_path / "tokens", tmp_path / "prior")))


@pytest.mark.parametrize("damage", ["cut arrow", "state.json"])
def test_a_damaged_token_folder_is_named(damage, tmp_path, fresh_accelerator_state):
    # A cut Arrow file or a broken state.json gave datasets' message alone ("Expected to be able to read 17160
    # bytes ...", "Expecting property name ..."), naming neither the folder nor what was wrong with it.
    token_set(64, length=64).save_to_disk(tmp_path / "tokens")
    if damage == "cut arrow":
        arrow = next((tmp_path / "tokens").glob("*.arrow"))
        arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    else:
        (tmp_path / "tokens" / "state.json").write_text("{bad")
    train_prior = load_script("train_prior")
    with pytest.raises(ValueError, match=r"--tokens_dir .*tokens is damaged \(\w+: .*\): tokenise again"):
        train_prior.main(train_prior.parse_args(prior_argv(tmp_path / "tokens", tmp_path / "prior")))


def test_an_unreadable_token_folder_is_not_called_damaged(tmp_path, monkeypatch, fresh_accelerator_state):
    # A permission error is no damage: "tokenise again" would not help.
    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "tokens" / "state.json"))

    token_set(16).save_to_disk(tmp_path / "tokens")
    monkeypatch.setattr(datasets, "load_from_disk", refused)
    train_prior = load_script("train_prior")
    with pytest.raises(PermissionError, match="Permission denied"):
        train_prior.main(train_prior.parse_args(prior_argv(tmp_path / "tokens", tmp_path / "prior")))


def test_token_image_size_falls_back_to_the_square_grid(tokenizer):
    model = tokenizer[0]  # 32 x 32 pixels, 8 x 8 tokens, downsampling factor 4
    assert token_image_size(model, 64) == (32, 32) and token_image_size(model, 64, (32, 32)) == (32, 32)
    assert token_image_size(model, 16, (32, 32)) == (16, 16)
    with pytest.raises(ValueError, match="12 tokens per image fit neither the 32x32 images"):
        token_image_size(model, 12)


def test_train_prior_samples_tokens_made_at_another_size(tokenizer, tmp_path, fresh_accelerator_state):
    """Tokens of 16 x 16 images (4 x 4 grid) with a 32-pixel tokenizer: samples decode at 16 x 16; a count that is no
    square grid is refused before training."""
    model, processor = tokenizer
    model.save_pretrained(tmp_path / "tokenizer")
    processor.save_pretrained(tmp_path / "tokenizer")
    token_set(16, length=16).save_to_disk(tmp_path / "tokens16")
    train_prior = load_script("train_prior")
    flags = ["--tokenizer", str(tmp_path / "tokenizer"), "--max_train_steps", "1", "--num_validation_images", "2"]
    train_prior.main(train_prior.parse_args(prior_argv(tmp_path / "tokens16", tmp_path / "prior", *flags)))
    assert Image.open(tmp_path / "prior" / "samples" / "step-000001.png").size == (2 * 18 + 2, 18 + 2)
    assert json.loads((tmp_path / "prior" / "prior_config.json").read_text())["image_size"] == [16, 16]

    token_set(16, length=12).save_to_disk(tmp_path / "tokens12")
    with pytest.raises(ValueError, match="12 tokens per image fit neither"):
        train_prior.main(train_prior.parse_args(prior_argv(tmp_path / "tokens12", tmp_path / "prior12", *flags)))
    assert not (tmp_path / "prior12" / "checkpoints").exists()


def test_resuming_a_finished_run_trains_nothing(tmp_path, fresh_accelerator_state):
    token_set(32).save_to_disk(tmp_path / "tokens")
    train_prior = load_script("train_prior")
    argv = prior_argv(tmp_path / "tokens", tmp_path / "prior", "--resume_from_checkpoint", "latest")
    assert train_prior.main(train_prior.parse_args(argv))["step"] == 2
    saved = (tmp_path / "prior" / "model.safetensors").read_bytes()
    assert train_prior.main(train_prior.parse_args(argv))["step"] == 2
    assert not (tmp_path / "prior" / "checkpoints" / "checkpoint-3").exists()
    assert (tmp_path / "prior" / "model.safetensors").read_bytes() == saved  # left as it was

    # Killed after its last checkpoint, before saving the prior: resuming saves it, still without training.
    (tmp_path / "prior" / "metrics.json").unlink()
    (tmp_path / "prior" / "model.safetensors").unlink()
    assert train_prior.main(train_prior.parse_args(argv))["step"] == 2
    assert (tmp_path / "prior" / "model.safetensors").is_file()
    assert not (tmp_path / "prior" / "checkpoints" / "checkpoint-3").exists()
    # The same with an earlier, shorter run's metrics.json left there: it was taken for this run's, and nothing saved.
    (tmp_path / "prior" / "metrics.json").write_text(json.dumps({"step": 1}))
    (tmp_path / "prior" / "model.safetensors").unlink()
    assert train_prior.main(train_prior.parse_args(argv))["step"] == 2
    assert (tmp_path / "prior" / "model.safetensors").is_file()


def test_train_prior_refuses_another_runs_output_dir(tmp_path, fresh_accelerator_state):
    token_set(32).save_to_disk(tmp_path / "tokens")
    train_prior = load_script("train_prior")
    argv = prior_argv(tmp_path / "tokens", tmp_path / "prior", "--checkpoints_total_limit", "5")
    train_prior.main(train_prior.parse_args(argv))
    with pytest.raises(ValueError, match="holds another run"):
        train_prior.main(train_prior.parse_args(argv))

    (tmp_path / "prior" / "samples").mkdir()
    (tmp_path / "prior" / "samples" / "step-000099.png").write_bytes(b"an old run's grid")
    (tmp_path / "prior" / "samples.png").write_bytes(b"sample_prior.py's output of the old run")
    assert train_prior.main(train_prior.parse_args(argv + ["--overwrite_output_dir", "--max_train_steps", "1"]))["step"] == 1
    checkpoints = tmp_path / "prior" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-1"]  # the old run's checkpoint-2 is gone
    assert not (tmp_path / "prior" / "samples").exists()
    assert not (tmp_path / "prior" / "samples.png").exists()  # it would stop the next sample_prior.py run
    assert "for 1 step on" in (tmp_path / "prior" / "README.md").read_text()  # this run's card, not the old one's

    train_prior.main(train_prior.parse_args(argv + ["--max_train_steps", "3", "--resume_from_checkpoint", "latest"]))
    resumed = argv + ["--max_train_steps", "2", "--resume_from_checkpoint", str(checkpoints / "checkpoint-1")]
    (tmp_path / "prior" / "metrics.json").unlink()  # so that the prior is saved again
    assert train_prior.main(train_prior.parse_args(resumed))["step"] == 2
    names = sorted(p.name for p in checkpoints.iterdir())
    assert names == ["abandoned-checkpoint-2", "abandoned-checkpoint-3", "checkpoint-1", "checkpoint-2"]


def test_a_resumed_prior_run_matches_the_uninterrupted_one(tmp_path, fresh_accelerator_state):
    # Label dropout came from the global random state, which the read-ahead loader had moved past the checkpoint,
    # and the validation loader drew from it too: a resumed run trained on other class tokens.
    from safetensors.torch import load_file

    token_set(40, labels=[i % 2 for i in range(40)]).save_to_disk(tmp_path / "tokens")
    train_prior = load_script("train_prior")

    def run(output_dir, *extra):
        argv = prior_argv(tmp_path / "tokens", output_dir, "--lr_scheduler", "constant", "--label_dropout", "0.5",
                          "--dropout", "0.1", "--validation_steps", "2", "--checkpointing_steps", "2", *extra)  # fmt: skip
        return train_prior.main(train_prior.parse_args(argv))

    run(tmp_path / "straight", "--max_train_steps", "4")
    run(tmp_path / "resumed", "--max_train_steps", "2")
    (tmp_path / "resumed" / "metrics.json").unlink()  # an interrupted run has not finished
    run(tmp_path / "resumed", "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)

    def records(output_dir):
        return [json.loads(line) for line in (output_dir / "logs" / "train_log.jsonl").read_text().splitlines()]

    # The run log (as train.py's) holds every step's loss and each validation, once, the resumed run's as the other's.
    assert [record["step"] for record in records(tmp_path / "straight")] == [1, 2, 2, 3, 4, 4]
    assert records(tmp_path / "resumed") == records(tmp_path / "straight")


def test_a_resumed_prior_run_trains_at_its_own_learning_rate(tmp_path, fresh_accelerator_state):
    token_set(32).save_to_disk(tmp_path / "tokens")
    train_prior = load_script("train_prior")
    argv = prior_argv(tmp_path / "tokens", tmp_path / "prior", "--lr_scheduler", "constant", "--max_train_steps", "2")
    train_prior.main(train_prior.parse_args(argv))
    (tmp_path / "prior" / "metrics.json").unlink()
    train_prior.main(train_prior.parse_args(argv + ["--max_train_steps", "3", "--resume_from_checkpoint", "latest",
                                                    "--learning_rate", "1e-5"]))  # fmt: skip
    scheduler = torch.load(tmp_path / "prior" / "checkpoints" / "checkpoint-3" / "scheduler.bin", weights_only=True)
    assert scheduler["_last_lr"][0] == pytest.approx(1e-5)  # the checkpoint's 3e-4 used to win


def test_train_prior_checks_code_ids_and_the_recorded_codebook_size(tmp_path, fresh_accelerator_state):
    train_prior = load_script("train_prior")
    rows = token_set(16)
    bad = datasets.Dataset.from_dict({"image_tokens": [[0, 1, 2, 9]] * 4}, features=rows.features)
    datasets.DatasetDict({"train": rows, "validation": bad}).save_to_disk(tmp_path / "tokens")
    with pytest.raises(ValueError, match="the validation split has code ids from 0 to 9, outside the 8-code codebook"):
        train_prior.main(train_prior.parse_args(prior_argv(tmp_path / "tokens", tmp_path / "prior")))
    assert not (tmp_path / "prior" / "checkpoints").exists()  # refused before training, not at the first validation

    rows.save_to_disk(tmp_path / "recorded")
    (tmp_path / "recorded" / "cdb_vq_tokens.json").write_text(json.dumps({"codebook_size": 64, "codebook_fingerprint": "x"}))
    with pytest.raises(ValueError, match="--codebook_size 8, but .* holds the ids of a 64-code tokenizer"):
        train_prior.main(train_prior.parse_args(prior_argv(tmp_path / "recorded", tmp_path / "prior2")))


def test_train_prior_stops_when_the_weights_turn_nan_and_keeps_the_last_good_checkpoint(tmp_path, fresh_accelerator_state):
    token_set(32).save_to_disk(tmp_path / "tokens")
    train_prior = load_script("train_prior")
    argv = prior_argv(tmp_path / "tokens", tmp_path / "prior", "--learning_rate", "1e20", "--lr_scheduler", "constant",
                      "--max_train_steps", "4")  # fmt: skip
    with pytest.raises(train_prior.TrainingStopped, match="weights became NaN or infinite at step 2.*checkpoint-1"):
        train_prior.main(train_prior.parse_args(argv))
    assert not (tmp_path / "prior" / "model.safetensors").exists() and not (tmp_path / "prior" / "metrics.json").exists()
    assert sorted(path.name for path in (tmp_path / "prior" / "checkpoints").iterdir()) == ["checkpoint-1"]


def test_train_prior_records_the_codebook_its_tokens_index(tmp_path, fresh_accelerator_state):
    # Without --tokenizer, the fingerprint comes from the tokens' cdb_vq_tokens.json (with one: the tokenizer's).
    model = tiny_model(codebook_size=8)
    save_tokens(token_set(16), tmp_path / "tokens", model)
    train_prior = load_script("train_prior")
    train_prior.main(train_prior.parse_args(prior_argv(tmp_path / "tokens", tmp_path / "prior")))
    recorded = json.loads((tmp_path / "prior" / "prior_config.json").read_text())["codebook_fingerprint"]
    assert recorded == codebook_fingerprint(model)


def test_a_prior_finds_its_local_tokenizer_from_any_working_directory(tokenizer, tmp_path, monkeypatch):
    model, processor = tokenizer
    model.save_pretrained(tmp_path / "work" / "outputs" / "tok")
    processor.save_pretrained(tmp_path / "work" / "outputs" / "tok")
    vocabulary = PriorVocabulary(64)
    monkeypatch.chdir(tmp_path / "work")
    save_prior(build_prior(vocabulary, 64, **TINY_PRIOR), vocabulary, "outputs/prior", 64, tokenizer="outputs/tok")
    recorded = json.loads((tmp_path / "work" / "outputs" / "prior" / "prior_config.json").read_text())["tokenizer"]
    assert recorded == "../tok"  # relative to the prior, no absolute local path in the config
    monkeypatch.chdir(tmp_path)  # "outputs/tok" from here would have been taken for a Hub repo id
    _, _, prior_config = load_prior(tmp_path / "work" / "outputs" / "prior")
    assert Path(prior_config["tokenizer"]) == (tmp_path / "work" / "outputs" / "tok").resolve()
    assert load_tokenizer(prior_config["tokenizer"])[0].config.codebook_size == 64
    # A prior saved before the paths were relative to it kept the path as typed (from the working directory).
    config_file = tmp_path / "work" / "outputs" / "prior" / "prior_config.json"
    old = {key: value for key, value in json.loads(config_file.read_text()).items() if key != "tokenizer_relative_to_prior"}
    config_file.write_text(json.dumps({**old, "tokenizer": "./outputs/tok"}))
    assert load_prior(tmp_path / "work" / "outputs" / "prior")[2]["tokenizer"] == "./outputs/tok"


@pytest.mark.parametrize("tokenizer, expected", [
    ("org/cdb-vq", "Tokenizer: [`org/cdb-vq`](https://huggingface.co/org/cdb-vq)."),
    (None, "Tokenizer: a local folder named `alice_tok`; pass it as `--tokenizer`."),
])  # fmt: skip
def test_an_unconditional_prior_card_names_its_tokenizer_and_samples_without_labels(tokenizer, expected):
    vocabulary = PriorVocabulary(64)
    prior_config = {"vocabulary": vocabulary.to_dict(), "num_image_tokens": 16, "tokenizer": tokenizer,
                    "tokenizer_relative_to_prior": False, "image_size": None, "tokenizer_name": "alice_tok"}  # fmt: skip
    prior = build_prior(vocabulary, 16, **TINY_PRIOR)
    card = prior_model_card(prior, prior_config, {"step": 5, "bits_per_token": 5.5}, "data")
    assert expected in card and "Unconditional." in card and "16 tokens per image," in card
    assert "--class_labels" not in card and "class_labels=" not in card and "![" not in card
    assert f"({prior.num_parameters():,} parameters" in card and "(a uniform guess over the codes: 6.00)" in card


def test_a_tokenizer_far_from_the_prior_is_recorded_by_name_only(tokenizer, tmp_path):
    # From /, a relative path spells out the absolute one ("../../../home/alice/tok"): only the name is recorded.
    import tempfile

    if not os.access("/dev/shm", os.W_OK):
        pytest.skip("needs a writable folder outside /tmp whose common path with tmp_path is /")
    model, processor = tokenizer
    vocabulary = PriorVocabulary(64)
    with tempfile.TemporaryDirectory(dir="/dev/shm") as far:
        model.save_pretrained(Path(far) / "alice_tok")
        save_prior(build_prior(vocabulary, 64, **TINY_PRIOR), vocabulary, tmp_path / "prior", 64, tokenizer=str(Path(far) / "alice_tok"))
    text = (tmp_path / "prior" / "prior_config.json").read_text()
    recorded = json.loads(text)
    assert (recorded["tokenizer"], recorded["tokenizer_name"]) == (None, "alice_tok")
    assert "shm" not in text and Path(far).name not in text
    sample_prior = load_script("sample_prior")
    with pytest.raises(ValueError, match="names no tokenizer: pass --tokenizer \\(the folder 'alice_tok' it was"):
        sample_prior.main(sample_prior.parse_args(["--prior", str(tmp_path / "prior"), "--num_images", "1"]))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_prior_on_two_processes(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    """train_prior.py in two torchrun processes (gloo on the CPU) on the tokens in `tmp_path / "tokens"`."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(ROOT / "training" / "train_prior.py"), *prior_argv(tmp_path / "tokens", tmp_path / "prior", *flags),
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)


@SEVERAL_PROCESSES
def test_two_processes_train_the_steps_asked_for(tmp_path):
    """Each of two processes sees half the batches: --max_train_steps is still the number of optimiser steps, and
    the cosine schedule ends at zero on the last of them."""
    token_set(64).save_to_disk(tmp_path / "tokens")  # 48 training rows: 12 batches of 4, 6 per process
    result = train_prior_on_two_processes(tmp_path, "--max_train_steps", "12", "--checkpointing_steps", "12")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Training 12 steps (2 epochs), 2 process(es)" in result.stderr
    assert json.loads((tmp_path / "prior" / "metrics.json").read_text())["step"] == 12
    scheduler = torch.load(tmp_path / "prior" / "checkpoints" / "checkpoint-12" / "scheduler.bin", weights_only=True)
    assert scheduler["_last_lr"][0] == pytest.approx(0.0, abs=1e-12)


@SEVERAL_PROCESSES
def test_two_processes_share_a_validation_split_smaller_than_their_number(tmp_path):
    # Dataset.shard raised on the process left without a validation row: 12 tokenised images and the default 5%
    # split give one row, and both processes died with a traceback.
    token_set(12).save_to_disk(tmp_path / "tokens")
    result = train_prior_on_two_processes(tmp_path, "--validation_split", "0.05", "--train_batch_size", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr
    assert json.loads((tmp_path / "prior" / "metrics.json").read_text())["num_tokens"] == 4  # one row's, once


@SEVERAL_PROCESSES
def test_two_processes_train_on_a_single_batch_of_data(tmp_path):
    """Six training rows, batches of 4, two processes: not one full batch each, so the short one is kept (dropping
    it left no batch at all, and a division by zero)."""
    token_set(8).save_to_disk(tmp_path / "tokens")
    result = train_prior_on_two_processes(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "prior" / "metrics.json").read_text())["step"] == 2


def test_an_empty_training_loader_is_a_clear_error():
    train_prior = load_script("train_prior")
    args = train_prior.parse_args(prior_argv(Path("tokens"), Path("prior")))
    with pytest.raises(ValueError, match="the training loader has no batches"):
        train_prior.training_length(args, 0)


# ---------------------------------------------------------------------------------------------------- sampling
def biased_prior(vocabulary: PriorVocabulary, num_image_tokens: int, architecture: str = "llama"):
    """A tiny prior whose head strongly prefers the special tokens, so sampling must be restricted to stay valid."""
    torch.manual_seed(0)
    prior = build_prior(vocabulary, num_image_tokens, architecture=architecture, **TINY_PRIOR)
    head = torch.nn.Linear(TINY_PRIOR["hidden_size"], vocabulary.vocab_size, bias=True)
    with torch.no_grad():
        head.bias.zero_()
        head.bias[: vocabulary.image_token_offset] = 30.0
    prior.lm_head = head
    return prior


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_sampled_ids_are_always_image_tokens(architecture):
    vocabulary = PriorVocabulary(64, num_classes=2)
    prior = biased_prior(vocabulary, 8, architecture)
    prompt = vocabulary.prompt_ids(4, class_labels=[0, 1, 0, 1])
    raw = prior.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=True)
    assert not vocabulary.is_image_token(raw[:, 2:]).all()  # unrestricted, this prior samples special tokens
    tokens = sample_image_tokens(prior, vocabulary, 4, class_labels=[0, 1, 0, 1], seed=0, temperature=1.5)
    assert tokens.shape == (4, 8) and 0 <= int(tokens.min()) and int(tokens.max()) < 64
    scores = ImageTokenLogitsProcessor(vocabulary)(prompt, torch.zeros(4, vocabulary.vocab_size))
    assert (
        torch.isinf(scores[:, : vocabulary.image_token_offset]).all()
        and torch.isfinite(scores[:, vocabulary.image_token_offset :]).all()
    )


def test_sampling_is_seeded_and_checks_arguments():
    vocabulary = PriorVocabulary(64)
    prior = build_prior(vocabulary, 8, **TINY_PRIOR)
    first = sample_image_tokens(prior, vocabulary, 2, seed=3)
    assert torch.equal(first, sample_image_tokens(prior, vocabulary, 2, seed=3))
    with pytest.raises(ValueError, match="classifier-free guidance"):
        sample_image_tokens(prior, vocabulary, 2, guidance_scale=3.0)
    with pytest.raises(ValueError, match="top_p"):
        sample_image_tokens(prior, vocabulary, 2, top_p=1.5)
    with pytest.raises(ValueError, match="decode with the tokenizer"):
        sample_images(prior, tiny_model(codebook_size=32), vocabulary, 1)


def test_sampling_without_top_k_draws_from_every_code():
    # transformers reads top_k=None as its default of 50: a 256-code prior sampled from 50 codes at most.
    vocabulary = PriorVocabulary(256)
    torch.manual_seed(0)
    prior = build_prior(vocabulary, 1, **TINY_PRIOR)  # untrained: close to uniform over the codes
    assert sample_image_tokens(prior, vocabulary, 3000, seed=0).unique().numel() > 200
    assert sample_image_tokens(prior, vocabulary, 3000, seed=0, top_k=10).unique().numel() <= 10
    import logging

    records, handler = [], logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)  # its own logger: it does not propagate
    try:
        sample_image_tokens(prior, vocabulary, 2, temperature=0)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [r for r in records if "top_k" in r.getMessage()]  # greedy takes none: passing one made it warn


@pytest.mark.parametrize("setting", [{"temperature": float("nan")}, {"temperature": float("inf")},
                                     {"guidance_scale": float("nan")}])  # fmt: skip
def test_sampling_refuses_values_that_are_not_finite(setting):
    vocabulary = PriorVocabulary(8, num_classes=2)
    prior = build_prior(vocabulary, 2, **TINY_PRIOR)
    with pytest.raises(ValueError, match="must be a finite number"):
        sample_image_tokens(prior, vocabulary, 1, class_labels=0, **setting)


# Settings a stranger's generation_config.json can carry, which transformers would otherwise apply to every setting
# sample_image_tokens leaves unset.
FOREIGN_GENERATION_SETTINGS = {
    "top_p": 1e-9, "num_return_sequences": 2, "guidance_scale": 50.0, "repetition_penalty": 5.0,
    "suppress_tokens": list(range(5, 60)),
}  # fmt: skip


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_sampling_ignores_the_priors_own_generation_config(temperature):
    vocabulary = PriorVocabulary(64, num_classes=2)
    torch.manual_seed(0)
    prior = build_prior(vocabulary, 4, **TINY_PRIOR)
    sample = lambda: sample_image_tokens(prior, vocabulary, 3, class_labels=[0, 1, 0], seed=0, temperature=temperature)
    clean = sample()
    for key, value in FOREIGN_GENERATION_SETTINGS.items():
        setattr(prior.generation_config, key, value)
    assert torch.equal(sample(), clean)
    assert prior.generation_config.top_p == 1e-9  # the prior's own config is left as it was


def test_load_prior_drops_the_sampling_settings_of_generation_config_json(tmp_path, caplog):
    vocabulary = PriorVocabulary(64, num_classes=2)
    torch.manual_seed(0)
    save_prior(build_prior(vocabulary, 4, **TINY_PRIOR), vocabulary, tmp_path, 4)
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == plain_file_mode()  # not safetensors' 0o600
    clean = sample_image_tokens(*load_prior(tmp_path)[:2], 3, class_labels=[0, 1, 0], seed=0)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    (tmp_path / "generation_config.json").write_text(json.dumps({**saved, **FOREIGN_GENERATION_SETTINGS}))
    with caplog.at_level("WARNING"):
        prior, vocabulary, _ = load_prior(tmp_path)
    assert "ignoring guidance_scale, num_return_sequences, repetition_penalty, suppress_tokens, top_p" in caplog.text
    assert prior.generation_config.top_p is None and prior.generation_config.num_return_sequences is None
    assert prior.generation_config.max_new_tokens == 4
    assert torch.equal(sample_image_tokens(prior, vocabulary, 3, class_labels=[0, 1, 0], seed=0), clean)


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_sampling_a_prior_with_nan_weights_is_one_clear_error(temperature):
    vocabulary = PriorVocabulary(8)
    prior = build_prior(vocabulary, 2, **TINY_PRIOR)
    with torch.no_grad():
        prior.lm_head.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"the prior's logits are not finite \(damaged weights\?\)"):
        sample_image_tokens(prior, vocabulary, 2, seed=0, temperature=temperature)


@pytest.mark.parametrize(
    "setting, message",
    [({"num_images": 2.5}, "num_images must be an integer"), ({"num_images": True}, "num_images must be an integer"),
     ({"top_k": True}, "top_k must be an integer"), ({"top_k": 2.5}, "top_k must be an integer"),
     ({"class_labels": [0.7, 1.9]}, "class labels must be integers"),
     ({"class_labels": torch.tensor([0.7, 1.9])}, "class labels must be integers")],
)  # fmt: skip
def test_sampling_refuses_arguments_of_the_wrong_type(setting, message):
    vocabulary = PriorVocabulary(8, num_classes=2)
    prior = build_prior(vocabulary, 2, **TINY_PRIOR)
    with pytest.raises(ValueError, match=message):
        sample_image_tokens(prior, vocabulary, **{"num_images": 2, **setting})


def test_classifier_free_guidance_follows_its_formula():
    """Greedy CFG picks argmax of uncond + s * (cond - uncond) over image tokens, uncond being the null class."""
    vocabulary = PriorVocabulary(64, num_classes=3)
    torch.manual_seed(0)
    prior = build_prior(vocabulary, 4, **TINY_PRIOR).eval()
    with torch.no_grad():
        prior.model.embed_tokens.weight[vocabulary.class_token_ids([2])] *= 20  # make the class matter
        cond = prior(vocabulary.prompt_ids(1, [2])).logits[0, -1].log_softmax(-1)
        uncond = prior(vocabulary.prompt_ids(1)).logits[0, -1].log_softmax(-1)
    offset = vocabulary.image_token_offset
    for scale in (1.0, 4.0):
        guided = (uncond + scale * (cond - uncond))[offset:]
        tokens = sample_image_tokens(prior, vocabulary, 1, class_labels=2, guidance_scale=scale, temperature=0)
        assert int(tokens[0, 0]) == int(guided.argmax())
    plain = sample_image_tokens(prior, vocabulary, 1, class_labels=2, temperature=0)
    strong = sample_image_tokens(prior, vocabulary, 1, class_labels=2, guidance_scale=8.0, temperature=0)
    assert not torch.equal(plain, strong)  # guidance changes the samples


def test_sample_images_checks_the_tokenizer_before_sampling(monkeypatch):
    vocabulary = PriorVocabulary(64)
    prior = build_prior(vocabulary, 16, **TINY_PRIOR)
    monkeypatch.setattr(prior, "generate", lambda *args, **kwargs: pytest.fail("sampled before checking"))
    with pytest.raises(ValueError, match="decode with the tokenizer"):
        sample_images(prior, tiny_model(codebook_size=32), vocabulary, 1)
    with pytest.raises(ValueError, match="the prior makes 16 tokens per image, but 32x32 images have a 8x8 token grid"):
        sample_images(prior, tiny_model(), vocabulary, 1)


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_image_tokens": 64}, "says 64 tokens per image, but the model has 6 positions"),
        ({"num_image_tokens": "4"}, "num_image_tokens must be a positive integer, got '4'"),
        ({"num_image_tokens": 4.0}, "num_image_tokens must be a positive integer, got 4.0"),
        ({"num_image_tokens": -4}, "num_image_tokens must be a positive integer, got -4"),
        ({"num_image_tokens": 3}, "says 3 tokens per image, but its generation_config.json makes 4"),
        ({"image_size": [32, 32, 3]}, r"image_size must be \[height, width\] in pixels, got \[32, 32, 3\]"),
        ({"image_size": [0, 0]}, r"image_size must be \[height, width\] in pixels, got \[0, 0\]"),
        ({"image_size": "ab"}, "image_size must be"),
    ],
)  # fmt: skip
def test_load_prior_checks_prior_config_against_the_model(change, message, architecture, tmp_path):
    vocabulary = PriorVocabulary(8)
    save_prior(build_prior(vocabulary, 4, architecture, **TINY_PRIOR), vocabulary, tmp_path, 4, image_size=(16, 16))
    prior_config = json.loads((tmp_path / "prior_config.json").read_text())
    (tmp_path / "prior_config.json").write_text(json.dumps({**prior_config, **change}))
    with pytest.raises(ValueError, match=message):
        load_prior(tmp_path)


def test_load_prior_reads_safetensors_only(tmp_path):
    vocabulary = PriorVocabulary(8)
    prior = build_prior(vocabulary, 4, **TINY_PRIOR)
    save_prior(prior, vocabulary, tmp_path, 4)
    (tmp_path / "model.safetensors").unlink()
    torch.save(prior.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="no file named model.safetensors .*read from model.safetensors only"):
        load_prior(tmp_path)


def test_load_prior_says_no_such_folder_for_a_mistyped_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "notes.txt").write_text("not a prior")
    for name in ("./prior", "outputs/priro", str(tmp_path / "missing"), "~/no-such-cdb-vq-prior"):
        with pytest.raises(FileNotFoundError, match="no such folder"):
            load_prior(name)
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        load_prior(str(tmp_path / "notes.txt"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top_p", "0"], r"--top_p must be in \(0, 1\]"),
        (["--top_k", "-1"], "--top_k must be at least 0"),
        (["--temperature", "-0.5"], "--temperature must be a finite number of at least 0"),
        (["--temperature", "nan"], "--temperature must be a finite number of at least 0"),
        (["--temperature", "inf"], "--temperature must be a finite number of at least 0"),
        (["--guidance_scale", "nan", "--class_labels", "0"], "--guidance_scale must be a finite number"),
        (["--class_labels", "0"], "--class_labels: the prior .* is unconditional"),
    ],
)
def test_sample_prior_refuses_bad_flags(flags, message, tmp_path, capsys):
    vocabulary = PriorVocabulary(8)
    save_prior(build_prior(vocabulary, 4, **TINY_PRIOR), vocabulary, tmp_path / "prior", 4)
    sample_prior = load_script("sample_prior")
    with pytest.raises(SystemExit):
        sample_prior.parse_args(["--prior", str(tmp_path / "prior"), *flags])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(message, error), error


@pytest.mark.parametrize(
    "names, labels, expected",
    [
        (["cat", "dog", "fish"], ["dog", "0", "fish"], [1, 0, 2]),
        (["cat", "dog", "fish"], ["dgo"],
         r"--class_labels 'dgo' is not a class of the prior \(did you mean 'dog'\?\); its classes are cat, dog, fish"),
        (["cat", "dog", "fish"], ["3"], "--class_labels 3: the prior has classes 0 to 2"),
        (["cat", "dog", "fish"], ["-1"], "--class_labels -1: the prior has classes 0 to 2"),
        (None, ["dog"], "--class_labels 'dog': the prior records no class names; give class ids, 0 to 2"),
        # An image folder's classes named by number, sorted as text: a name is the class it names, never an id.
        (["1", "10", "2"], ["2", "10"], [2, 1]),
        (["cat", "dog", "fish"], ["\u00b2"], r"--class_labels '\u00b2' is not a class of the prior"),
    ],
)
def test_sample_prior_takes_class_names_or_ids(names, labels, expected, tmp_path, capsys):
    # Only ids were taken, though prior_config.json records the data set's class names (`photo_3`, `cat`).
    vocabulary = PriorVocabulary(8, 3, names)
    save_prior(build_prior(vocabulary, 4, **TINY_PRIOR), vocabulary, tmp_path / "prior", 4)
    sample_prior = load_script("sample_prior")
    argv = ["--prior", str(tmp_path / "prior"), "--class_labels", *labels]
    if isinstance(expected, list):
        assert sample_prior.parse_args(argv).class_labels == expected
        return
    with pytest.raises(SystemExit):
        sample_prior.parse_args(argv)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(expected, error), error


def save_sampling_prior(tokenizer, folder: Path) -> Path:
    """An untrained prior over `tokenizer`'s 64 codes in `folder/prior`, recording the tokenizer saved in
    `folder/tok` and its codebook fingerprint, as train_prior.py does."""
    model, processor = tokenizer
    model.save_pretrained(folder / "tok")
    processor.save_pretrained(folder / "tok")
    vocabulary = PriorVocabulary(64)
    return save_prior(
        build_prior(vocabulary, 64, **TINY_PRIOR), vocabulary, folder / "prior", 64, tokenizer=str(folder / "tok"),
        codebook_fingerprint=codebook_fingerprint(model),
    )  # fmt: skip


def run_sample_prior(prior: Path, *flags: str) -> Path:
    sample_prior = load_script("sample_prior")
    return sample_prior.main(sample_prior.parse_args(["--prior", str(prior), "--num_images", "1", *flags]))


def test_sample_prior_refuses_a_tokenizer_with_another_codebook(tokenizer, tmp_path, caplog):
    # Another tokenizer of the same codebook size, or the prior's own retrained since, decoded noise without a word.
    prior = save_sampling_prior(tokenizer, tmp_path)
    other = tiny_model(seed=1)
    other.save_pretrained(tmp_path / "other")
    trained, given = codebook_fingerprint(tokenizer[0]), codebook_fingerprint(other)
    with pytest.raises(ValueError, match=f"--tokenizer .*other' has codebook fingerprint {given}, but the prior was "
                                         f"trained on a tokenizer with {trained}"):  # fmt: skip
        run_sample_prior(prior, "--tokenizer", str(tmp_path / "other"))
    assert run_sample_prior(prior).is_file()  # its own tokenizer
    shutil.copytree(tmp_path / "other", tmp_path / "tok", dirs_exist_ok=True)  # the tokenizer, retrained since
    with pytest.raises(ValueError, match=f"records '.*tok' has codebook fingerprint {given}.*retrained since"):
        run_sample_prior(prior, "--overwrite")
    # A prior saved before fingerprints were recorded still samples, with a warning.
    config_file = prior / "prior_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({key: value for key, value in config.items() if key != "codebook_fingerprint"}))
    assert run_sample_prior(prior, "--overwrite").is_file()
    assert "records no codebook fingerprint" in caplog.text


def test_sample_prior_decodes_on_the_recorded_size_and_never_guesses_another(tokenizer, tmp_path):
    # A recorded size whose grid does not hold the prior's tokens was replaced by the square guess without a word.
    prior = save_sampling_prior(tokenizer, tmp_path)
    config_file = prior / "prior_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "image_size": [128, 8]}))  # a 32 x 2 grid: 64 tokens
    assert Image.open(run_sample_prior(prior)).size == (8, 128)
    config_file.write_text(json.dumps({**config, "image_size": [16, 16]}))
    with pytest.raises(ValueError, match="makes 64 tokens per image, but 16x16 images have a 4x4 token grid"):
        run_sample_prior(prior, "--overwrite")


def test_sample_prior_keeps_its_tokens_for_cdb_vq_decode(tokenizer, tmp_path, monkeypatch, capsys):
    # The sampled ids were lost with the grid: a sample could not be decoded again at full size, or kept for FID.
    import numpy as np

    from cdb_tokenizer.tools.cli import main, read_token_file

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # cli.main sets PIL's limit: restore it
    prior = save_sampling_prior(tokenizer, tmp_path)
    tokens_file = tmp_path / "kept" / "samples.safetensors"
    grid = run_sample_prior(prior, "--num_images", "3", "--batch_size", "2", "--tokens_out", str(tokens_file))
    tokens, metadata, _ = read_token_file(str(tokens_file))
    assert tokens.shape == (3, 8, 8) and json.loads(metadata["images"]) == [f"sample-{i:05d}" for i in range(3)]
    assert metadata["model"] == "../tok" and metadata["codebook_fingerprint"] == codebook_fingerprint(tokenizer[0])
    # `cdb-vq decode` (the model the file records) gives the grid's images again.
    assert main(["decode", str(tokens_file), "--out", str(tmp_path / "decoded")]) == 0
    cells = np.asarray(Image.open(grid).convert("RGB"), dtype=int)
    for index in range(3):
        row, column = divmod(index, 2)  # two per row: 3 images make a 2x2 grid
        cell = cells[2 + 34 * row : 34 + 34 * row, 2 + 34 * column : 34 + 34 * column]
        decoded = np.asarray(Image.open(tmp_path / "decoded" / f"sample-{index:05d}.png"), dtype=int)
        assert np.abs(decoded - cell).max() <= 1  # rounded apart by the grid's and the processor's conversions
    capsys.readouterr()
    # Checked with --output, before anything is loaded: an existing file is kept without --overwrite.
    with pytest.raises(SystemExit):
        run_sample_prior(prior, "--tokens_out", str(tokens_file), "--output", str(tmp_path / "new.png"))
    assert "--tokens_out" in capsys.readouterr().err and tokens_file.stat().st_size > 0
    with pytest.raises(SystemExit):
        run_sample_prior(prior, "--tokens_out", str(tmp_path / "tokens.png"), "--output", str(tmp_path / "new.png"))
    assert "names an image file, but this writes a safetensors file" in capsys.readouterr().err


def test_sample_prior_tokens_out_records_the_hub_commit_of_its_tokenizer(tokenizer, tmp_path, monkeypatch):
    # A Hub tokenizer was recorded without its commit: once the repository moved on to another codebook, `cdb-vq
    # decode` loaded main and refused the samples.
    import huggingface_hub.constants
    from conftest import hub_cache

    from cdb_tokenizer.tools.cli import main, read_token_file

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # cli.main sets PIL's limit: restore it
    model, processor = tokenizer
    other = tiny_model(seed=1)
    for folder, weights in (("sampled", model), ("newer", other)):
        weights.save_pretrained(tmp_path / folder)
        processor.save_pretrained(tmp_path / folder)
    sampled, newer = "3" * 40, "4" * 40
    cache = hub_cache(tmp_path / "hub", "org/tok", {sampled: tmp_path / "sampled", newer: tmp_path / "newer"},
                      {"main": sampled})  # fmt: skip
    for name, value in (("HF_HUB_OFFLINE", True), ("HF_HUB_CACHE", str(cache))):
        monkeypatch.setattr(huggingface_hub.constants, name, value)
        monkeypatch.setenv(name, str(int(value)) if isinstance(value, bool) else value)
    vocabulary = PriorVocabulary(64)
    prior = save_prior(build_prior(vocabulary, 64, **TINY_PRIOR), vocabulary, tmp_path / "prior", 64,
                       tokenizer="org/tok", codebook_fingerprint=codebook_fingerprint(model))  # fmt: skip
    tokens_file = tmp_path / "samples.safetensors"
    run_sample_prior(prior, "--tokens_out", str(tokens_file), "--output", str(tmp_path / "grid.png"))
    _, metadata, _ = read_token_file(str(tokens_file))
    assert (metadata["model"], metadata["model_revision"]) == ("org/tok", sampled)
    (cache / "models--org--tok" / "refs" / "main").write_text(newer)  # the repository moved on
    assert main(["decode", str(tokens_file), "--out", str(tmp_path / "decoded")]) == 0
    assert (tmp_path / "decoded" / "sample-00000.png").is_file()


def test_sample_prior_tokens_out_never_replaces_the_weights_it_samples_with(tokenizer, tmp_path, capsys):
    # --tokens_out prior/model.safetensors --overwrite replaced the prior's weights with the samples' tokens after
    # sampling (encode refuses its inputs as --out, --overwrite or not).
    prior = save_sampling_prior(tokenizer, tmp_path)
    for weights in (prior / "model.safetensors", tmp_path / "tok" / "model.safetensors"):
        before = weights.read_bytes()
        with pytest.raises(SystemExit):
            run_sample_prior(prior, "--tokens_out", str(weights), "--overwrite", "--output", str(tmp_path / "g.png"))
        assert "would replace the input" in capsys.readouterr().err and weights.read_bytes() == before
    # A --tokens_out refused after --output's folders were made leaves none of them behind.
    (tmp_path / "kept.safetensors").write_bytes(b"tokens of an earlier run")
    with pytest.raises(SystemExit):
        run_sample_prior(prior, "--tokens_out", str(tmp_path / "kept.safetensors"),
                         "--output", str(tmp_path / "new" / "deeper" / "g.png"))  # fmt: skip
    assert "exists; pass --overwrite" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_sample_prior_tokens_out_records_the_fingerprint_taken_on_the_cpu(tokenizer, tmp_path, monkeypatch):
    # The fingerprint was taken after the tokenizer moved to --device, where the codes may round otherwise (CUDA's
    # normalize); `cdb-vq decode` takes it on the CPU and would refuse the file.
    from cdb_tokenizer import CDBVQModel
    from cdb_tokenizer.tools.cli import read_token_file

    prior = save_sampling_prior(tokenizer, tmp_path)
    to = CDBVQModel.to

    def to_a_device_that_rounds(model, *args, **kwargs):
        moved = to(model, *args, **kwargs)
        if args and isinstance(args[0], torch.device):
            with torch.no_grad():
                # One ulp: the decoder barely sees it, the fingerprint does.
                moved.quantizer.codebook.weight.nextafter_(torch.tensor(math.inf))
        return moved

    monkeypatch.setattr(CDBVQModel, "to", to_a_device_that_rounds)
    run_sample_prior(prior, "--tokens_out", str(tmp_path / "t.safetensors"), "--output", str(tmp_path / "g.png"))
    _, metadata, _ = read_token_file(str(tmp_path / "t.safetensors"))
    assert metadata["codebook_fingerprint"] == codebook_fingerprint(tokenizer[0])


@pytest.mark.parametrize(
    "output, message",
    [
        ("photo.png", "--output .*photo.png exists; pass --overwrite to replace it"),
        ("folder.png", "--output .*folder.png is a folder"),
        ("link.png", "--output .*link.png is a symbolic link"),
        ("folder.png/", "names a folder"),
        ("samples.jpg", "--output .*samples.jpg': the grid is written as a PNG image; give a .png file name"),
        ("/dev/null", "--output '/dev/null': the grid is written as a PNG image"),
        ("", "give a .png file name"),
    ],
)
def test_sample_prior_checks_output_before_loading_anything(output, message, tmp_path, monkeypatch, capsys):
    # It replaced a user's photo without a word, and wrote folders, devices and .jpg names only after sampling.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photo.png").write_bytes(b"a photo")
    (tmp_path / "link.png").symlink_to(tmp_path / "photo.png")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "prior").mkdir()  # a folder: the prior is only loaded after --output has been checked
    sample_prior = load_script("sample_prior")
    monkeypatch.setattr(sample_prior, "load_prior", lambda *args, **kwargs: pytest.fail("loaded before checking"))
    with pytest.raises(SystemExit):
        sample_prior.parse_args(["--prior", str(tmp_path / "prior"), "--output", output])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(message, error), error
    assert (tmp_path / "photo.png").read_bytes() == b"a photo"


def test_sample_prior_overwrites_only_when_asked_and_leaves_no_empty_folder(tokenizer, tmp_path, capsys):
    prior = save_sampling_prior(tokenizer, tmp_path)
    assert run_sample_prior(prior) == prior / "samples.png"
    with pytest.raises(SystemExit):  # the default output too: another run's grid is not replaced unasked
        run_sample_prior(prior)
    assert "samples.png exists; pass --overwrite to replace it" in capsys.readouterr().err
    (tmp_path / "photo.png").write_bytes(b"a photo")
    assert run_sample_prior(prior, "--output", str(tmp_path / "photo.png"), "--overwrite").is_file()
    assert Image.open(tmp_path / "photo.png").format == "PNG"
    # A run that fails removes the folders the --output check created.
    with pytest.raises(FileNotFoundError, match="--tokenizer './nowhere': no such folder"):
        run_sample_prior(prior, "--output", str(tmp_path / "new" / "sub" / "grid.png"), "--tokenizer", "./nowhere")
    assert not (tmp_path / "new").exists()


def test_a_sigterm_cleans_up_as_ctrl_c_does(tmp_path, monkeypatch, capsys):
    # A SIGTERM ended sample_prior.py at once: the folders its --output check made stayed behind, empty (and a grid
    # being written left its hidden temporary file).
    from cdb_tokenizer.tools.messages import run_script

    sample_prior = load_script("sample_prior")
    (tmp_path / "prior").mkdir()
    args = sample_prior.parse_args(["--prior", str(tmp_path / "prior"), "--output", str(tmp_path / "new" / "sub" / "grid.png")])
    assert (tmp_path / "new" / "sub").is_dir()  # made by the --output check

    def killed(args):
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("a SIGTERM did not end the work")

    monkeypatch.setattr(sample_prior, "sample", killed)
    monkeypatch.setattr(sys, "argv", ["training/sample_prior.py"])
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        run_script(lambda: sample_prior.main(args), ValueError)
    assert exit_info.value.code == 143 and capsys.readouterr().err == "sample_prior.py: terminated\n"
    assert not (tmp_path / "new").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is given back


def test_save_image_grid_writes_a_whole_png_never_through_a_link(tmp_path, monkeypatch):
    images = torch.zeros(2, 3, 8, 8)
    (tmp_path / "photo.png").write_bytes(b"a photo")
    (tmp_path / "link.png").symlink_to(tmp_path / "photo.png")
    with pytest.raises(FileExistsError, match="not a regular file"):
        save_image_grid(images, tmp_path / "link.png")
    assert Image.open(save_image_grid(images, tmp_path / "grid.jpg")).format == "PNG"  # as its docstring says

    def half_written(tensor, fp, **kwargs):
        Path(fp).write_bytes(b"half a grid")
        raise OSError("disk full")

    monkeypatch.setattr("torchvision.utils.save_image", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_image_grid(images, tmp_path / "photo.png")
    assert (tmp_path / "photo.png").read_bytes() == b"a photo"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["grid.jpg", "link.png", "photo.png"]


@pytest.mark.parametrize(
    "device, message",
    [("foo", "--device 'foo' is not a device torch knows"), ("cuda", "--device cuda asked for CUDA, but no CUDA GPU")],
)
def test_sample_prior_refuses_an_unusable_device_in_one_line(device, message, tmp_path, monkeypatch, capsys):
    import runpy

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    vocabulary = PriorVocabulary(8)
    save_prior(build_prior(vocabulary, 4, **TINY_PRIOR), vocabulary, tmp_path / "prior", 4)
    monkeypatch.setattr(sys, "argv", ["sample_prior.py", "--prior", str(tmp_path / "prior"), "--device", device])
    with pytest.raises(SystemExit):
        runpy.run_path(str(ROOT / "training" / "sample_prior.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err.strip().splitlines()[-1]


def test_sample_prior_names_a_missing_tokenizer_or_a_damaged_config(tokenizer, tmp_path, monkeypatch):
    prior = save_sampling_prior(tokenizer, tmp_path)
    (tmp_path / "tok").rename(tmp_path / "moved")  # it said "Repo id must be in the form 'repo_name'...: '/.../tok'"
    with pytest.raises(FileNotFoundError, match="the tokenizer prior_config.json records '.*tok': no such folder. "
                                                "Moved or deleted since training\\? Pass --tokenizer."):  # fmt: skip
        run_sample_prior(prior)
    assert run_sample_prior(prior, "--tokenizer", str(tmp_path / "moved")).is_file()
    config_file = prior / "prior_config.json"
    config_file.write_text('{"vocabulary": {')  # it said "Expecting property name ..." and not which file
    with pytest.raises(ValueError, match=re.escape(f"{config_file} is damaged: Expecting property name")):
        run_sample_prior(prior, "--overwrite")
    config_file.write_text("[]")
    with pytest.raises(ValueError, match=re.escape(f"{config_file} is damaged: it has no vocabulary")):
        load_prior(prior)


def test_a_name_without_an_owner_is_a_missing_folder_not_a_hub_id(tokenizer, tmp_path, monkeypatch):
    # "--prior noprior" (a folder name mistyped without ./) was looked up on the Hub: 30 s of retries offline.
    prior = save_sampling_prior(tokenizer, tmp_path)
    monkeypatch.chdir(tmp_path)

    def ask_the_hub(*args, **kwargs):
        pytest.fail("asked the Hub")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", ask_the_hub)
    monkeypatch.setattr("cdb_tokenizer.tools.priors.model.load_tokenizer", ask_the_hub, raising=False)
    with pytest.raises(FileNotFoundError, match="prior 'priro': no such folder, nor a Hub id \\(owner/name\\)"):
        load_prior("priro")
    with pytest.raises(FileNotFoundError, match="--tokenizer 'tokk': no such folder, nor a Hub id"):
        run_sample_prior(prior, "--tokenizer", "tokk")
    with pytest.raises(FileNotFoundError, match="--tokenizer 'a b/c': neither a local folder nor a valid Hub id"):
        run_sample_prior(prior, "--tokenizer", "a b/c")


def hub_error(kind: str) -> Exception:
    """An error of huggingface_hub's `kind`, as `hf_hub_download` raises it."""
    from huggingface_hub import errors

    error_class = getattr(errors, kind)
    return error_class("boom") if kind == "LocalEntryNotFoundError" else error_class("boom", response=mock.Mock())


@pytest.mark.parametrize(
    "kind, message",
    [
        ("LocalEntryNotFoundError", r"no local folder of that name, and the Hub cannot be reached \(offline\?\) nor was it downloaded before"),
        ("RepositoryNotFoundError", "no local folder of that name, and no Hub repository either"),
        ("RevisionNotFoundError", "the Hub repository has no revision 'v2'"),
        ("RemoteEntryNotFoundError", "the Hub repository has no prior_config.json: it is not a prior"),
    ],
)
def test_load_prior_says_why_a_hub_prior_cannot_be_fetched(kind, message, monkeypatch):
    def fail(*args, **kwargs):
        raise hub_error(kind)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fail)
    with pytest.raises(FileNotFoundError, match=f"^prior 'org/prior': {message}"):
        load_prior("org/prior", revision="v2")


def test_load_prior_never_runs_a_folder_s_own_code(tmp_path, monkeypatch):
    # Without trust_remote_code=False transformers asked "Do you wish to run the custom code? [y/N]" and ran the
    # folder's module on a yes; a prior is a stock causal LM and needs none.
    vocabulary = PriorVocabulary(8)
    folder = save_prior(build_prior(vocabulary, 4, **TINY_PRIOR), vocabulary, tmp_path / "prior", 4)
    marker = tmp_path / "code-ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil-prior", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"})
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr("builtins.input", lambda *args: pytest.fail("the user was asked to run the folder's code"))
    # It was transformers' three lines with a Hub URL for a local folder, advising a flag the scripts do not have.
    with pytest.raises(ValueError, match=r"is a model with its own code \(auto_map\), which is never run"):
        load_prior(folder)
    assert not marker.exists()


def test_a_pickled_tokenizer_is_refused_in_one_line_without_torch_s_advice(tmp_path):
    # train_prior.py and sample_prior.py printed a traceback ending in "Re-running torch.load with weights_only set to
    # False will likely succeed", where the CLI says it in one line.
    import argparse

    folder = tmp_path / "tokenizer"
    tiny_model().save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save({"weights": argparse.Namespace()}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"are a PyTorch pickle \(.bin\) holding more than tensors.*never unpickled") as error:
        load_prior_tokenizer(str(folder))
    assert "weights_only" not in str(error.value) and "\n" not in str(error.value)


def test_resuming_another_priors_checkpoint_is_one_clear_error(tmp_path, fresh_accelerator_state, capsys):
    token_set(32).save_to_disk(tmp_path / "tokens")
    train_prior = load_script("train_prior")
    argv = prior_argv(tmp_path / "tokens", tmp_path / "prior")
    train_prior.main(train_prior.parse_args(argv))
    (tmp_path / "prior" / "metrics.json").unlink()
    with pytest.raises(ValueError, match="cannot resume from .*checkpoint-2: RuntimeError: .*another configuration"):
        train_prior.main(train_prior.parse_args(argv + ["--max_train_steps", "3", "--resume_from_checkpoint", "latest",
                                                        "--hidden_size", "16"]))  # fmt: skip
    with pytest.raises(SystemExit):
        train_prior.parse_args(argv + ["--num_classes", "0"])
    assert "--num_classes must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # it deleted the run it was asked to resume, then trained from step 0
        train_prior.parse_args(argv + ["--overwrite_output_dir", "--resume_from_checkpoint", "latest"])
    assert "give one or the other" in capsys.readouterr().err


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("sample_prior", ["--prior", "/no/such/prior"], "no such folder"),
        ("train_prior", ["--tokens_dir", "/no/such/tokens", "--codebook_size", "8"], "--tokens_dir '/no/such/tokens' does not exist"),
    ],
)
def test_prior_scripts_report_input_mistakes_in_one_line(script, argv, message, tmp_path, monkeypatch, capsys):
    import runpy

    monkeypatch.chdir(tmp_path)
    (tmp_path / "samples.png").write_bytes(b"a grid sampled earlier")  # a missing prior is said first, not this file
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv, *(["--output_dir", str(tmp_path / "o")] if script == "train_prior" else [])])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "training" / f"{script}.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err and message in err.strip().splitlines()[-1]


def test_load_tokenizer_refuses_a_model_of_another_kind(tmp_path):
    # It loaded a BERT folder as a cdb-vq model with every weight "missing" (random), and decoded noise.
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is a 'bert' model, not a cdb-vq tokenizer"):
        load_tokenizer(str(tmp_path))


def test_load_tokenizer_hides_transformers_loading_bar_and_leaves_download_bars_as_they_were(tmp_path, capsys):
    # transformers' per-tensor "Loading weights" bar landed among the CLI's output (and publish.py's, twice).
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as transformers_logging

    if not hasattr(transformers_logging, "set_tqdm_hook"):
        pytest.skip("transformers < 5.x has no tqdm hook: its bar stays")
    tiny_model().save_pretrained(tmp_path)
    capsys.readouterr()
    load_tokenizer(str(tmp_path))
    assert "Loading weights" not in capsys.readouterr().err
    assert transformers_logging.set_tqdm_hook(None) is None and not are_progress_bars_disabled()


def test_a_hub_priors_default_output_is_in_the_working_directory(tmp_path, monkeypatch):
    # owner/name/samples.png made a local folder owner/name, which the next `--prior owner/name` was taken for.
    import argparse

    sample_prior = load_script("sample_prior")
    monkeypatch.chdir(tmp_path)
    output = sample_prior.check_output(argparse.Namespace(prior="owner/name", output=None, overwrite=False))
    assert output == Path("samples.png") and not (tmp_path / "owner").exists()
    (tmp_path / "local_prior").mkdir()
    output = sample_prior.check_output(argparse.Namespace(prior="local_prior", output=None, overwrite=False))
    assert output == Path("local_prior") / "samples.png"
    monkeypatch.setenv("HOME", str(tmp_path))  # a prior named from the home folder: its grid goes there, not to ./~/
    output = sample_prior.check_output(argparse.Namespace(prior="~/local_prior", output=None, overwrite=False))
    assert output == tmp_path / "local_prior" / "samples.png" and not (tmp_path / "~").exists()


# ---------------------------------------------------------------------------------------------------- review round 2
@pytest.mark.parametrize("flag", ["--tokenizer", "--tokens_dir"])
def test_train_prior_refuses_an_output_dir_that_is_one_of_its_inputs(flag, tmp_path, capsys):
    # With --overwrite_output_dir it deleted the tokenizer it trained on; the prior was written among the data set's
    # arrow files. A prior kept inside its tokenizer's folder, or around its tokens, is fine.
    (tmp_path / "a" / "tok").mkdir(parents=True)
    token_set(8).save_to_disk(tmp_path / "b" / "tokens")
    inputs = {"--tokenizer": tmp_path / "a" / "tok", "--tokens_dir": tmp_path / "b" / "tokens"}
    train_prior = load_script("train_prior")
    argv = prior_argv(inputs["--tokens_dir"], inputs[flag] / ".", "--tokenizer", str(inputs["--tokenizer"]),
                      "--overwrite_output_dir")  # fmt: skip
    capsys.readouterr()  # save_to_disk's bar
    with pytest.raises(SystemExit):
        train_prior.parse_args(argv)
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and f"is {flag} " in error and "pick another --output_dir" in error
    assert (tmp_path / "b" / "tokens" / "state.json").is_file()
    nested = prior_argv(inputs["--tokens_dir"], inputs["--tokenizer"] / "prior", "--tokenizer", str(inputs["--tokenizer"]))
    assert train_prior.parse_args(nested).output_dir == str(inputs["--tokenizer"] / "prior")


def damage_prior_weights(folder: Path, damage: str) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    if damage == "header":
        (folder / "model.safetensors").write_bytes((2**62).to_bytes(8, "little") + b"{}")
        return
    if damage == "missing":
        weights = {name: tensor for name, tensor in weights.items() if "layers.1." not in name}
    elif damage == "extra":
        weights["evil.weight"] = torch.zeros(2)
    else:
        weights["model.embed_tokens.weight"] = torch.zeros(5, TINY_PRIOR["hidden_size"])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "damage, message",
    [("missing", r"9 missing tensor\(s\), e.g. model.layers.1"), ("shape", "some tensors have other shapes"),
     ("extra", r"1 unexpected tensor\(s\), e.g. evil.weight"), ("header", "Error .*header too large")],
)  # fmt: skip
def test_load_prior_refuses_weights_that_do_not_fit_in_one_line(damage, message, tmp_path, capsys):
    # Missing layers started at random and sampled noise, with only transformers' LOAD REPORT table; a damaged header
    # or another shape was a traceback.
    vocabulary = PriorVocabulary(8)
    save_prior(build_prior(vocabulary, 4, **TINY_PRIOR), vocabulary, tmp_path, 4)
    damage_prior_weights(tmp_path, damage)
    capsys.readouterr()
    with pytest.raises(ValueError, match=f"weights of prior .* are damaged or do not fit its config.json: {message}"):
        load_prior(tmp_path)
    assert "LOAD REPORT" not in capsys.readouterr().err  # held back: the one line says it


@pytest.mark.parametrize(
    "state, labels",
    [({"_format_type": "arrow"}, None), ({"_format_columns": ["label"]}, [i % 2 for i in range(16)]),
     ({"_format_type": "torch", "_format_kwargs": {"dtype": "torch.float16"}}, None)],
)  # fmt: skip
def test_train_prior_resets_the_format_a_token_folder_sets(state, labels, tmp_path, fresh_accelerator_state):
    # The checks read the data as Arrow, the loop in the saved format: TypeError / KeyError tracebacks mid-run.
    token_set(16, labels=labels).save_to_disk(tmp_path / "tokens")
    state_file = tmp_path / "tokens" / "state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), **state}))
    train_prior = load_script("train_prior")
    argv = prior_argv(tmp_path / "tokens", tmp_path / "prior", "--max_train_steps", "1")
    assert train_prior.main(train_prior.parse_args(argv))["step"] == 1


def test_train_prior_names_a_token_folder_of_wrong_types_or_stray_labels(tmp_path, fresh_accelerator_state):
    train_prior = load_script("train_prior")
    token_set(16).save_to_disk(tmp_path / "typed")
    info_file = tmp_path / "typed" / "dataset_info.json"
    info = json.loads(info_file.read_text())
    info["features"]["image_tokens"] = {"dtype": "string", "_type": "Value"}
    info_file.write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"--tokens_dir .*typed is damaged \(TypeError: .*\): tokenise again"):
        train_prior.main(train_prior.parse_args(prior_argv(tmp_path / "typed", tmp_path / "prior1")))
    # One stray label made a 64M-parameter prior (10**6) or an allocation of 128 TB (10**12) without a word; the
    # unlabelled (-1) rows are not counted as labelled.
    token_set(16, labels=[0, 1, 2, 3] * 3 + [-1, -1, 2, 1_000_000]).save_to_disk(tmp_path / "stray")
    with pytest.raises(ValueError, match="labels go up to 1000000, i.e. 1000001 classes for 14 labelled rows.*--num_"):
        train_prior.main(train_prior.parse_args(prior_argv(tmp_path / "stray", tmp_path / "prior2")))


@pytest.mark.parametrize("name", ["../other/data-00000-of-00001.arrow", "/etc/passwd"])
def test_train_prior_refuses_data_files_outside_the_token_folder(name, tmp_path, fresh_accelerator_state):
    token_set(16).save_to_disk(tmp_path / "tokens")
    state_file = tmp_path / "tokens" / "state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "_data_files": [{"filename": name}]}))
    train_prior = load_script("train_prior")
    with mock.patch.object(datasets, "load_from_disk", side_effect=AssertionError("read before the check")):
        with pytest.raises(ValueError, match=f"names data files outside the folder \\({re.escape(name)}\\)"):
            train_prior.main(train_prior.parse_args(prior_argv(tmp_path / "tokens", tmp_path / "prior")))


def test_sample_images_in_batches_is_seeded_per_batch(tokenizer):
    # One generate call for the whole request (no batch size); a sample depended on the rest of the request.
    vocabulary = PriorVocabulary(64, num_classes=2)
    torch.manual_seed(0)
    prior = build_prior(vocabulary, 64, **TINY_PRIOR)
    sample = lambda count, **kwargs: sample_images(prior, tokenizer[0], vocabulary, count, seed=5, **kwargs)
    assert torch.equal(sample(3), sample(3, batch_size=8))  # one batch: as before
    batched = sample(4, batch_size=2, class_labels=[0, 1, 1, 0])
    assert torch.equal(batched, sample(4, batch_size=2, class_labels=[0, 1, 1, 0]))
    assert torch.equal(batched[:2], sample(2, batch_size=2, class_labels=[0, 1]))  # the first batch, on its own
    assert not torch.equal(batched[2:], sample(2, batch_size=2, class_labels=[1, 0]))  # the second has its own seed
    with pytest.raises(ValueError, match="got 3 class labels for 4 images"):
        sample(4, batch_size=2, class_labels=[0, 1, 1])


def test_sample_prior_samples_in_batches_with_a_bar(tokenizer, tmp_path, capsys):
    prior = save_sampling_prior(tokenizer, tmp_path)
    assert Image.open(run_sample_prior(prior, "--num_images", "3", "--batch_size", "2")).size == (2 * 34 + 2,) * 2
    assert "batches: 100%" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [(["--temperature", "1e-40"], r"--temperature must be 0 \(greedy\) or at least 0.0001, got 1e-40"),
     (["--seed", "99999999999999999999"], r"--seed must be in \[-2\*\*63, 2\*\*64\)"),
     (["--batch_size", "0"], "--batch_size must be at least 1")],
)  # fmt: skip
def test_sample_prior_refuses_a_tiny_temperature_a_huge_seed_and_no_batch(flags, message, tmp_path, capsys):
    vocabulary = PriorVocabulary(8)
    save_prior(build_prior(vocabulary, 4, **TINY_PRIOR), vocabulary, tmp_path / "prior", 4)
    with pytest.raises(SystemExit):
        load_script("sample_prior").parse_args(["--prior", str(tmp_path / "prior"), *flags])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(message, error), error
    with pytest.raises(ValueError, match="temperature must be 0 .greedy. or at least"):  # the API too
        sample_image_tokens(build_prior(vocabulary, 2, **TINY_PRIOR), vocabulary, 1, temperature=1e-40)


def test_train_prior_names_a_token_file_and_a_seed_out_of_range(tmp_path, capsys, fresh_accelerator_state):
    (tmp_path / "enc.safetensors").write_bytes(b"a cdb-vq encode token file")
    train_prior = load_script("train_prior")
    with pytest.raises(ValueError, match="enc.safetensors is a file, not a folder: .*`cdb-vq tokenize`"):
        train_prior.main(train_prior.parse_args(prior_argv(tmp_path / "enc.safetensors", tmp_path / "prior")))
    with pytest.raises(SystemExit):
        train_prior.parse_args(prior_argv(tmp_path / "tokens", tmp_path / "prior", "--seed", "-1"))
    assert "--seed must be in [0, 2**32), got -1" in capsys.readouterr().err


def test_a_tokenizer_of_another_codebook_size_is_named_by_its_size(tokenizer, tmp_path):
    prior = save_sampling_prior(tokenizer, tmp_path)
    tiny_model(codebook_size=32).save_pretrained(tmp_path / "tok32")
    with pytest.raises(ValueError, match=r"has codebook fingerprint \w+ \(32 codes, the prior was trained on 64\)"):
        run_sample_prior(prior, "--tokenizer", str(tmp_path / "tok32"))


def test_train_prior_stops_at_sigterm_with_a_checkpoint(tmp_path, fresh_accelerator_state):
    # SIGTERM killed the run outright, losing up to --checkpointing_steps - 1 steps.
    import signal

    token_set(32).save_to_disk(tmp_path / "tokens")
    train_prior = load_script("train_prior")
    finite = train_prior.weights_are_finite

    def terminated_in_step_one(model):
        os.kill(os.getpid(), signal.SIGTERM)  # noted by the handler: the step ends, then the run stops
        return finite(model)

    argv = prior_argv(tmp_path / "tokens", tmp_path / "prior", "--max_train_steps", "3", "--checkpointing_steps", "9")
    def unhandled(signum, frame):  # instead of the default, which would end the test session
        raise AssertionError("the SIGTERM reached the default handler")

    saved = signal.signal(signal.SIGTERM, unhandled)
    try:
        with mock.patch.object(train_prior, "weights_are_finite", terminated_in_step_one):
            with pytest.raises(train_prior.TrainingStopped, match="training stopped: SIGTERM at step 1.*checkpoint-1"):
                train_prior.main(train_prior.parse_args(argv))
        assert signal.getsignal(signal.SIGTERM) is unhandled  # the loop's own handler is gone again
    finally:
        signal.signal(signal.SIGTERM, saved)
    assert sorted(path.name for path in (tmp_path / "prior" / "checkpoints").iterdir()) == ["checkpoint-1"]
    assert not (tmp_path / "prior" / "model.safetensors").exists()


@pytest.mark.parametrize("script", ["train_prior.py", "sample_prior.py", "train.py"])
def test_ctrl_c_is_one_line(script, monkeypatch, capsys):
    # A 20-line KeyboardInterrupt traceback (e.g. ending in os.fsync inside save_checkpoint); the CLI printed one line.
    from cdb_tokenizer.tools.messages import run_script

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "argv", [str(ROOT / "training" / script)])
    with pytest.raises(SystemExit) as exit_info:
        run_script(interrupted, ValueError)
    assert exit_info.value.code == 130 and capsys.readouterr().err == f"{script}: interrupted\n"


def test_token_data_of_another_codebook_size_is_named_by_its_size(tmp_path):
    save_tokens(token_set(4), tmp_path / "tokens", tiny_model(codebook_size=8))
    with pytest.raises(ValueError, match="another tokenizer .*; 8 codes, the tokenizer given has 64\\)"):
        check_tokens_source(tmp_path / "tokens", tiny_model())


def test_a_failed_prior_run_leaves_no_folder_holding_only_its_lock(tmp_path, monkeypatch):
    # train_prior.main lost its @output_dir_claims() (it moved onto load_data): a run refused after claiming
    # --output_dir kept the folders it made, holding its lock file, and never released the lock in this process.
    from cdb_tokenizer.tools import files

    train_prior = load_script("train_prior")
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / "junk.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    args = train_prior.parse_args(["--tokens_dir", "tokens", "--codebook_size", "64", "--output_dir", "new/run",
                                   "--report_to", "none"])
    with pytest.raises(Exception, match="is not a tokenised data set"):
        train_prior.main(args)
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "new" / "run").resolve() not in files._claimed_output_dirs


def test_a_prior_output_dir_starting_with_a_tilde_is_in_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    args = load_script("train_prior").parse_args(["--codebook_size", "8", "--tokens_dir", "t", "--output_dir=~/prior"])
    assert args.output_dir == str(tmp_path / "home" / "prior")


def test_num_classes_without_labels_is_refused_not_ignored():
    # --num_classes on data with no label column trained an unconditional prior without a word.
    import argparse

    train_prior = load_script("train_prior")
    data = datasets.Dataset.from_dict({"image_tokens": [[0, 1, 2, 3]] * 4})
    with pytest.raises(ValueError, match="--num_classes 3, but the training data have no label column"):
        train_prior.make_vocabulary(argparse.Namespace(unconditional=False, num_classes=3), data, data, 8)
    vocabulary = train_prior.make_vocabulary(argparse.Namespace(unconditional=False, num_classes=None), data, data, 8)
    assert vocabulary.num_classes == 0


@pytest.mark.parametrize("content", ["empty", "images"])
def test_tokens_dir_that_is_no_tokenised_data_set_says_so(tmp_path, content):
    # An empty folder or a folder of images gave a warning that it was "made with save_to_disk", then datasets'
    # "Directory ... is neither a `Dataset` directory nor a `DatasetDict` directory".
    train_prior = load_script("train_prior")
    (tmp_path / "tokens").mkdir()
    if content == "images":
        Image.new("RGB", (8, 8)).save(tmp_path / "tokens" / "a.png")
    with pytest.raises(ValueError, match="is not a tokenised data set .*cdb-vq tokenize"):
        train_prior.main(train_prior.parse_args(prior_argv(tmp_path / "tokens", tmp_path / "prior")))

