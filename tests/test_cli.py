"""The `cdb-vq` command line on a tiny model and real photos: every command, and clear one-line errors."""

import itertools
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cdb_tokenizer import CDBVQImageProcessor, CDBVQModel
import cdb_tokenizer.tools.cli as cli_module
from cdb_tokenizer.tools.cli import main
from cdb_tokenizer.tools.data import load_image_dataset, sample_photos
from cdb_tokenizer.tools.files import saved_weights
from cdb_tokenizer.tools.publishing import model_files
from conftest import cli_error_line, hub_cache, tiny_model


CODE_ROLES = {"structure": [0, 24], "texture": [24, 64]}
LABELS = ["sky", "grass", "face", "fur", "metal", "water", "text", "stone"]
PHOTO_NAMES = ["astronaut", "chelsea", "coffee"]


def _save_tokenizer(model: CDBVQModel, folder: Path) -> Path:
    model.save_pretrained(folder)
    CDBVQImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A trained-looking tiny tokenizer, two other tokenizers, real photos and some non-images, all on disk."""
    root = tmp_path_factory.mktemp("cli")
    photos = sample_photos("skimage")
    processor = CDBVQImageProcessor(size={"height": 32, "width": 32})
    model = tiny_model(code_roles=CODE_ROLES)
    model.train()
    model(processor(photos[:6], return_tensors="pt").pixel_values)  # k-means init + usage statistics
    model.set_prototypes(torch.randn(8, 32), labels=LABELS)
    paths = {
        "model": _save_tokenizer(model.eval(), root / "model"),
        "same_size_model": _save_tokenizer(tiny_model(seed=1), root / "same_size_model"),
        "bigger_model": _save_tokenizer(tiny_model(seed=2, codebook_size=128), root / "bigger_model"),
    }
    (root / "photos").mkdir()
    for name, photo in zip(PHOTO_NAMES, photos):
        photo.save(root / "photos" / f"{name}.png")
    photos[3].save(root / "photos" / "hubble.jpg")
    (root / "notes.txt").write_text("not an image")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    save_file({"weights": torch.zeros(2)}, str(root / "other.safetensors"))
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37).save_pretrained(
        root / "bert"
    )
    return {"root": root, **paths}


def _photos(files) -> list[str]:
    return [str(files["root"] / "photos" / f"{name}.png") for name in PHOTO_NAMES]


def _expected_reconstructions(files) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixel values, tokens and reconstructions computed directly with the model, for comparison."""
    model = CDBVQModel.from_pretrained(files["model"]).eval()
    processor = CDBVQImageProcessor.from_pretrained(files["model"])
    pixel_values = processor([Image.open(path) for path in _photos(files)], return_tensors="pt").pixel_values
    with torch.no_grad():
        tokens = model.encode(pixel_values).image_tokens
        return pixel_values, tokens, model.decode(tokens)


def test_encode_then_decode_gives_the_same_images_as_reconstruct(files, tmp_path, capsys):
    tokens_file = tmp_path / "tokens.safetensors"
    assert (
        main(
            ["encode", *_photos(files), "--model", str(files["model"]), "--out", str(tokens_file), "--batch_size", "2"]
        )
        == 0
    )
    with safe_open(str(tokens_file), framework="pt") as handle:
        metadata, tokens = handle.metadata(), handle.get_tensor("image_tokens")
    pixel_values, expected_tokens, expected_images = _expected_reconstructions(files)
    assert torch.equal(tokens.long(), expected_tokens)  # batched over two batches, same tokens
    # The model folder relative to the token file (shared files carry no absolute path), resolved by decode.
    assert metadata["model"] == os.path.relpath(files["model"].resolve(), tmp_path.resolve()) and metadata["model"].startswith("../")
    assert metadata["model_name"] == "model"
    assert (metadata["codebook_size"], metadata["grid_height"], metadata["grid_width"]) == ("64", "8", "8")
    assert json.loads(metadata["images"]) == PHOTO_NAMES

    # decode takes the model from the file's metadata.
    assert main(["decode", str(tokens_file), "--out", str(tmp_path / "decoded")]) == 0
    assert (
        main(
            ["reconstruct", *_photos(files), "--model", str(files["model"]), "--out", str(tmp_path / "reconstructed")]
        )
        == 0
    )
    table = capsys.readouterr().out
    scores = json.loads((tmp_path / "reconstructed" / "psnr.json").read_text())
    expected_pngs = CDBVQImageProcessor().postprocess(expected_images, return_tensors="np").pixel_values

    from torchmetrics.functional.image import peak_signal_noise_ratio

    for index, name in enumerate(PHOTO_NAMES):
        decoded = np.asarray(Image.open(tmp_path / "decoded" / f"{name}.png"))
        reconstructed = np.asarray(Image.open(tmp_path / "reconstructed" / "reconstructions" / f"{name}.png"))
        assert decoded.shape == (32, 32, 3)
        np.testing.assert_array_equal(decoded, reconstructed)
        np.testing.assert_array_equal(decoded, expected_pngs[index])
        pair = np.asarray(Image.open(tmp_path / "reconstructed" / f"{name}.png"))
        assert pair.shape == (32, 64, 3)  # original beside reconstruction
        np.testing.assert_array_equal(pair[:, 32:], decoded)
        # PSNR per image, with the definition `cdb-vq eval` uses (torchmetrics, data range 1).
        original, reconstruction = (pixel_values[index] + 1) / 2, ((expected_images[index] + 1) / 2).clamp(0, 1)
        expected_psnr = float(peak_signal_noise_ratio(reconstruction, original, data_range=1.0))
        assert scores["images"][name] == pytest.approx(expected_psnr, abs=1e-3)
        assert f"{name}" in table and f"{scores['images'][name]:.2f}" in table
    # The set's PSNR pools the error over every pixel, as `cdb-vq eval` does (not the mean of the per-image dBs).
    pooled = peak_signal_noise_ratio(((expected_images + 1) / 2).clamp(0, 1), (pixel_values + 1) / 2, data_range=1.0)
    assert scores["all"] == pytest.approx(float(pooled), abs=1e-3)
    assert f"all {float(pooled):.2f}".split() in [line.split() for line in table.splitlines()]
    assert scores["mean"] == pytest.approx(sum(scores["images"].values()) / len(scores["images"]))  # kept for scripts


def test_console_script_and_dtype(files, tmp_path):
    """One real `cdb-vq` process; bfloat16 tokens keep the float32 model's fingerprint, so they decode with it."""
    executable = shutil.which("cdb-vq")
    assert executable, "the cdb-vq console script is not installed (pip install -e .)"
    tokens_file = tmp_path / "bf16.safetensors"
    result = subprocess.run(
        [executable, "encode", _photos(files)[0], "--model", str(files["model"]), "--out", str(tokens_file),
         "--dtype", "bfloat16", "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote 1 image x 8x8 tokens" in result.stdout
    assert main(["decode", str(tokens_file), "--model", str(files["model"]), "--out", str(tmp_path / "out")]) == 0
    assert Image.open(tmp_path / "out" / "astronaut.png").size == (32, 32)


def test_a_reader_that_closes_early_ends_the_command_quietly(files, tmp_path):
    # `cdb-vq encode ... | true`: the files were written, then the last print met the closed pipe, which was
    # "error: [Errno 32] Broken pipe" and exit status 1.
    tokens_file = tmp_path / "tokens.safetensors"
    command = [sys.executable, "-m", "cdb_tokenizer.cli", "encode", _photos(files)[0], "--model", str(files["model"]),
               "--out", str(tokens_file)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # the reader is gone before anything is printed
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 141 and "error" not in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert tokens_file.is_file()


def test_a_broken_pipe_elsewhere_is_an_error(files, monkeypatch, capsys):
    # Not the reader of stdout (a socket during a download, say): that failure is reported, not taken for `| head`.
    def broken(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe (socket)")

    monkeypatch.setattr(cli_module, "load_model_of", broken)
    assert main(["inspect", "--model", str(files["model"])]) == 1
    assert "Broken pipe (socket)" in cli_error_line(capsys, "inspect")


def test_eval_prints_table_and_json_and_skips_unreadable_images(files, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(files["root"] / "photos", data)
    shutil.copy(files["root"] / "broken.png", data / "broken.png")
    out = tmp_path / "metrics.json"
    assert (
        main(["eval", "--model", str(files["model"]), "--data", str(data), "--batch_size", "2", "--out", str(out)])
        == 0
    )
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    metrics = json.loads(lines[-1])
    assert metrics == json.loads(out.read_text())
    assert (metrics["num_images"], metrics["unreadable_images"]) == (4, 1)
    assert "skipping unreadable image" in captured.err and "broken.png (Truncated File Read)" in captured.err  # named, and why
    assert any(line.startswith("PSNR (dB)") and f"{metrics['psnr']:.2f}" in line for line in lines)

    # The same numbers as cdb_tokenizer.tools.evaluation.evaluate on the readable photos.
    from cdb_tokenizer.tools.evaluation import evaluate

    processor = CDBVQImageProcessor(size={"height": 32, "width": 32})
    paths = sorted(data.glob("*.png")) + sorted(data.glob("*.jpg"))
    pixel_values = processor(
        [Image.open(path) for path in paths if path.name != "broken.png"], return_tensors="pt"
    ).pixel_values
    expected = evaluate(CDBVQModel.from_pretrained(files["model"]), [pixel_values], show_progress=False)
    for key in ("psnr", "ssim", "utilization", "perplexity"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-3), key


def test_inspect_reports_roles_usage_and_labels(files, capsys):
    assert main(["inspect", "--model", str(files["model"]), "--top", "5"]) == 0
    text = capsys.readouterr().out
    assert "64 codes x 8 dims" in text and "cdb" in text and "32x32 -> 8x8" in text
    assert "structure" in text and "[24, 64)" in text

    assert main(["inspect", "--model", str(files["model"]), "--top", "5", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    model = CDBVQModel.from_pretrained(files["model"])
    usage = model.quantizer.usage / model.quantizer.usage.sum()
    assert [role["name"] for role in summary["roles"]] == ["structure", "texture"]
    assert summary["roles"][0]["usage"] == pytest.approx(float(usage[:24].sum()), abs=1e-6)
    assert sum(role["usage"] for role in summary["roles"]) == pytest.approx(1.0, abs=1e-5)
    top = summary["top_codes"]
    assert len(top) == 5 and [code["usage"] for code in top] == sorted((code["usage"] for code in top), reverse=True)
    assert top[0]["code"] == int(usage.argmax())
    labels = model.code_prototype_labels()
    assert all(code["tied_label"] == labels[code["code"]] and code["tied_label"] in LABELS for code in top)


def test_a_mistyped_flag_of_a_command_is_answered_with_the_closest_one(capsys):
    # The top-level parser reports a sub-command's unknown flags: the guesses come from the sub-commands' flags.
    with pytest.raises(SystemExit):
        main(["encode", "a.png", "--model", "m", "--out", "t.safetensors", "--ovewrite"])
    assert "unrecognized arguments: --ovewrite (did you mean --overwrite?)" in capsys.readouterr().err


def test_output_paths_starting_with_a_tilde_are_in_the_home_folder(files, tmp_path, monkeypatch):
    # No shell expands the `~` of `--out=~/x`: the folders were made under the home folder while the checks looked at
    # a literal `~` folder, and the command was refused as "not writable" (or wrote into ./~).
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    photo = _photos(files)[0]
    assert main(["encode", photo, "--model", str(files["model"]), "--out=~/runs/tokens.safetensors"]) == 0
    assert main(["reconstruct", photo, "--model", str(files["model"]), "--out=~/runs/pictures"]) == 0
    assert (tmp_path / "home" / "runs" / "tokens.safetensors").is_file()
    assert any((tmp_path / "home" / "runs" / "pictures").iterdir())
    assert not (tmp_path / "~").exists()


def test_a_model_saved_with_return_dict_false_still_works_with_every_command(files, tmp_path):
    # config.return_dict decides what forward/encode return when the call does not; the tools must not care.
    model = tiny_model()
    model.config.return_dict = False
    folder = _save_tokenizer(model, tmp_path / "tuple_model")
    photo = _photos(files)[0]
    assert main(["encode", photo, "--model", str(folder), "--out", str(tmp_path / "tokens.safetensors")]) == 0
    assert main(["reconstruct", photo, "--model", str(folder), "--out", str(tmp_path / "reconstructed")]) == 0
    assert main(["eval", "--model", str(folder), "--data", str(files["root"] / "photos")]) == 0


def test_reconstruct_pools_images_of_several_sizes_by_their_pixels(files, tmp_path, capsys):
    # A processor that does not resize keeps each image's size: the set's PSNR must weigh each by its pixels.
    from torchmetrics.functional.image import peak_signal_noise_ratio

    folder = tmp_path / "model"
    tiny_model().save_pretrained(folder)
    CDBVQImageProcessor(do_resize=False, do_center_crop=False).save_pretrained(folder)
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    Image.open(_photos(files)[0]).resize((32, 32)).save(small)
    Image.open(_photos(files)[1]).resize((64, 96)).save(large)
    argv = ["reconstruct", str(small), str(large), "--model", str(folder), "--out", str(tmp_path / "out"), "--batch_size", "1"]
    # Batched together they cannot be: the message says what to do on the command line.
    assert main(argv[:-2]) == 1
    line = cli_error_line(capsys, "reconstruct")
    assert "does not resize, and one batch holds images of different sizes" in line and "--batch_size 1" in line
    assert main(argv) == 0
    scores = json.loads((tmp_path / "out" / "psnr.json").read_text())
    squared = []
    for name in ("small", "large"):
        pair = np.asarray(Image.open(tmp_path / "out" / f"{name}.png")).astype(np.float64) / 255
        half = pair.shape[1] // 2
        squared.append(((pair[:, :half] - pair[:, half:]) ** 2).ravel())
    pooled = 10 * np.log10(1 / np.concatenate(squared).mean())
    assert scores["all"] == pytest.approx(pooled, abs=0.05)  # from the 8-bit PNGs, so not to the last digit


def test_a_checkpoint_a_run_or_a_prior_given_as_model_is_named_with_what_to_give(tmp_path, capsys):
    # "has no config.json: it is not a saved model folder" for a checkpoint that holds the very weights wanted.
    from cdb_tokenizer.tools.checkpoints import MANIFEST
    from cdb_tokenizer.tools.priors.model import PRIOR_CONFIG_NAME

    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-800"
    checkpoint.mkdir(parents=True)
    (checkpoint / MANIFEST).write_text('{"step": 800}')
    (tmp_path / "prior").mkdir()
    (tmp_path / "prior" / PRIOR_CONFIG_NAME).write_text("{}")
    (tmp_path / "empty").mkdir()
    expected = {
        checkpoint: "it is a training checkpoint, not a saved model (a run saves its model in its --output_dir when "
                    "it ends; one that stopped early saves it when run again with its flags, "
                    "--resume_from_checkpoint latest and --max_train_steps at its last checkpoint's step).",
        checkpoint.parent: "it holds training checkpoints (checkpoint-800), not a saved model",
        tmp_path / "run": "it holds training checkpoints (checkpoints/checkpoint-800), not a saved model",
        tmp_path / "prior": "is a prior (train_prior.py), not a tokenizer; sample it with training/sample_prior.py",
        tmp_path / "empty": "has no config.json: it is not a saved model folder.",
    }  # fmt: skip
    for folder, words in expected.items():
        assert main(["inspect", "--model", str(folder)]) == 1
        assert words in cli_error_line(capsys, "inspect")


def test_a_saved_prior_given_as_model_is_named_as_a_prior(tmp_path, capsys):
    # save_prior writes the LM's config.json, so a real prior never reached the prior's words: "is a 'llama' model";
    # and train_prior.py keeps its last checkpoint in the prior's folder, which read as a tokenizer's run.
    from cdb_tokenizer.tools.files import CHECKPOINT_MANIFEST
    from cdb_tokenizer.tools.priors import PriorVocabulary, build_prior, save_prior

    vocabulary = PriorVocabulary(8)
    prior = save_prior(build_prior(vocabulary, 4, hidden_size=32, num_layers=2, num_heads=2), vocabulary,
                       tmp_path / "prior", 4)  # fmt: skip
    (prior / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (prior / "checkpoints" / "checkpoint-2" / CHECKPOINT_MANIFEST).write_text('{"step": 2}')
    assert main(["inspect", "--model", str(prior)]) == 1
    assert "is a prior (train_prior.py), not a tokenizer; sample it with" in cli_error_line(capsys, "inspect")


def test_inspect_shows_no_placeholder_roles_or_prototype_ties(tmp_path, capsys):
    # A model without roles printed a table of one pseudo-role, and one without prototypes listed each code's
    # placeholder tie (code id modulo num_prototypes) as if it meant something.
    model = tiny_model().train()
    model(torch.rand(2, 3, 32, 32) * 2 - 1)
    model.eval().save_pretrained(tmp_path / "plain")
    assert main(["inspect", "--model", str(tmp_path / "plain"), "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert "code roles: none" in text and "[0, 64)" not in text
    assert main(["inspect", "--model", str(tmp_path / "plain"), "--top", "3", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [code["tied_prototype"] for code in summary["top_codes"]] == [None] * 3
    # No placeholder role either (a real role could be named `all`): none, as code_report() and --codes say.
    assert summary["roles"] == [] and [code["role"] for code in summary["top_codes"]] == [None] * 3


def test_tokenize_saves_a_dataset_with_tokens_and_labels(files, tmp_path, capsys, monkeypatch, caplog):
    import datasets

    import cdb_tokenizer.tools.data as data_module
    import cdb_tokenizer.tools.priors.token_data as token_data

    reads = []
    decode_image = data_module.decode_image
    for module in (data_module, token_data):  # wherever an image is decoded
        monkeypatch.setattr(module, "decode_image", lambda value, **kw: reads.append(1) or decode_image(value, **kw))

    data = tmp_path / "classes"
    for label, names in {"animal": ["chelsea"], "person": ["astronaut", "coffee"]}.items():
        (data / label).mkdir(parents=True)
        for name in names:
            shutil.copy(files["root"] / "photos" / f"{name}.png", data / label / f"{name}.png")
    shutil.copy(files["root"] / "broken.png", data / "person" / "broken.png")
    out = tmp_path / "tokenized"
    with caplog.at_level("WARNING"):
        assert (
            main(["tokenize", "--model", str(files["model"]), "--data", str(data), "--out", str(out), "--batch_size", "2"])
            == 0
        )
    assert "1 unreadable skipped" in capsys.readouterr().out
    assert "Skipping unreadable image" in caplog.text and "broken.png (Truncated File Read)" in caplog.text  # why
    assert len(reads) == 4  # each image read once (a check pass used to read them all first)

    tokenized = datasets.load_from_disk(str(out))
    assert tokenized.column_names == ["image_tokens", "source_index", "label"]
    assert tokenized.features["label"].names == ["animal", "person"]
    _, expected_tokens, _ = _expected_reconstructions(files)
    expected = {name: tokens.flatten().tolist() for name, tokens in zip(PHOTO_NAMES, expected_tokens)}
    rows = sorted((row["label"], row["image_tokens"]) for row in tokenized)
    assert rows == sorted([(0, expected["chelsea"]), (1, expected["astronaut"]), (1, expected["coffee"])])
    # Each row names the image it came from (the rows closed up over broken.png).
    source = load_image_dataset(train_data_dir=str(data))
    for row in tokenized:
        assert row["image_tokens"] == expected[Path(source[row["source_index"]]["image"]["path"]).stem]


def test_tokenize_refuses_an_out_another_run_writes_to(files, tmp_path, capsys):
    # Two tokenize runs into one --out wrote the same shard names into it at once, and the last TOKENS_INFO won.
    import datasets
    from filelock import FileLock

    from cdb_tokenizer.tools.files import OUTPUT_DIR_LOCK

    out = tmp_path / "tokenized"
    out.mkdir()
    command = ["tokenize", "--model", str(files["model"]), "--data", str(files["root"] / "photos"), "--out", str(out)]
    other_run = FileLock(out / OUTPUT_DIR_LOCK, timeout=0)
    other_run.acquire()
    try:
        assert main(command) == 1
        assert f"Another run is writing to --out {out} now" in cli_error_line(capsys, "tokenize")
        assert [path.name for path in out.iterdir()] == [OUTPUT_DIR_LOCK]
    finally:
        other_run.release()
    # A folder of the user's that tokenize refuses is left as it was: no lock file of ours in it.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert main([*command[:-1], str(mine)]) == 1
    assert "with other files in it" in cli_error_line(capsys, "tokenize")
    assert [path.name for path in mine.iterdir()] == ["notes.txt"]
    # The lock file a finished run (or a crash) left is no "other file": the folder is free, and stays reusable.
    for _ in range(2):
        assert main(command) == 0, capsys.readouterr().err
        assert len(datasets.load_from_disk(str(out))) == len(list((files["root"] / "photos").iterdir()))
    capsys.readouterr()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (
            ["encode", "{root}/missing.png", "--model", "{model}", "--out", "{tmp}/t.safetensors"],
            "missing.png: no such file",
        ),
        (
            ["encode", "{root}/notes.txt", "--model", "{model}", "--out", "{tmp}/t.safetensors"],
            "notes.txt: not an image file",
        ),
        (
            ["reconstruct", "{root}/photos", "--model", "{model}", "--out", "{tmp}/r"],
            "is a directory, not an image file",
        ),
        (
            ["reconstruct", "{root}/broken.png", "--model", "{model}", "--out", "{tmp}/r"],
            "broken.png: not an image file",
        ),
        (["decode", "{root}/notes.txt", "--out", "{tmp}/d"], "not a safetensors file"),
        (["decode", "{root}/other.safetensors", "--out", "{tmp}/d"], "not a cdb-vq token file"),
        (
            ["decode", "{tokens}", "--model", "{same_size_model}", "--out", "{tmp}/d"],
            "encoded with a different codebook",
        ),
        (["decode", "{tokens}", "--model", "{bigger_model}", "--out", "{tmp}/d"], "different codebook (64 codes"),
        (["inspect", "--model", "not a model id!"], "no such folder, nor a Hub id (owner/name)"),
        (["inspect", "--model", "not an/id!"], "neither a local folder nor a valid Hub id (owner/name)"),
        (["inspect", "--model", "mytokenizer"], "'mytokenizer': no such folder, nor a Hub id (owner/name)"),
        (["inspect", "--model", "./no/such/folder"], "no such folder"),
        (["inspect", "--model", "{root}/notes.txt"], "is a file"),
        (["inspect", "--model", "{root}/photos"], "has no config.json"),
        (["inspect", "--model", "{root}/bert"], "is a 'bert' model, not a cdb-vq tokenizer"),
        (["eval", "--model", "{model}", "--data", "{root}/missing_folder"], "no such folder"),
        (["eval", "--model", "{model}", "--data", "{root}/notes.txt"], "notes.txt: is a file; give the folder of images"),
        (["decode", "{root}/photos", "--out", "{tmp}/d"], "photos: is a folder, not a token file"),
    ],
)
def test_errors_are_one_clear_line(files, tmp_path, capsys, arguments, message):
    tokens = tmp_path / "tokens.safetensors"
    if "{tokens}" in arguments:
        assert main(["encode", _photos(files)[0], "--model", str(files["model"]), "--out", str(tokens)]) == 0
        capsys.readouterr()
    values = {key: str(value) for key, value in files.items()} | {"tmp": str(tmp_path), "tokens": str(tokens)}
    assert main([argument.format(**values) for argument in arguments]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"cdb-vq {arguments[0]}: error: ") and message in error
    assert "Traceback" not in error


def test_output_names_keep_letters_of_any_script_and_a_broken_link_is_no_missing_file(files, tmp_path, capsys):
    # 写真.png and фото.png became "_" and "_-1": the outputs could not be told apart. A link loop given as an input
    # was "no such file".
    from cdb_tokenizer.tools.cli import safe_name

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("写真", "фото", "café"):
        shutil.copy(_photos(files)[0], photos / f"{name}.png")
    assert main(["reconstruct", *sorted(map(str, photos.iterdir())), "--model", str(files["model"]), "--out", str(tmp_path / "r")]) == 0
    assert {path.name for path in (tmp_path / "r").glob("*.png")} >= {"写真.png", "фото.png", "café.png"}
    assert safe_name("../../写真\u202e", "x") == "写真_" and len(safe_name("写" * 100, "x").encode()) <= 200
    assert safe_name("किताब", "x") != safe_name("कीताब", "x")  # vowel signs are marks, not letters: they stay
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    capsys.readouterr()
    assert main(["encode", str(tmp_path / "loop"), "--model", str(files["model"]), "--out", str(tmp_path / "t.safetensors")]) == 1
    assert "loop: a broken symbolic link (or a link loop)." in capsys.readouterr().err


def test_a_damaged_model_folder_is_named_as_such(files, tmp_path, capsys):
    # "is a None model" for a config.json without model_type; safetensors' "header too small" for a cut weights file.
    folder = tmp_path / "model"
    shutil.copytree(files["model"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({key: value for key, value in config.items() if key != "model_type"}))
    assert main(["inspect", "--model", str(folder)]) == 1
    assert "its config.json has no model_type" in cli_error_line(capsys, "inspect")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:5])
    assert main(["inspect", "--model", str(folder)]) == 1
    line = cli_error_line(capsys, "inspect")
    assert "its weights file (model.safetensors) is damaged or incomplete" in line, line


def test_unknown_hub_model_fails_fast_offline(monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["inspect", "--model", "cdb-org/no-such-model"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    # Not huggingface_hub's "Please check your connection": the user turned the network off on purpose.
    assert error == ("cdb-vq inspect: error: could not load model 'cdb-org/no-such-model': it is not in the Hugging "
                     "Face cache, and HF_HUB_OFFLINE is set.")  # fmt: skip


def test_an_unreachable_hub_is_one_line(monkeypatch, tmp_path, capsys):
    # Without network, huggingface_hub logged its failed request, then the CLI its error: two lines. Only the network
    # call is replaced: it fails as a DNS failure does.
    import logging
    import logging.handlers

    import huggingface_hub.constants
    import huggingface_hub.file_download as file_download

    def unreachable(url, *args, **kwargs):
        logging.getLogger("huggingface_hub.utils._http").warning(f"'[Errno -2] Name or service not known' thrown while requesting HEAD {url}")
        raise file_download.httpx2.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(file_download, "get_hf_file_metadata", unreachable)
    shown = logging.handlers.BufferingHandler(capacity=100)  # where huggingface_hub prints (its stderr handler)
    monkeypatch.setattr(logging.getLogger("huggingface_hub"), "handlers", [shown])
    assert main(["inspect", "--model", "cdb-org/cdb-vq"]) == 1
    assert [record.getMessage() for record in shown.buffer] == []  # held back: the error line says what matters
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("cdb-vq inspect: error: could not load model 'cdb-org/cdb-vq'")
    assert "check your connection" in lines[0]  # huggingface_hub's own words: the Hub cannot be reached


def test_an_unreachable_hub_data_set_is_one_line(files, monkeypatch, capsys):
    # --data org/name offline printed huggingface_hub's retry log (11 lines over ~30 s) before the error, where
    # --model held it back. Only the network-bound call is replaced: it logs and fails as an unreachable Hub does.
    import logging
    import logging.handlers

    import datasets

    def unreachable(*args, **kwargs):
        logging.getLogger("huggingface_hub.utils._http").warning("'[Errno -2] Name or service not known' thrown while requesting HEAD ...")
        raise ConnectionError("Couldn't reach 'cdb-org/photos' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    shown = logging.handlers.BufferingHandler(capacity=100)
    monkeypatch.setattr(logging.getLogger("huggingface_hub"), "handlers", [shown])
    assert main(["eval", "--model", str(files["model"]), "--data", "cdb-org/photos", "--no-lpips"]) == 1
    assert [record.getMessage() for record in shown.buffer] == []
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["cdb-vq eval: error: could not open --data cdb-org/photos: Couldn't reach 'cdb-org/photos' on the Hub (LocalEntryNotFoundError)"]


def test_usage_errors_exit_non_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["encode", "photo.png"])  # --model and --out missing
    assert exit_info.value.code == 2
    assert "--model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["encode", "photo.png", "--model", "m", "--out", "t.safetensors", "--batch_size", "1.5"])
    assert exit_info.value.code == 2  # named by its flag, not by the parser's function ("invalid _positive_int value")
    assert "argument --batch_size: must be a whole number, got '1.5'" in capsys.readouterr().err
    # One line each, naming the command and where the options are listed (the usage block came first).
    for argv, line in ((["encode", "photo.png"], "cdb-vq encode: error: the following arguments are required: --model, --out (see cdb-vq encode --help)"),
                       ([], "cdb-vq: error: the following arguments are required: COMMAND (see cdb-vq --help)")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and capsys.readouterr().err.splitlines() == [line]


def test_a_sigterm_removes_the_output_folders_the_command_made(files, tmp_path, monkeypatch, capsys):
    # A `kill` ended the command at once, leaving the folders --out's check had made; Ctrl-C removed them.
    import signal

    import cdb_tokenizer.tools.cli as cli

    def killed(args):
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("a SIGTERM did not end the command")

    monkeypatch.setattr(cli, "load_model_of", killed)
    out = tmp_path / "new" / "sub" / "tokens.safetensors"
    before = signal.getsignal(signal.SIGTERM)
    assert main(["encode", _photos(files)[0], "--model", str(files["model"]), "--out", str(out)]) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == "cdb-vq encode: terminated"
    assert not (tmp_path / "new").exists()
    assert signal.getsignal(signal.SIGTERM) is before


def test_loading_a_tokenizer_imports_no_prior_code(files):
    code = (
        "import sys; from cdb_tokenizer.tools.cli import main; "
        f"assert main(['inspect', '--model', {str(files['model'])!r}]) == 0; "
        "assert not [m for m in sys.modules if m.startswith('cdb_tokenizer.tools.priors')], 'prior code was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize(
    "arguments",
    [
        ["encode", "{photo}", "--model", "{model}", "--out", "{tmp}/newdir/"],
        ["eval", "--model", "{model}", "--data", "{root}/photos", "--out", "{tmp}/newdir/"],
        ["eval", "--model", "{model}", "--data", "{root}/photos", "--fid", "--fid_feature_extractor", "random",
         "--fid_reference", "{tmp}/newdir/"],
        ["inspect", "--model", "{model}", "--codes", "{tmp}/newdir/"],
    ],  # fmt: skip
)
def test_an_output_file_named_like_a_folder_is_refused(files, tmp_path, capsys, arguments):
    values = {"photo": _photos(files)[0], "tmp": str(tmp_path)} | {key: str(files[key]) for key in ("model", "root")}
    assert main([argument.format(**values) for argument in arguments]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "newdir/ names a folder; give a file name such as" in error
    assert not (tmp_path / "newdir").exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["encode", "{photo}", "--model", "{model}", "--out", "{tmp}/tokens.png"],
         "tokens.png names an image file, but this writes a safetensors file; give a name such as tokens.safetensors"),
        (["eval", "--model", "{model}", "--data", "{root}/photos", "--out", "{tmp}/metrics.csv"],
         "metrics.csv names a CSV file, but this writes a JSON file; give a name such as metrics.json"),
    ],  # fmt: skip
)
def test_an_output_file_named_as_another_kind_of_file_is_refused(files, tmp_path, capsys, arguments, message):
    # `encode --out tokens.png` wrote a safetensors file under an image's name without a word.
    values = {"photo": _photos(files)[0], "tmp": str(tmp_path)} | {key: str(files[key]) for key in ("model", "root")}
    assert main([argument.format(**values) for argument in arguments]) == 1
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "arguments",
    [["inspect", "--model", "outputs/nope"], ["eval", "--model", "unused", "--data", "outputs/nope"]],
)
def test_a_mistyped_local_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch, capsys, arguments):
    """`outputs/nope` where `outputs/` is a local folder: "no such folder" at once, no Hub look-up."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # a Hub look-up fails at once, too
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    assert main(arguments) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "outputs/nope" in error and "no such folder" in error, error


def test_refused_commands_leave_no_folders_behind(files, tmp_path, capsys):
    tokens = tmp_path / "tokens.safetensors"
    assert main(["encode", _photos(files)[0], "--model", str(files["model"]), "--out", str(tokens)]) == 0
    existing = tmp_path / "existing"
    existing.mkdir()
    refused = [
        ["decode", str(tokens), "--model", str(files["same_size_model"]), "--out", str(tmp_path / "dec" / "sub")],
        ["reconstruct", _photos(files)[0], "--model", str(files["same_size_model"]), "--out", str(tmp_path / "recon"),
         "--role-map"],
        ["reconstruct", _photos(files)[0], "--model", str(files["same_size_model"]), "--out", str(existing),
         "--role-map"],
        ["restore", _photos(files)[0], "--model", str(files["model"]), "--out", str(tmp_path / "restored")],
        ["encode", _photos(files)[0], "--model", str(tmp_path / "no_model"), "--out", str(tmp_path / "new" / "t.st")],
    ]  # fmt: skip
    for arguments in refused:
        assert main(arguments) == 1, arguments
    assert sorted(path.name for path in tmp_path.iterdir()) == ["existing", "tokens.safetensors"]
    assert not list(existing.iterdir())  # a folder that was there before stays (empty)


def test_weights_that_do_not_fit_the_config_are_named_in_one_line(files, tmp_path, capsys, caplog):
    import logging.handlers

    folder = tmp_path / "edited"
    shutil.copytree(files["same_size_model"], folder)  # no code_roles: only the weights disagree
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "codebook_size": 32}))
    # What reaches transformers' own handlers (its stderr stream is bound before pytest's capture).
    shown = logging.handlers.BufferingHandler(capacity=1000)
    logging.getLogger("transformers").addHandler(shown)
    try:
        assert main(["inspect", "--model", str(folder)]) == 1
        assert not any("LOAD REPORT" in record.getMessage() for record in shown.buffer)  # the table stays off stderr
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith(
            f"cdb-vq inspect: error: the weights in {folder} do not fit its config.json: quantizer.codebook.weight is "
            f"(64, 8) in the file but (32, 8) for the config"
        ), line

        # A weight missing from the file would start at random (every command ran on, exit status 0): refused.
        (folder / "config.json").write_text(json.dumps(config))
        weights = load_file(folder / "model.safetensors")
        bias = weights.pop("decoder.conv_in.bias")
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
        assert main(["inspect", "--model", str(folder)]) == 1
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert "parameters are missing (e.g. decoder.conv_in.bias), and would start at random" in line, line

        # A model that loads says what its file holds beyond the model, in one line (transformers' table stays off).
        save_file({**weights, "decoder.conv_in.bias": bias, "stray.weight": torch.zeros(2)}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})  # fmt: skip
        with caplog.at_level("WARNING"):
            assert main(["inspect", "--model", str(folder)]) == 0
        assert "holds tensors this model does not have (stray.weight), which are ignored" in caplog.text
        assert not any("LOAD REPORT" in record.getMessage() for record in shown.buffer)
    finally:
        logging.getLogger("transformers").removeHandler(shown)


def test_a_stale_model_safetensors_beside_shards_is_the_file_checked(files, tmp_path, capsys):
    """transformers loads model.safetensors before a shard index, so a stale one left beside the shards of a later,
    resized save is what fails to load: the diagnosis compares that file, and publishing takes it, not the shards."""
    folder = tmp_path / "resized"
    tiny_model(seed=3, codebook_size=32).save_pretrained(folder, max_shard_size="600KB")
    CDBVQImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    shutil.copy(files["same_size_model"] / "model.safetensors", folder)  # 64 codes, from an earlier save
    assert saved_weights(folder) == [folder / "model.safetensors"]
    assert [path.name for path in model_files(folder) if ".safetensors" in path.name] == ["model.safetensors"]
    assert main(["inspect", "--model", str(folder)]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "quantizer.codebook.weight is (64, 8) in the file but (32, 8) for the config" in line, line

    # Without it, the index and its shards; a shard the index lists and the folder lacks is named.
    (folder / "model.safetensors").unlink()
    assert saved_weights(folder) == [folder / "model.safetensors.index.json", *shards]
    assert main(["inspect", "--model", str(folder)]) == 0
    shards[0].unlink()
    with pytest.raises(FileNotFoundError, match=f"lists {shards[0].name}, which is not in"):
        saved_weights(folder)


def test_written_files_get_the_permissions_of_the_umask(files, tmp_path):
    old = os.umask(0o027)
    try:
        tokens = tmp_path / "tokens.safetensors"
        assert main(["encode", _photos(files)[0], "--model", str(files["model"]), "--out", str(tokens)]) == 0
        assert main(["decode", str(tokens), "--out", str(tmp_path / "decoded")]) == 0
    finally:
        os.umask(old)
    for path in (tokens, tmp_path / "decoded" / "astronaut.png"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640, path


def test_every_multi_word_option_takes_both_spellings(files, tmp_path):
    import argparse

    from cdb_tokenizer.tools.cli import build_parser

    parser = build_parser()
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    for name, command in commands.choices.items():
        help_text = command.format_help()
        for action in command._actions:
            for option in (option for option in action.option_strings if option.startswith("--")):
                for spelling in ("--" + option[2:].replace("-", "_"), "--" + option[2:].replace("_", "-")):
                    assert command._option_string_actions.get(spelling) is action, (name, spelling)
                    assert spelling == option or spelling not in help_text, (name, spelling)  # one spelling shown
    # An abbreviation of one option is not ambiguous between its two spellings.
    assert parser.parse_args(["encode", "a.png", "--model", "m", "--out", "t", "--batch", "3"]).batch_size == 3
    tokens = tmp_path / "tokens.safetensors"
    arguments = ["--model", str(files["model"]), "--batch-size", "2", "--max-image-pixels", "0", "--dtype", "float32"]
    assert main(["encode", *_photos(files), "--out", str(tokens), *arguments]) == 0
    assert main(["reconstruct", *_photos(files), "--out", str(tmp_path / "r"), "--role_map", *arguments]) == 0


def test_inspect_codes_is_a_csv_or_json_file(files, tmp_path, capsys):
    assert main(["inspect", "--model", str(files["model"]), "--codes", str(tmp_path / "codes.txt")]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "codes.txt is neither a .csv nor a .json file name" in error, error
    assert not (tmp_path / "codes.txt").exists()
    for name in ("codes.csv", "codes.JSON"):
        assert main(["inspect", "--model", str(files["model"]), "--codes", str(tmp_path / name)]) == 0
    assert (tmp_path / "codes.csv").read_text().startswith("code,usage,role")
    assert len(json.loads((tmp_path / "codes.JSON").read_text())) == 64


def test_inspect_codes_csv_keeps_a_downloaded_label_from_running_as_a_formula(files, tmp_path):
    # Labels come from the model's config.json: "=HYPERLINK(...)" became a live formula in a spreadsheet.
    import csv

    folder = tmp_path / "model"
    shutil.copytree(files["model"], folder)
    config = json.loads((folder / "config.json").read_text())
    labels = ["=HYPERLINK(\"http://x\")", "@SUM(A1)", "-1+2", "plain, with a comma"]
    config["prototype_labels"] = (labels * config["num_prototypes"])[: config["num_prototypes"]]
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["inspect", "--model", str(folder), "--codes", str(tmp_path / "codes.csv")]) == 0
    with open(tmp_path / "codes.csv", newline="") as handle:
        cells = {row["prototype_label"] for row in csv.DictReader(handle)}
    assert cells and cells <= {"'=HYPERLINK(\"http://x\")", "'@SUM(A1)", "'-1+2", "plain, with a comma"}
    assert main(["inspect", "--model", str(folder), "--codes", str(tmp_path / "codes.json")]) == 0
    assert {record["prototype_label"] for record in json.loads((tmp_path / "codes.json").read_text())} <= set(labels)


def test_inspect_prints_a_downloaded_label_without_its_control_characters(files, tmp_path, capsys):
    # Labels come from the model's config.json: escape sequences reached the terminal as they were (clear the
    # screen, retitle the window), and a newline faked a row of the table.
    folder = tmp_path / "model"
    shutil.copytree(files["model"], folder)
    config = json.loads((folder / "config.json").read_text())
    labels = ["cat\x1b[2J\x1b]0;title\x07", "dog\nfake row"]
    config["prototype_labels"] = (labels * config["num_prototypes"])[: config["num_prototypes"]]
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["inspect", "--model", str(folder), "--top", "64"]) == 0
    text = capsys.readouterr().out
    assert "\x1b" not in text and "\x07" not in text and "\nfake row" not in text
    assert "cat\\x1b[2J\\x1b]0;title\\x07" in text and "dog\\nfake row" in text


# ------------------------------------------------------------------------------------------------ review fixes


def _restoration_model(files) -> Path:
    folder = files["root"] / "restoration_model"
    if not folder.exists():
        _save_tokenizer(tiny_model(seed=3, restoration_degradation="gaussian_blur:0.5-2"), folder)
    return folder


def _tokens(files, tmp_path: Path, name: str = "tokens.safetensors", **metadata) -> Path:
    """A token file of the first photo written by `encode`, with metadata changed (None: removed)."""
    path = tmp_path / name
    assert main(["encode", _photos(files)[0], "--model", str(files["model"]), "--out", str(path)]) == 0
    with safe_open(str(path), framework="pt") as handle:
        original, tokens = handle.metadata(), handle.get_tensor("image_tokens")
    changed = {key: value for key, value in {**original, **metadata}.items() if value is not None}
    save_file({"image_tokens": tokens}, str(path), metadata=changed)
    return path


def test_outputs_never_replace_the_inputs(files, tmp_path, capsys):
    victim = tmp_path / "victim"
    shutil.copytree(files["root"] / "photos", victim)
    photo = victim / "astronaut.png"
    os.link(photo, tmp_path / "hard_link.png")  # the same file under another name
    tokens = _tokens(files, tmp_path)  # of the astronaut photo: decoded to astronaut.png
    (tmp_path / "decoded").mkdir()
    shutil.copy(tokens, tmp_path / "decoded" / "astronaut.png")  # a token file whose decoded image lands on itself
    original = {path: path.read_bytes() for path in [*victim.iterdir(), tmp_path / "decoded" / "astronaut.png"]}
    model, restorer = str(files["model"]), str(_restoration_model(files))
    own = tmp_path / "own_model"  # a model folder whose files an output would replace (the weights being read)
    shutil.copytree(files["model"], own)
    original.update({path: path.read_bytes() for path in own.iterdir()})
    refused = [
        (["encode", str(photo), "--model", str(own), "--out", str(own / "model.safetensors")], own / "model.safetensors"),
        (["inspect", "--model", str(own), "--codes", str(own / "config.json")], own / "config.json"),
        (["eval", "--model", str(own), "--data", str(victim), "--out", str(own / "config.json")], own / "config.json"),
        (["reconstruct", str(photo), "--model", model, "--out", str(victim)], photo),
        (["restore", str(photo), "--model", restorer, "--out", str(victim)], photo),
        (["encode", str(photo), "--model", model, "--out", str(photo)], photo),
        (["encode", str(photo), "--model", model, "--out", str(tmp_path / "hard_link.png")], photo),
        (["decode", str(tmp_path / "decoded" / "astronaut.png"), "--out", str(tmp_path / "decoded")],
         tmp_path / "decoded" / "astronaut.png"),
        (["eval", "--model", model, "--data", str(victim), "--out", str(victim / "coffee.png")],
         victim / "coffee.png"),
    ]
    for (arguments, source), overwrite in itertools.product(refused, ([], ["--overwrite"])):
        assert main(arguments + overwrite) == 1, arguments  # said first (--overwrite cannot help), and refused with it
        line = cli_error_line(capsys, arguments[0])
        assert f"would replace the input {source}" in line, line
        assert line.endswith(f"give another {'--codes' if '--codes' in arguments else '--out'}."), line  # the flag used
    assert {path: path.read_bytes() for path in original} == original
    assert not (victim / "reconstructions").exists() and not (victim / "psnr.json").exists()


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "not a valid JSON file"),
        ({"resample": "bogus"}, "resample"),
        ({"size": {"height": -4, "width": 0}}, "must be positive"),
    ],
)
def test_a_broken_image_processor_config_is_an_error_not_the_default(files, tmp_path, capsys, content, problem):
    folder = tmp_path / "model"
    shutil.copytree(files["model"], folder)
    config = folder / "preprocessor_config.json"
    text = content if isinstance(content, str) else json.dumps({**json.loads(config.read_text()), **content})
    config.write_text(text)
    assert main(["inspect", "--model", str(folder)]) == 1
    line = cli_error_line(capsys, "inspect")
    assert f"{config}" in line and problem in line, line
    config.unlink()  # no saved processor at all: the default one at the model's resolution
    assert main(["encode", _photos(files)[0], "--model", str(folder), "--out", str(tmp_path / "t.safetensors")]) == 0


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({"format_version": "2"}, "format version '2'"),
        ({"format_version": None}, "does not record its format version"),
        ({"codebook_size": None}, "does not record its codebook size"),
        ({"grid_height": None}, "does not record its token grid height"),
        ({"image_width": None}, "does not record its image width"),
        ({"grid_width": "eight"}, "records grid_width 'eight'"),
        ({"codebook_fingerprint": None}, "records no codebook fingerprint"),
        ({"image_height": "64", "image_width": "64"}, "64x64 images from 8x8 token grids"),
    ],
)
def test_token_files_must_record_what_decode_checks(files, tmp_path, capsys, metadata, message):
    tokens = _tokens(files, tmp_path, **metadata)
    assert main(["decode", str(tokens), "--out", str(tmp_path / "decoded")]) == 1
    assert message in cli_error_line(capsys, "decode")
    assert not (tmp_path / "decoded").exists()


def test_tokens_without_a_fingerprint_decode_only_with_a_model_given_and_a_warning(files, tmp_path, capsys):
    tokens = _tokens(files, tmp_path, codebook_fingerprint=None)
    assert main(["decode", str(tokens), "--model", str(files["model"]), "--out", str(tmp_path / "d")]) == 0
    assert "records no codebook fingerprint" in capsys.readouterr().err
    assert (tmp_path / "d" / "astronaut.png").is_file()


@pytest.mark.parametrize("link", ["reconstructions", "role_maps"])
def test_folders_made_inside_out_that_are_symbolic_links_are_refused(files, tmp_path, capsys, link):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / link).symlink_to(elsewhere, target_is_directory=True)
    arguments = ["reconstruct", _photos(files)[0], "--model", str(files["model"]), "--out", str(out), "--role-map"]
    assert main(arguments) == 1
    assert f"{out / link} is a symbolic link" in cli_error_line(capsys, "reconstruct")
    assert not list(elsewhere.iterdir())


def test_out_may_be_a_link_to_a_folder(files, tmp_path):
    # the user named it: writes land in the folder it points to (a link *inside* --out is refused, above)
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "out").symlink_to(target, target_is_directory=True)
    tokens = _tokens(files, tmp_path)
    assert main(["decode", str(tokens), "--out", str(tmp_path / "out")]) == 0
    assert (target / "astronaut.png").is_file()


def test_decode_keeps_to_the_pixel_budget(files, tmp_path, capsys):
    tokens = _tokens(files, tmp_path)  # 8x8 tokens -> 32x32 = 1,024 pixels
    assert main(["decode", str(tokens), "--out", str(tmp_path / "d"), "--max_image_pixels", "1000"]) == 1
    line = cli_error_line(capsys, "decode")
    # Plain pixels below a megapixel: it read "32x32 pixels (0.0 megapixels), over the 0.001-megapixel budget".
    assert "32x32 pixels per image, over the budget of 1,000 pixels (--max_image_pixels)" in line, line
    assert not (tmp_path / "d").exists()
    assert main(["decode", str(tokens), "--out", str(tmp_path / "d"), "--max_image_pixels", "1024"]) == 0


@pytest.mark.parametrize("size", [{"height": 64, "width": 64}, {"shortest_edge": 64}])
def test_a_processor_that_resizes_past_the_pixel_budget_is_refused(files, tmp_path, capsys, size):
    # A small photo passed the budget, then the model's processor resized it past it: with a mistyped size in a
    # shared preprocessor_config.json (40000 for 256), 1.6 gigapixels and the OOM killer.
    folder = tmp_path / "model"
    shutil.copytree(files["model"], folder)
    CDBVQImageProcessor(size=size).save_pretrained(folder)
    small = tmp_path / "small.png"
    Image.new("RGB", (16, 16), (200, 30, 40)).save(small)
    budget = ["--max_image_pixels", "1000"]  # the 16x16 photo is within it, the processor's 64x64 images are not
    for command in ("encode", "reconstruct"):
        assert main([command, str(small), "--model", str(folder), "--out", str(tmp_path / command), *budget]) == 1
        line = cli_error_line(capsys, command)
        assert "its image processor makes images of" in line and "64x64" in line and "--max_image_pixels" in line, line
    assert main(["encode", str(small), "--model", str(folder), "--out", str(tmp_path / "e.safetensors")]) == 0
    assert main(["inspect", "--model", str(folder)]) == 0  # reads no images
    CDBVQImageProcessor(size=size, do_resize=False, do_center_crop=False).save_pretrained(folder)  # size unused
    assert main(["encode", str(small), "--model", str(folder), "--out", str(tmp_path / "f.safetensors"), *budget]) == 0


def test_eval_holds_its_resolution_to_the_pixel_budget(files, tmp_path, capsys):
    # The saved processor's size was checked, then --resolution replaced it: 100000 reached torch's allocator.
    arguments = ["eval", "--model", str(files["model"]), "--data", str(files["root"] / "photos")]
    assert main([*arguments, "--resolution", "100000"]) == 1
    line = cli_error_line(capsys, "eval")
    assert ("--resolution 100000 makes images of 100000x100000 pixels (10000.0 megapixels), over the budget of 64 "
            "megapixels (--max_image_pixels)") in line, line


def test_decode_writes_all_its_images_or_none(files, tmp_path, monkeypatch):
    # Images were written one by one: a failure on the second (a full disk) left the first behind.
    tokens = tmp_path / "tokens.safetensors"
    assert main(["encode", *_photos(files), "--model", str(files["model"]), "--out", str(tokens)]) == 0
    save, calls = Image.Image.save, []

    def fail_on_the_second(image, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return save(image, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", fail_on_the_second)
    out = tmp_path / "decoded"
    out.mkdir()
    assert main(["decode", str(tokens), "--out", str(out), "--batch_size", "1"]) == 1
    assert list(out.iterdir()) == []  # nothing, not the first image of three


def test_decode_blames_a_bad_device_on_the_device(files, tmp_path, capsys):
    # It said "the model recorded in ... cannot be loaded (...); pass --model".
    tokens = _tokens(files, tmp_path)
    assert main(["decode", str(tokens), "--out", str(tmp_path / "d"), "--device", "tpu"]) == 1
    line = cli_error_line(capsys, "decode")
    assert "--device 'tpu' is not a device torch knows" in line and "pass --model" not in line, line
    if not torch.backends.mps.is_available():  # it failed only after the model had loaded
        assert main(["inspect", "--model", str(files["model"]), "--device", "mps"]) == 1
        assert "asked for Apple's MPS, which is not available here" in cli_error_line(capsys, "inspect")


def test_a_model_changed_since_encoding_is_named_as_such(files, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(files["model"], folder)
    tokens = tmp_path / "t.safetensors"
    assert main(["encode", _photos(files)[0], "--model", str(folder), "--out", str(tokens)]) == 0
    tiny_model(seed=5, code_roles=CODE_ROLES).save_pretrained(tmp_path / "retrained")
    shutil.copy(tmp_path / "retrained" / "model.safetensors", folder / "model.safetensors")  # retrained in place
    assert main(["decode", str(tokens), "--out", str(tmp_path / "d")]) == 1
    line = cli_error_line(capsys, "decode")
    assert f"the model at {folder.resolve()} has changed since {tokens} was encoded" in line, line


@pytest.mark.parametrize(
    "arguments",
    [
        ["decode", "{tokens}", "--out", ""],
        ["reconstruct", "{photo}", "--model", "{model}", "--out", ""],
        ["restore", "{photo}", "--model", "{restorer}", "--out", ""],
        ["encode", "{photo}", "--model", "{model}", "--out", ""],
        ["eval", "--model", "{model}", "--data", "{photos}", "--out", ""],
        ["inspect", "--model", "{model}", "--codes", ""],
        ["tokenize", "--model", "{model}", "--data", "{photos}", "--out", ""],
    ],
)
def test_an_empty_output_path_is_refused(files, tmp_path, monkeypatch, capsys, arguments):
    values = {"tokens": str(_tokens(files, tmp_path)), "photo": _photos(files)[0], "model": str(files["model"]),
              "restorer": str(_restoration_model(files)), "photos": str(files["root"] / "photos")}  # fmt: skip
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir("."))
    assert main([argument.format(**values) for argument in arguments]) == 1
    option = "--codes" if "--codes" in arguments else "--out"
    assert f"{option} is empty" in cli_error_line(capsys, arguments[0])
    assert sorted(os.listdir(".")) == before


def test_the_size_hint_says_what_the_saved_processor_does(files, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(files["model"], folder)
    processor = CDBVQImageProcessor(size={"height": 32, "width": 32}, do_resize=False, do_center_crop=False)
    processor.save_pretrained(folder)
    Image.open(_photos(files)[0]).resize((50, 50)).save(tmp_path / "odd.png")
    assert main(["encode", str(tmp_path / "odd.png"), "--model", str(folder), "--out", str(tmp_path / "t.st")]) == 1
    line = cli_error_line(capsys, "encode")
    assert "50x50" in line and "does not resize" in line and "does, at its" not in line, line
    shortest = CDBVQImageProcessor(size={"shortest_edge": 32}, do_center_crop=False)
    shortest.save_pretrained(folder)
    Image.open(_photos(files)[0]).resize((40, 47)).save(tmp_path / "tall.png")  # 32 x 37 after the resize
    assert main(["encode", str(tmp_path / "tall.png"), "--model", str(folder), "--out", str(tmp_path / "t.st")]) == 1
    line = cli_error_line(capsys, "encode")
    assert "shortest side to 32" in line and "aspect ratio" in line and "set a size divisible" not in line, line


def test_an_unusable_float_image_is_named_with_its_reason(files, tmp_path, capsys):
    Image.fromarray(np.full((32, 32), np.nan, dtype=np.float32), mode="F").save(tmp_path / "nan.tif")
    Image.fromarray(np.full((32, 32), -0.5, dtype=np.float32), mode="F").save(tmp_path / "negative.tif")
    for name, reason in (("nan.tif", "NaN"), ("negative.tif", "must have values in [0, 1]")):
        out = str(tmp_path / "t.safetensors")
        assert main(["encode", str(tmp_path / name), "--model", str(files["model"]), "--out", out]) == 1
        line = cli_error_line(capsys, "encode")
        assert name in line and reason in line and "broken or truncated" not in line, line


def test_a_fid_reference_that_is_not_safetensors_is_named(files, tmp_path, capsys):
    arguments = ["eval", "--model", str(files["model"]), "--data", str(files["root"] / "photos"), "--fid",
                 "--no-lpips", "--fid_feature_extractor", "random",
                 "--fid_reference", str(files["root"] / "notes.txt")]  # fmt: skip
    assert main(arguments) == 1
    assert f"--fid_reference {files['root'] / 'notes.txt'}" in cli_error_line(capsys, "eval")


def test_a_fid_reference_records_its_data_by_name_and_is_checked_when_reused(files, tmp_path, capsys):
    # The reference file recorded --data's absolute path (shared and reused like a token file, which records none);
    # a reference with NaN statistics gave "rFID nan" and exit 0.
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    data = tmp_path / "home_alice" / "client_photos"
    shutil.copytree(files["root"] / "photos", data)
    reference = tmp_path / "reference.safetensors"
    arguments = ["eval", "--model", str(files["model"]), "--data", str(data), "--fid", "--no-lpips",
                 "--fid_feature_extractor", "random", "--fid_reference", str(reference)]  # fmt: skip
    assert main(arguments) == 0
    with safe_open(str(reference), "pt") as handle:
        description = handle.metadata()["description"]
    assert description.startswith("client_photos train ") and "home_alice" not in description
    with safe_open(str(reference), "pt") as handle:
        metadata = handle.metadata()
    statistics = load_file(reference)
    save_file({**statistics, "real_features_sum": statistics["real_features_sum"] * torch.nan}, str(reference), metadata)
    capsys.readouterr()
    assert main(arguments) == 1
    assert f"--fid_reference {reference}: the FID reference statistics hold non-finite" in cli_error_line(capsys, "eval")


def test_pickle_weights_are_refused_in_one_line_without_torch_warnings(files, tmp_path, capsys):
    import argparse
    import warnings

    folder = tmp_path / "model"
    shutil.copytree(files["model"], folder)
    (folder / "model.safetensors").unlink()
    torch.save({"weights": argparse.Namespace()}, folder / "pytorch_model.bin", pickle_protocol=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["inspect", "--model", str(folder)]) == 1
    assert not [warning for warning in caught if "weights_only" in str(warning.message)]
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "weights_only" not in err and "Re-running" not in err, err
    assert "never unpickled" in err, err


def test_tokenize_writes_only_a_new_empty_or_earlier_tokenize_folder(files, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(files["root"] / "photos", data / "images")
    base = ["tokenize", "--model", str(files["model"]), "--data", str(data), "--out"]
    assert main([*base, str(data / "tokens")]) == 1
    assert "inside --data" in cli_error_line(capsys, "tokenize") and not (data / "tokens").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert main([*base, str(tmp_path / "notes")]) == 1
    assert "cdb_vq_tokens.json" in cli_error_line(capsys, "tokenize")
    assert main([*base, str(tmp_path / "tokens")]) == 0
    assert main([*base, str(tmp_path / "tokens")]) == 0  # an earlier tokenize output is replaced
    # save_to_disk writes through a link it finds there: a file outside --out was overwritten.
    victim = tmp_path / "victim.json"
    victim.write_text("precious")
    (tmp_path / "tokens" / "state.json").unlink()
    (tmp_path / "tokens" / "state.json").symlink_to(victim)
    assert main([*base, str(tmp_path / "tokens")]) == 1
    assert "state.json is a symbolic link" in cli_error_line(capsys, "tokenize") and victim.read_text() == "precious"
    # An interrupted tokenize (save_to_disk's files, not yet the record written last) is named as such.
    shutil.copytree(tmp_path / "tokens", tmp_path / "half", ignore=shutil.ignore_patterns("state.json", "cdb_vq_tokens.json"))
    (tmp_path / "half" / "state.json").write_text("{}")
    assert main([*base, str(tmp_path / "half")]) == 1
    assert "holds a data set without the cdb_vq_tokens.json that `cdb-vq tokenize` writes last: an interrupted tokenize" in cli_error_line(capsys, "tokenize")


def test_tokenize_refuses_token_sequences_of_several_lengths(files, tmp_path, capsys):
    # A processor without a fixed size (shortest edge, no crop) gave 64 and 128 tokens; the summary said 64 per image.
    model = tmp_path / "model"
    shutil.copytree(files["model"], model)
    CDBVQImageProcessor(size={"shortest_edge": 32}, do_center_crop=False).save_pretrained(model)
    data = tmp_path / "data"
    data.mkdir()
    photo = sample_photos("skimage")[0]
    photo.resize((32, 32)).save(data / "square.png")
    photo.resize((64, 32)).save(data / "wide.png")
    arguments = ["tokenize", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "tokens"), "--batch_size", "1"]
    assert main(arguments) == 1
    assert "the images gave token sequences of 64 to 128 tokens" in cli_error_line(capsys, "tokenize")
    assert not (tmp_path / "tokens" / "cdb_vq_tokens.json").exists()


def test_restore_keeps_no_autograd_graph(files, tmp_path, monkeypatch):
    # restore ran with autograd on (the only command without inference mode): every batch kept its activations.
    modes = []
    real_decode = CDBVQModel.decode

    def decode(self, *args, **kwargs):
        modes.append(torch.is_inference_mode_enabled())
        return real_decode(self, *args, **kwargs)

    monkeypatch.setattr(CDBVQModel, "decode", decode)
    assert main(["restore", _photos(files)[0], "--model", str(_restoration_model(files)), "--out", str(tmp_path / "out")]) == 0
    assert modes and all(modes)


def test_reconstruct_writes_nothing_when_a_later_image_cannot_be_decoded(files, tmp_path, capsys):
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(_photos(files)[1]).read_bytes()[:2000])  # the header reads, the pixels do not
    out = tmp_path / "out"
    arguments = [_photos(files)[0], str(truncated), "--model", str(files["model"]), "--out", str(out),
                 "--batch_size", "1"]  # fmt: skip
    assert main(["reconstruct", *arguments]) == 1
    assert "truncated.png" in cli_error_line(capsys, "reconstruct")
    assert not out.exists()
    assert main(["restore", *arguments[:3], str(_restoration_model(files)), *arguments[4:]]) == 1
    assert not out.exists()
    out.mkdir()  # an existing folder: nothing of the failed run is left in it either
    assert main(["reconstruct", *arguments]) == 1
    assert list(out.iterdir()) == []


def test_reconstruct_reads_each_image_once_and_leaves_no_staging(files, tmp_path, monkeypatch):
    import cdb_tokenizer.tools.cli as cli_module

    reads = []
    load_image = cli_module.load_image
    monkeypatch.setattr(cli_module, "load_image", lambda path, *rest: reads.append(path) or load_image(path, *rest))
    out = tmp_path / "out"
    photos = _photos(files)[:2]
    assert main(["reconstruct", *photos, "--model", str(files["model"]), "--out", str(out), "--batch_size", "1"]) == 0
    assert sorted(map(str, reads)) == sorted(photos)
    assert sorted(p.name for p in out.iterdir()) == sorted([*(Path(p).stem + ".png" for p in photos), "psnr.json",
                                                           "reconstructions"])  # fmt: skip


BASE_INSTALL_ONLY = """
import json, sys
for name in ("torchmetrics", "torch_fidelity", "datasets", "pyarrow", "accelerate", "open_clip", "lpips", "matplotlib"):
    sys.modules[name] = None  # the training extras: importing any of them fails, for every command run here
from cdb_tokenizer.tools.cli import main
for argv in json.loads(sys.argv[1]):
    status = main(argv)
    if status:
        sys.exit(f"{argv[0]} exited with {status}")
"""


def run_with_the_base_install_only(*commands: list[str]) -> subprocess.CompletedProcess:
    """`cdb-vq` commands, one after the other, in one fresh interpreter where the training extras cannot be imported
    (one interpreter: each start pays the torch import)."""
    return subprocess.run([sys.executable, "-c", BASE_INSTALL_ONLY, json.dumps(commands)], capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip


def test_encode_decode_reconstruct_restore_and_inspect_need_only_the_base_install(files, tmp_path):
    # docs/cli.md promises it; reconstruct once imported its PSNR from the evaluation tools (torchmetrics).
    photo, model = _photos(files)[0], str(files["model"])
    restorer = tmp_path / "restorer"
    shutil.copytree(files["model"], restorer)
    config = json.loads((restorer / "config.json").read_text())
    (restorer / "config.json").write_text(json.dumps({**config, "restoration_degradation": "gaussian_blur:1.5"}))
    commands = [
        ["restore", photo, "--model", str(restorer), "--out", str(tmp_path / "restored")],
        ["encode", photo, "--model", model, "--out", str(tmp_path / "tokens.safetensors")],
        ["decode", str(tmp_path / "tokens.safetensors"), "--out", str(tmp_path / "decoded")],
        ["reconstruct", photo, "--model", model, "--out", str(tmp_path / "reconstructed")],
        ["inspect", "--model", model],
    ]
    result = run_with_the_base_install_only(*commands)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "tokens.safetensors").is_file() and any((tmp_path / "decoded").iterdir())  # every command ran


def test_commands_that_need_the_training_extras_say_how_to_install_them(files, tmp_path):
    # tokenize said only "No module named 'pyarrow'", imported before the guarded data-set import.
    folder = tmp_path / "images"
    folder.mkdir()
    commands = [
        ["tokenize", "--data", str(folder), "--model", str(files["model"]), "--out", str(tmp_path / "tokens")],
        ["eval", "--data", str(folder), "--model", str(files["model"])],
    ]
    for argv in commands:
        result = run_with_the_base_install_only(argv)
        assert "exited with 1" in result.stderr, (argv[0], result.stderr[-2000:])
        assert "the training extras: pip install 'cdb-tokenizer[train]' (from a checkout: pip install -e '.[train]')" in result.stderr, result.stderr


OLD_COMMIT, NEW_COMMIT = "1" * 40, "2" * 40


@pytest.fixture
def offline_hub(files, tmp_path, monkeypatch):
    """org/cdb-vq in an on-disk Hub cache, offline: `main` is a newer commit whose codebook differs from the old one."""
    import huggingface_hub.constants

    cache = hub_cache(
        tmp_path / "hub", "org/cdb-vq", {OLD_COMMIT: files["model"], NEW_COMMIT: files["same_size_model"]},
        {"main": NEW_COMMIT, "v1": OLD_COMMIT},
    )  # fmt: skip
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return "org/cdb-vq"


def test_revision_pins_a_hub_model_and_decode_follows_the_recorded_commit(files, offline_hub, tmp_path, capsys):
    photo = _photos(files)[:1]
    tokens_file = tmp_path / "tokens.safetensors"
    assert main(["encode", *photo, "--model", offline_hub, "--revision", "v1", "--out", str(tokens_file)]) == 0
    with safe_open(str(tokens_file), framework="pt") as handle:
        metadata, tokens = handle.metadata(), handle.get_tensor("image_tokens")
    assert (metadata["model"], metadata["model_revision"]) == (offline_hub, OLD_COMMIT)  # the branch, resolved
    _, expected_tokens, _ = _expected_reconstructions(files)  # the old commit's model, loaded from its folder
    assert torch.equal(tokens.long(), expected_tokens[:1])
    # decode loads the commit that encoded them, though main has moved on to another codebook ...
    assert main(["decode", str(tokens_file), "--out", str(tmp_path / "decoded")]) == 0
    capsys.readouterr()
    # ... and refuses main's codebook when asked for it.
    assert main(["decode", str(tokens_file), "--revision", "main", "--out", str(tmp_path / "main")]) == 1
    line = cli_error_line(capsys, "decode")
    assert f"encoded by {offline_hub} at commit {OLD_COMMIT}, and its revision {NEW_COMMIT} has another codebook" in line
    assert line.endswith(f"decode with --revision {OLD_COMMIT}.")
    assert main(["inspect", "--model", offline_hub, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["revision"] == NEW_COMMIT


def test_revision_is_refused_for_a_local_folder_and_a_forged_one_in_a_token_file(files, tmp_path, capsys):
    assert main(["inspect", "--model", str(files["model"]), "--revision", "v1"]) == 1
    assert "--revision v1 applies to Hub models" in cli_error_line(capsys, "inspect")
    forged = _tokens(files, tmp_path, model="org/cdb-vq", model_revision="../../../etc")
    assert main(["decode", str(forged), "--out", str(tmp_path / "decoded")]) == 1
    assert "records model_revision '../../../etc', not a commit hash" in cli_error_line(capsys, "decode")


def test_a_token_file_far_from_its_local_model_records_only_the_model_name(files, capsys):
    import tempfile

    if not os.access("/dev/shm", os.W_OK):
        pytest.skip("needs a writable folder outside /tmp whose common path with the model's is /")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as far:
        tokens_file = Path(far) / "tokens.safetensors"
        assert main(["encode", _photos(files)[0], "--model", str(files["model"]), "--out", str(tokens_file)]) == 0
        with safe_open(str(tokens_file), framework="pt") as handle:
            metadata = handle.metadata()
        assert "model" not in metadata and metadata["model_name"] == "model"
        assert str(files["root"]) not in json.dumps(metadata)
        capsys.readouterr()
        assert main(["decode", str(tokens_file), "--out", str(Path(far) / "decoded")]) == 1
        line = cli_error_line(capsys, "decode")
        assert "does not name its model (it was encoded with a local model named 'model'); pass --model" in line
        assert main(["decode", str(tokens_file), "--model", str(files["model"]), "--out", str(Path(far) / "decoded")]) == 0


def test_existing_outputs_are_replaced_only_with_overwrite(files, tmp_path, capsys):
    # `decode --out photos/` replaced photos/astronaut.png (the user's, not an input) with a 32x32 decode.
    tokens = _tokens(files, tmp_path)  # decodes to astronaut.png
    (tmp_path / "photos").mkdir()
    mine = tmp_path / "photos" / "astronaut.png"
    shutil.copy(_photos(files)[0], mine)
    original = mine.read_bytes()
    assert main(["decode", str(tokens), "--out", str(tmp_path / "photos")]) == 1
    assert f"{mine} exists already and would be replaced; pass --overwrite to replace it," in cli_error_line(capsys, "decode")
    assert mine.read_bytes() == original
    assert main(["decode", str(tokens), "--out", str(tmp_path / "photos"), "--overwrite"]) == 0
    assert Image.open(mine).size == (32, 32)
    capsys.readouterr()
    # A file output likewise; and one whose "folder" is a file is named as such.
    assert main(["encode", _photos(files)[0], "--model", str(files["model"]), "--out", str(tokens)]) == 1
    assert f"--out {tokens} exists; pass --overwrite to replace it" in cli_error_line(capsys, "encode")
    assert main(["encode", _photos(files)[0], "--model", str(files["model"]), "--out", str(tokens), "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["encode", _photos(files)[0], "--model", str(files["model"]), "--out", str(tokens / "x.safetensors")]) == 1
    assert f"{tokens} is a file, not a folder" in cli_error_line(capsys, "encode")


def test_token_files_of_any_integer_type_decode_the_same(files, tmp_path):
    tokens_file = _tokens(files, tmp_path)
    with safe_open(str(tokens_file), framework="pt") as handle:
        metadata, tokens = handle.metadata(), handle.get_tensor("image_tokens")
    narrow = tmp_path / "int8.safetensors"
    save_file({"image_tokens": tokens.to(torch.int8)}, str(narrow), metadata=metadata)  # 64 codes fit in int8
    assert main(["decode", str(tokens_file), "--out", str(tmp_path / "a")]) == 0
    assert main(["decode", str(narrow), "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "astronaut.png").read_bytes() == (tmp_path / "b" / "astronaut.png").read_bytes()


# ------------------------------------------------------------------------------------- role maps, data options


def _read_role_map_picture(path: Path, role_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(the original, (h, w) role ids) read back from a one-image role-map PNG: a 12-row legend, then a 2-pixel
    border around the 32x32 original and, beside it, the original blended 55:45 with each token's role colour."""
    from cdb_tokenizer.tools.roles import role_colours

    picture = np.asarray(Image.open(path)).astype(np.float64) / 255
    assert picture.shape == (12 + 2 + 32 + 2, 2 + 64 + 2, 3), picture.shape
    original, overlay = picture[14:46, 2:34], picture[14:46, 34:66]
    colour = (overlay - 0.55 * original) / 0.45  # the overlay's colour, unblended (to within 8-bit rounding)
    cells = colour.reshape(8, 4, 8, 4, 3).mean(axis=(1, 3))  # one colour per token (4x4 pixels each)
    palette = np.array([rgb for _, rgb in role_colours(role_names)])
    distances = np.linalg.norm(cells[:, :, None, :] - palette[None, None], axis=-1)
    assert distances.min(axis=-1).max() < 0.05, "a token's overlay is not one of the role colours"
    return (original * 255).round().astype(np.uint8), distances.argmin(axis=-1)


def test_reconstruct_role_map_shows_the_image_beside_the_roles_of_its_tokens(files, tmp_path, capsys):
    # Only the file's existence was checked: the picture must be the processed photo beside model.role_map's roles.
    out = tmp_path / "out"
    photo = _photos(files)[0]
    assert main(["reconstruct", photo, "--model", str(files["model"]), "--out", str(out), "--role-map"]) == 0
    assert "structure: blue, texture: red" in capsys.readouterr().out
    model = CDBVQModel.from_pretrained(files["model"]).eval()
    processor = CDBVQImageProcessor.from_pretrained(files["model"])
    pixel_values = processor(Image.open(photo), return_tensors="pt").pixel_values
    expected_roles = model.role_map(pixel_values)[0].numpy()
    assert 0 < expected_roles.mean() < 1  # both roles appear: a one-colour picture would prove little
    original, roles = _read_role_map_picture(out / "role_maps" / "astronaut.png", ["structure", "texture"])
    np.testing.assert_array_equal(roles, expected_roles)
    shown = processor.postprocess(pixel_values, return_tensors="np").pixel_values[0]
    assert np.abs(original.astype(int) - shown.astype(int)).max() <= 1  # the input photo, not the reconstruction
    # The legend strip on top: structure's blue on the left half, texture's red on the right.
    legend = np.asarray(Image.open(out / "role_maps" / "astronaut.png"))[:12]
    np.testing.assert_array_equal(legend[5, 10], (38, 115, 255))
    np.testing.assert_array_equal(legend[5, 50], (255, 64, 26))


def test_reconstruct_role_maps_in_batches_each_show_their_own_image(files, tmp_path):
    # Three photos in batches of two: each picture must hold its own photo's role map (computed alone), not a
    # neighbour's in the batch or the first image's of the batch.
    out = tmp_path / "out"
    photos = _photos(files)
    arguments = [*photos, "--model", str(files["model"]), "--out", str(out), "--role-map", "--batch_size", "2"]
    assert main(["reconstruct", *arguments]) == 0
    model = CDBVQModel.from_pretrained(files["model"]).eval()
    processor = CDBVQImageProcessor.from_pretrained(files["model"])
    expected = {
        name: model.role_map(processor(Image.open(path), return_tensors="pt").pixel_values)[0].numpy()
        for name, path in zip(PHOTO_NAMES, photos)
    }
    assert not np.array_equal(expected["astronaut"], expected["chelsea"])  # the photos' role maps differ
    assert not np.array_equal(expected["chelsea"], expected["coffee"])
    for name in PHOTO_NAMES:
        original, roles = _read_role_map_picture(out / "role_maps" / f"{name}.png", ["structure", "texture"])
        np.testing.assert_array_equal(roles, expected[name], err_msg=name)
        pixel_values = processor(Image.open(files["root"] / "photos" / f"{name}.png"), return_tensors="pt").pixel_values
        single = processor.postprocess(pixel_values, return_tensors="np").pixel_values[0]
        assert np.abs(original.astype(int) - single.astype(int)).max() <= 1, name


def _split_folder_with_metadata(files, root: Path) -> Path:
    """An image folder with `train/` (astronaut, chelsea, coffee) and `validation/` (chelsea, coffee) splits whose
    metadata.jsonl names each image in a `photo` column (`photo_file_name`) with a `class_id`, and a `label` column of
    other numbers, which --label_column must pass over."""
    splits = {"train": {"astronaut": 3, "chelsea": 5, "coffee": 7}, "validation": {"chelsea": 1, "coffee": 0}}
    for split, classes in splits.items():
        (root / split).mkdir(parents=True)
        rows = []
        for name, class_id in classes.items():
            shutil.copy(files["root"] / "photos" / f"{name}.png", root / split / f"{name}.png")
            rows.append(json.dumps({"photo_file_name": f"{name}.png", "class_id": class_id, "label": 100 + class_id}))
        (root / split / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def test_tokenize_takes_the_split_image_column_and_label_column_given(files, tmp_path, capsys):
    import datasets

    data = _split_folder_with_metadata(files, tmp_path / "data")
    out = tmp_path / "tokenized"
    arguments = ["tokenize", "--model", str(files["model"]), "--data", str(data), "--out", str(out),
                 "--split", "validation", "--image_column", "photo", "--label_column", "class_id"]  # fmt: skip
    assert main(arguments) == 0
    assert "tokenized 2 images (0 unreadable skipped)" in capsys.readouterr().out  # validation's two, not train's three
    tokenized = datasets.load_from_disk(str(out))
    assert tokenized.column_names == ["image_tokens", "source_index", "label"]
    _, expected_tokens, _ = _expected_reconstructions(files)
    expected = {name: tokens.flatten().tolist() for name, tokens in zip(PHOTO_NAMES, expected_tokens)}
    rows = sorted((row["label"], row["image_tokens"]) for row in tokenized)
    assert rows == sorted([(1, expected["chelsea"]), (0, expected["coffee"])])  # class_id, not the `label` column

    # Without --label_column the data set's own `label` column is kept; with the train split, all three photos.
    assert main([*arguments[:-2], "--split", "train"]) == 0
    rows = sorted((row["label"], row["image_tokens"]) for row in datasets.load_from_disk(str(out)))
    assert rows == sorted([(103, expected["astronaut"]), (105, expected["chelsea"]), (107, expected["coffee"])])


def test_eval_takes_the_split_and_image_column_given(files, tmp_path, capsys):
    from cdb_tokenizer.tools.evaluation import evaluate

    data = _split_folder_with_metadata(files, tmp_path / "data")
    base = ["eval", "--model", str(files["model"]), "--data", str(data), "--image_column", "photo", "--no-lpips"]
    model = CDBVQModel.from_pretrained(files["model"]).eval()
    processor = CDBVQImageProcessor.from_pretrained(files["model"])
    for split, names in (("validation", ["chelsea", "coffee"]), ("train", PHOTO_NAMES)):
        assert main([*base, "--split", split]) == 0
        metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (metrics["num_images"], metrics["unreadable_images"]) == (len(names), 0), split
        photos = [Image.open(files["root"] / "photos" / f"{name}.png") for name in names]
        expected = evaluate(model, [processor(photos, return_tensors="pt").pixel_values], show_progress=False)
        assert metrics["psnr"] == pytest.approx(expected["psnr"], rel=1e-4), split
    # The default column, `image`, is not there: the error names the columns the data set has.
    assert main(["eval", "--model", str(files["model"]), "--data", str(data), "--split", "validation"]) == 1
    line = cli_error_line(capsys, "eval")
    assert "image_column 'image' is not a column" in line and "'photo'" in line, line


def test_relative_locations_never_spell_out_a_path_from_the_root_or_the_home_folders(monkeypatch):
    from cdb_tokenizer.tools.files import relative_location

    monkeypatch.setenv("HOME", "/home/alice")
    assert relative_location("/tmp/tok", "/tmp") == "./tok"  # down from the base: nothing above it shows
    assert relative_location("/srv/runs/tok", "/srv/runs/tokens") == "../tok"
    assert relative_location("/home/alice/tok", "/home/alice/work") == "../tok"
    assert relative_location("/home/bob/tok", "/home/alice/work") is None  # "../../bob/tok" names another user
    assert relative_location("/data/tok", "/home/alice") is None  # from /: the whole path
    assert relative_location("/home/alice/tok", "/") is None and relative_location("/home/alice/tok", "/home") is None
    monkeypatch.setenv("HOME", "/root")  # root in a container: /home still holds other users' folders
    assert relative_location("/home/alice/tok", "/home/bob/out") is None
    monkeypatch.delenv("HOME")
    monkeypatch.setattr("pwd.getpwuid", lambda uid: (_ for _ in ()).throw(KeyError(uid)))  # no home at all
    assert relative_location("/tmp/a/tok", "/tmp/a/out") == "../tok"


@pytest.mark.parametrize("name, problem", [("", "--model is empty"), ("~no_such_user_x/m", "no such folder")])
def test_locate_names_an_empty_model_or_an_unknown_users_folder(name, problem):
    from cdb_tokenizer.tools.loading import locate

    with pytest.raises(FileNotFoundError, match=problem):
        locate(name, "--model")


def _model_without_resizing(folder: Path) -> Path:
    """The tiny model with a processor that keeps each image's own size."""
    tiny_model().save_pretrained(folder)
    CDBVQImageProcessor(do_resize=False, do_center_crop=False).save_pretrained(folder)
    return folder


def test_encode_of_several_sizes_names_the_files_and_never_advises_batch_size_one(tmp_path, capsys):
    # A processor that does not resize: `encode` cannot hold two grid sizes in one file, so "--batch_size 1" (the
    # advice of the batched error) only led to a second error after every image was encoded.
    folder = _model_without_resizing(tmp_path / "model")
    wide, square = tmp_path / "wide.png", tmp_path / "square.png"
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(wide)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(square)
    argv = ["encode", str(wide), str(square), "--model", str(folder), "--out", str(tmp_path / "t.safetensors")]
    assert main(argv) == 1
    line = cli_error_line(capsys, "encode")
    assert "wide.png 32x48" in line and "square.png 64x64" in line and "--batch_size 1" not in line, line
    assert main(argv + ["--batch_size", "1"]) == 1
    line = cli_error_line(capsys, "encode")
    assert "square.png is 64x64 pixels" in line and "one grid size" in line, line


def test_size_errors_name_the_file_and_give_height_by_width(tmp_path, capsys):
    folder = _model_without_resizing(tmp_path / "model")
    good, odd = tmp_path / "good.png", tmp_path / "odd.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(good)
    Image.fromarray(np.zeros((37, 53, 3), np.uint8)).save(odd)  # 53 wide, 37 high
    assert main(["encode", str(good), str(odd), "--model", str(folder), "--out", str(tmp_path / "t.safetensors"),
                 "--batch_size", "1"]) == 1
    line = cli_error_line(capsys, "encode")
    assert f"{odd} is 37x53 pixels, not divisible" in line, line
    # The pixel budget's message reads height x width too (it read 53x37 for this image).
    assert main(["encode", str(odd), "--model", str(folder), "--out", str(tmp_path / "t.safetensors"),
                 "--max_image_pixels", "100"]) == 1
    line = cli_error_line(capsys, "encode")
    assert "37x53 pixels" in line, line
