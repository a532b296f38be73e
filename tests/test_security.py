"""Hostile and careless input (issue 11): nothing runs that the user did not ask for, nothing private is published,
and wrong input gets one clear error instead of a wrong answer or a traceback."""

import json
import os
import shutil
import stat
import struct
import tokenize
import zlib
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cdb_tokenizer import CDBVQImageProcessor
from cdb_tokenizer.tools.cli import main
from cdb_tokenizer.tools.data import decode_image, sample_photos
from conftest import cli_error_line, refit_manifest, tiny_model


REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A tiny tokenizer, photos, and a token file of one photo."""
    root = tmp_path_factory.mktemp("security")
    model = tiny_model()
    processor = CDBVQImageProcessor(size={"height": 32, "width": 32})
    photos = sample_photos("skimage")[:3]
    model.train()
    model(processor(photos, return_tensors="pt").pixel_values)  # k-means init: a codebook that is not all equal
    model.eval().save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    (root / "photos").mkdir()
    for index, photo in enumerate(photos):
        photo.save(root / "photos" / f"p{index}.png")
    assert main(["encode", str(root / "photos" / "p0.png"), "--model", str(root / "model"),
                 "--out", str(root / "tokens.safetensors")]) == 0  # fmt: skip
    return root


def _token_file(root: Path, name: str, tokens: torch.Tensor | None = None, **metadata) -> Path:
    with safe_open(str(root / "tokens.safetensors"), "pt") as handle:
        original, saved = handle.metadata(), handle.get_tensor("image_tokens")
    path = root / name
    save_file({"image_tokens": saved if tokens is None else tokens}, str(path), metadata={**original, **metadata})
    return path


def _malicious_folder(root: Path, name: str, model_type: str) -> Path:
    """A copy of the model whose config.json points (auto_map) at code that leaves a marker file when imported."""
    folder = root / name
    if folder.exists():
        return folder
    shutil.copytree(root / "model", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(root / 'RAN')!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig, PreTrainedModel\n"
        f"class EvilConfig(PretrainedConfig):\n    model_type = {model_type!r}\n"
        "class EvilModel(PreTrainedModel):\n    config_class = EvilConfig\n"
    )
    return folder


# ------------------------------------------------------------------------------------------------ nothing runs


def _code_tokens(path: Path) -> list[tokenize.TokenInfo]:
    with open(path, "rb") as handle:
        return [t for t in tokenize.tokenize(handle.readline) if t.type in (tokenize.NAME, tokenize.OP)]


def test_no_pickle_no_unsafe_torch_load_no_forced_remote_code_in_the_package_and_training():
    problems = []
    files = sorted((REPO / "cdb_tokenizer").rglob("*.py")) + sorted((REPO / "training").rglob("*.py"))
    assert len(files) > 10
    for path in files:
        tokens = _code_tokens(path)
        names = [t.string for t in tokens]
        for index, token in enumerate(tokens):
            where = f"{path.relative_to(REPO)}:{token.start[0]}"
            if token.string in ("pickle", "cPickle", "dill", "cloudpickle"):
                problems.append(f"{where}: {token.string}")
            if token.string in ("weights_only", "trust_remote_code") and names[index + 1 : index + 3] == ["=", "True" if token.string == "trust_remote_code" else "False"]:
                problems.append(f"{where}: {token.string}={names[index + 2]}")
            if token.string == "load" and names[index - 2 : index] == ["torch", "."]:
                depth, call = 0, []
                for following in names[index + 1 :]:
                    depth += following == "("
                    depth -= following == ")"
                    call.append(following)
                    if depth == 0:
                        break
                if "weights_only" not in call or call[call.index("weights_only") + 2] != "True":
                    problems.append(f"{where}: torch.load without weights_only=True")
            if token.string == "register_for_checkpointing":
                problems.append(f"{where}: accelerate pickles registered objects (custom_checkpoint_N.pkl)")
    assert problems == []


def test_token_file_metadata_never_runs_the_code_of_the_folder_it_names(root, tmp_path, capsys):
    marker = root / "RAN"
    evil_cdb = _malicious_folder(root, "evil_cdb", "cdb_vq")
    evil_other = _malicious_folder(root, "evil_other", "evil")

    # A cdb_vq folder: decoded with this package's classes, its code never imported.
    assert main(["decode", str(_token_file(root, "t1.safetensors", model=str(evil_cdb))), "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "p0.png").is_file() and not marker.exists()
    # Another kind of model: refused from its config.json read as data, before anything of it is loaded.
    assert main(["decode", str(_token_file(root, "t2.safetensors", model=str(evil_other))), "--out", str(tmp_path / "b")]) == 1
    assert "'evil' model, not a cdb-vq tokenizer" in cli_error_line(capsys, "decode") and not marker.exists()
    # The same through --model, and for the other commands.
    assert main(["inspect", "--model", str(evil_other)]) == 1 and not marker.exists()
    assert main(["encode", str(root / "photos" / "p1.png"), "--model", str(evil_cdb), "--out", str(tmp_path / "t.safetensors")]) == 0
    assert not marker.exists()


def test_trust_remote_code_is_passed_on_only_when_the_user_gives_it(root, monkeypatch, capsys):
    import cdb_tokenizer.tools.loading as loading

    seen = []
    real = loading.load_tokenizer

    def load_tokenizer(name, trust_remote_code=False, **kwargs):
        seen.append(trust_remote_code)
        return real(name, trust_remote_code=trust_remote_code, **kwargs)

    monkeypatch.setattr(loading, "load_tokenizer", load_tokenizer)
    assert main(["inspect", "--model", str(root / "model")]) == 0
    assert main(["inspect", "--model", str(root / "model"), "--trust-remote-code"]) == 0
    assert seen == [False, True]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # the test writes a protocol-4 pickle
def test_a_tampered_checkpoint_file_never_runs_code_and_is_refused_clearly(tmp_path):
    """accelerate reads optimizer/scheduler/RNG states with weights_only=True; resume turns its error into one line."""
    import pickle

    import training.train as train_script
    from cdb_tokenizer.tools.checkpoints import CheckpointError

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'RAN'}",))

    args = ["--resolution", "32", "--base_channels", "16", "--channel_multipliers", "1", "2", "2", "--num_res_blocks", "1", "--norm_num_groups", "8", "--latent_dim", "16", "--codebook_size", "64", "--codebook_dim", "8", "--semantic_dim", "32", "--num_prototypes", "8", "--router_dim", "8", "--model_preset", "tiny", "--train_batch_size", "2", "--num_validation_images", "2", "--clip_model", "none", "--report_to", "none", "--lpips_weight", "0", "--disc_weight", "0", "--max_train_steps", "2", "--checkpointing_steps", "1", "--use_ema", "--output_dir", str(tmp_path / "run")]  # fmt: skip
    train_script.main(args)
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    assert not list(checkpoint.glob("custom_checkpoint_*"))  # the EMA is in training_state.safetensors
    assert any(key.startswith("ema/") for key in load_file(checkpoint / "training_state.safetensors"))
    # A planted accelerate custom-state pickle is never read.
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Payload()))
    # Every torch-pickled state replaced by a code-running pickle (the manifest refitted, sizes and digests, so only
    # the content is wrong).
    for path in checkpoint.iterdir():
        if path.suffix in (".bin", ".pkl"):
            path.write_bytes(pickle.dumps(Payload()))
    refit_manifest(checkpoint)
    with pytest.raises(CheckpointError, match=r"cannot resume from .*checkpoint-2.*damaged or tampered"):
        train_script.main(args + ["--resume_from_checkpoint", str(checkpoint), "--max_train_steps", "3"])
    assert not (tmp_path / "RAN").exists()


# ------------------------------------------------------------------------------------------------ nothing leaks


def test_publish_staging_scrubs_every_local_path_and_token(root, tmp_path):
    from cdb_tokenizer.tools.publishing import stage_folder

    output = tmp_path / "out"
    shutil.copytree(root / "model", output)
    leaks = {
        "/home/alice smith/My Photos/cats": "alice smith", "C:\\Users\\bob\\secret data\\set": "Users\\bob",
        "D:/corp/clients/acme/images": "corp/clients", "~/private/labels.txt": "~/private",
        "/srv/private/nested/deep.txt": "/srv/private", "/mnt/private/listed/file.pt": "/mnt/private",
        "\\\\fileserver\\share\\private": "fileserver", "hf_" + "Z" * 30: "Z" * 30, "s3cr3t-value-123": "s3cr3t",
        "sk-abcdef123456": "sk-abcdef",
    }  # fmt: skip
    values = list(leaks)
    training_config = {
        "train_data_dir": values[0], "cache_dir": values[1], "prototypes": "text:" + values[2], "clip_pretrained": values[3],
        "extra": {"deep": {"file": values[4]}}, "files": ["kept", values[5]], "share": values[6],
        "note": f"pushed with {values[7]} yesterday", "tracker": {"wandb": {"auth": {"secret": values[8]}}},
        "OPENAI_API_KEY": values[9], "hub_token": "hf_" + "W" * 30, "resolution": 32, "token_alignment_weight": 0.5,
        "output_dir": str(output),
    }  # fmt: skip
    (output / "training_config.json").write_text(json.dumps(training_config))
    (output / "metrics.json").write_text(json.dumps({"psnr": 20.0, "teacher": values[4], "steps": 3}))
    (output / "notes.py").write_text("PASSWORD = 'hunter2'\n")
    staged = stage_folder(output, tmp_path / "staged", "me/tokenizer")

    text = "\n".join(p.read_text(errors="ignore") for p in staged.rglob("*") if p.suffix in (".json", ".md", ".py"))
    text = text + "\n" + text.replace("\\\\", "\\")  # JSON escapes Windows backslashes
    for value, fragment in leaks.items():
        assert fragment not in text, value
    assert "W" * 30 not in text and str(tmp_path) not in text and "hunter2" not in text
    assert not (staged / "notes.py").exists() and (staged / "modeling_cdb_vq.py").is_file()
    public = json.loads((staged / "training_config.json").read_text())
    assert public["train_data_dir"] == "cats" and public["prototypes"] == "text:images"
    assert public["files"] == ["kept", "file.pt"] and public["token_alignment_weight"] == 0.5
    assert "output_dir" not in public and "hub_token" not in public and "OPENAI_API_KEY" not in public


def test_publishing_refuses_a_file_linked_in_from_outside_the_output_folder(root, tmp_path):
    # Staging copies follow links: a figure linked to a key file was staged, and would have been uploaded.
    from cdb_tokenizer.tools.publishing import stage_folder

    output = tmp_path / "out"
    shutil.copytree(root / "model", output)
    (tmp_path / "id_rsa").write_text("PRIVATE KEY")
    (output / "reconstructions.png").symlink_to(tmp_path / "id_rsa")
    with pytest.raises(ValueError, match=r"reconstructions.png is a link to .*id_rsa, outside .*out: only the folder"):
        stage_folder(output, tmp_path / "staged", "me/tokenizer")
    assert not (tmp_path / "staged" / "reconstructions.png").exists()
    (output / "reconstructions.png").unlink()
    (output / "figure.png").write_bytes(b"png")  # a link inside the folder is the folder's own file
    (output / "reconstructions.png").symlink_to(output / "figure.png")
    assert (stage_folder(output, tmp_path / "staged", "me/tokenizer") / "reconstructions.png").read_bytes() == b"png"


def test_tensors_a_model_file_lacks_or_adds_are_one_line_each_not_a_table(root, tmp_path, caplog):
    # A model saved before a running statistic existed printed transformers' LOAD REPORT table, advising to train the
    # "newly initialized" tensors; an extra tensor printed it too. A load that fails still shows the table, which
    # transformers' error refers to ("look at the above report").
    import logging
    import logging.handlers

    from cdb_tokenizer.tools.loading import load_tokenizer

    weights = load_file(root / "model" / "model.safetensors")
    older, extra = tmp_path / "older", tmp_path / "extra"
    for folder, tensors in ((older, {k: v for k, v in weights.items() if "signal_statistics" not in k}),
                            (extra, {**weights, "extra.weight": torch.zeros(3)})):  # fmt: skip
        shutil.copytree(root / "model", folder)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    shown = logging.handlers.BufferingHandler(capacity=100)  # transformers' own handlers: caplog does not see them
    logging.getLogger("transformers").addHandler(shown)
    try:
        with caplog.at_level(logging.WARNING):
            load_tokenizer(str(older))
            load_tokenizer(str(extra))
        assert not any("LOAD REPORT" in record.getMessage() for record in shown.buffer)
        assert f"{older} was saved without quantizer.signal_statistics.counts and 1 more" in caplog.text
        assert f"{extra} holds tensors this model does not have (extra.weight), which are ignored" in caplog.text
        caplog.clear()
        from transformers import AutoModel

        with caplog.at_level(logging.WARNING):  # the README's own call: the model class says it, whoever loads it
            AutoModel.from_pretrained(str(older), trust_remote_code=True)
        assert not any("LOAD REPORT" in record.getMessage() for record in shown.buffer)
        assert f"{older} was saved without quantizer.signal_statistics.counts" in caplog.text
        config = json.loads((older / "config.json").read_text())
        (older / "config.json").write_text(json.dumps({**config, "codebook_size": config["codebook_size"] // 2}))
        with pytest.raises(ValueError, match="the load report above names the tensors"):
            load_tokenizer(str(older))
    finally:
        logging.getLogger("transformers").removeHandler(shown)
    assert any("LOAD REPORT" in record.getMessage() and "MISMATCH" in record.getMessage() for record in shown.buffer)


def test_a_model_folder_whose_weights_are_integers_or_lie_outside_it_is_refused(root, tmp_path, capsys):
    # Integer weights were cast to floats without a word (every token wrong, exit 0); a shard index naming
    # ../elsewhere made transformers read another folder's weights.
    folder = tmp_path / "integers"
    shutil.copytree(root / "model", folder)
    weights = load_file(folder / "model.safetensors")
    save_file({name: tensor.to(torch.int32) if tensor.is_floating_point() else tensor for name, tensor in weights.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    assert main(["inspect", "--model", str(folder)]) == 1
    assert "store" in (line := cli_error_line(capsys, "inspect")) and "as I32, not floating point" in line, line
    save_file({name: tensor.half() if tensor.is_floating_point() else tensor for name, tensor in weights.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    assert main(["inspect", "--model", str(folder)]) == 0  # half precision is a float: loads
    capsys.readouterr()
    from cdb_tokenizer.tools.loading import load_tokenizer

    save_file({name: tensor.to(torch.int32) if tensor.is_floating_point() else tensor for name, tensor in weights.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
    with pytest.raises(ValueError, match="not floating point"):  # through `subfolder=` too
        load_tokenizer(str(tmp_path), subfolder="integers")
    # A Hub repository's weights too, read from the cache offline.
    from conftest import hub_cache

    hub_cache(tmp_path / "hub", "org/integers", {"0" * 40: folder}, {"main": "0" * 40})
    offline = mock.patch("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1"}), offline, pytest.raises(ValueError, match="not floating point"):
        load_tokenizer("org/integers", cache_dir=str(tmp_path / "hub"))

    folder = tmp_path / "sharded"
    shutil.copytree(root / "model", folder)
    (tmp_path / "elsewhere").mkdir()
    shutil.move(folder / "model.safetensors", tmp_path / "elsewhere" / "weights.safetensors")
    index = {"metadata": {}, "weight_map": {name: "../elsewhere/weights.safetensors" for name in weights}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["inspect", "--model", str(folder)]) == 1
    assert "lists weight files outside" in cli_error_line(capsys, "inspect")


# The prototypes record where their labels came from: a local path, absolute or relative (the --prototypes flag).
@pytest.mark.parametrize("source", ["text:/home/jdoe/cfg/labels.txt", "text:clients/jdoe/labels.txt"])
def test_publish_staging_scrubs_relative_paths_and_safetensors_metadata(root, tmp_path, source):
    from safetensors import safe_open

    from cdb_tokenizer.tools.publishing import stage_folder
    from cdb_tokenizer.tools.teacher import load_prototypes, save_prototypes

    output = tmp_path / "out"
    shutil.copytree(root / "model", output)
    # Labels are JSON in the metadata: a Windows path's escaped backslashes were cut as text (leaving "Users\\jdoe"
    # and a file whose labels no longer parsed).
    labels = ["cat", "/home/jdoe/clients/dog", "C:\\Users\\jdoe\\rocket", "sky " + "hf_" + "Q" * 30, *"abcd"]
    save_prototypes(output / "prototypes.safetensors", torch.randn(8, 32), labels=labels, source=source)
    os.chmod(output / "prototypes.safetensors", 0o644)
    training_config = {"train_data_dir": "../jdoe/photos", "prototypes": "text:./jdoe/labels.txt",
                       "clip_pretrained": "file:///home/jdoe/clip.safetensors", "dataset_name": "/home/jdoe/ds"}  # fmt: skip
    (output / "training_config.json").write_text(json.dumps(training_config))
    staged = stage_folder(output, tmp_path / "staged", "me/tokenizer")
    with safe_open(str(staged / "prototypes.safetensors"), framework="pt") as handle:
        assert handle.metadata()["source"] == "text:labels.txt"
        assert handle.get_tensor("prototypes").shape == (8, 32)
    assert load_prototypes(staged / "prototypes.safetensors")[1] == ["cat", "dog", "rocket", "sky [redacted]", *"abcd"]
    assert stat.S_IMODE((staged / "prototypes.safetensors").stat().st_mode) == 0o644  # rewritten, not made 0o600
    text = "\n".join(p.read_text(errors="ignore") for p in staged.rglob("*") if p.suffix in (".json", ".md"))
    assert "jdoe" not in text
    card = (staged / "README.md").read_text()
    assert "huggingface.co/datasets/" not in card  # a local data set folder is not a Hub data set


def test_keys_named_for_image_tokens_are_data_not_secrets():
    # Every key containing "token" went: a prior's training_config.json lost --tokens_dir and --tokenizer.
    from cdb_tokenizer.tools.redaction import redact_secrets

    config = {"tokens_dir": "w/tokens", "tokenizer": "org/tok", "num_image_tokens": 256, "image_tokens": [1, 2],
              "hub_token": "abc", "HF-TOKEN": "abc", "accessToken": "abc", "token": "abc", "token_alignment_weight": 0.5,
              "github_tokens": ["ghp_x"], "hub_token2": "x", "accessTokenValue": "x", "tokenKey": "k"}  # fmt: skip
    assert redact_secrets(config) == {"tokens_dir": "w/tokens", "tokenizer": "org/tok", "num_image_tokens": 256,
                                      "image_tokens": [1, 2], "token_alignment_weight": 0.5}  # fmt: skip
    # A code role's name is the user's: one named text_tokens stays in training_config.json (it was dropped).
    roles = {"model_config": {"code_roles": {"background": [0, 32], "text_tokens": [32, 64]}}}
    assert redact_secrets(roles) == roles


def test_tracker_hparams_carry_no_local_paths_or_secrets():
    import training.train as train

    values = train.hparams({"train_data_dir": "/home/jdoe/photos", "hub_token": "hf_" + "Q" * 30, "prototypes":
                            "text:../jdoe/labels.txt", "resolution": 32, "code_roles": {"a": [0, 8]}})  # fmt: skip
    assert values == {"train_data_dir": "photos", "prototypes": "text:labels.txt", "resolution": 32,
                      "code_roles": "{'a': [0, 8]}"}  # fmt: skip
    # Relative ones too, under the flags that name files and folders (they were passed as given).
    relative = train.hparams({"train_data_dir": "data/acme_secret_project/images", "output_dir": "runs/jdoe/exp1",
                              "prototypes": "text:labels/acme.txt", "clip_pretrained": "hf-hub:org/clip",
                              "dataset_name": "org/photos", "resume_from_checkpoint": "latest"})  # fmt: skip
    assert relative == {"train_data_dir": "images", "output_dir": "exp1", "prototypes": "text:acme.txt",
                        "clip_pretrained": "hf-hub:org/clip", "dataset_name": "org/photos",
                        "resume_from_checkpoint": "latest"}  # fmt: skip


# ------------------------------------------------------------------------------------------------ wrong input


@pytest.mark.parametrize(
    "tokens, kwargs, error, message",
    [
        (torch.zeros(1, 64, dtype=torch.bool), {}, TypeError, "torch.bool"),
        (torch.zeros(1, 64, dtype=torch.uint8), {}, TypeError, "torch.uint8"),
        (torch.zeros(1, 64, dtype=torch.int16), {}, TypeError, "torch.int16"),
        (torch.zeros(1, 64), {}, TypeError, "torch.float32"),
        (torch.zeros(0, 64, dtype=torch.long), {}, ValueError, "empty"),
        (torch.zeros(1, 0, dtype=torch.long), {}, ValueError, "empty"),
        (torch.zeros(1, 0, 8, dtype=torch.long), {}, ValueError, "empty"),
        (torch.zeros(1, 64, dtype=torch.long), {"height": -32, "width": -32}, ValueError, "positive integer number of pixels"),
        (torch.zeros(1, 64, dtype=torch.long), {"height": 0, "width": 32}, ValueError, "positive integer number of pixels"),
        (torch.full((1, 64), 64), {}, ValueError, r"code ids in \[0, 64\)"),
        (torch.zeros(1, 16, dtype=torch.long), {}, ValueError, "default 8x8 token grid"),
        (torch.zeros(1, 256, dtype=torch.long), {}, ValueError, "default 8x8 token grid"),
    ],
)
def test_decode_refuses_tokens_it_cannot_decode_faithfully(tokens, kwargs, error, message):
    with pytest.raises(error, match=message):
        tiny_model().decode_image_tokens(tokens, **kwargs)


def test_decode_still_takes_int32_tokens_and_explicit_sizes():
    model = tiny_model().eval()
    assert model.decode_image_tokens(torch.zeros(1, 64, dtype=torch.int32)).shape == (1, 3, 32, 32)
    assert model.decode_image_tokens(torch.zeros(1, 16, dtype=torch.long), height=16, width=16).shape == (1, 3, 16, 16)


def test_encode_refuses_unnormalised_pixels_and_casts_other_float_dtypes(photo_batch):
    model = tiny_model().eval()
    with pytest.raises(ValueError, match=r"far outside the model's \[-1, 1\].*CDBVQImageProcessor"):
        model.encode((photo_batch + 1) * 127.5)  # [0, 255] floats
    with pytest.raises(ValueError, match="far outside"):
        model.encode(photo_batch + 2)
    reference = model.encode(photo_batch).image_tokens
    assert model.encode(photo_batch * 1.02).image_tokens.shape == reference.shape  # slight overshoot is accepted
    assert torch.equal(model.encode(photo_batch.double()).image_tokens, reference)
    assert model.encode(photo_batch.half()).image_tokens.shape == reference.shape
    assert model.encode(photo_batch.bfloat16()).image_tokens.shape == reference.shape


def _rotated_jpeg(path: Path) -> Image.Image:
    """A photo stored on its side with EXIF orientation 6 (as phones write it); returns the upright image."""
    upright = sample_photos("skimage")[1].resize((48, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def test_exif_orientation_is_applied_wherever_images_are_opened(root, tmp_path):
    upright = _rotated_jpeg(tmp_path / "rotated.jpg")
    processor = CDBVQImageProcessor(size={"height": 32, "width": 32})
    expected = processor(upright, return_tensors="pt").pixel_values
    with Image.open(tmp_path / "rotated.jpg") as image:
        assert image.size == (32, 48)  # stored on its side
        from_processor = processor(image, return_tensors="pt").pixel_values
    from_file = processor(decode_image(str(tmp_path / "rotated.jpg")), return_tensors="pt").pixel_values
    from_bytes = processor(decode_image({"bytes": (tmp_path / "rotated.jpg").read_bytes(), "path": None}), return_tensors="pt").pixel_values
    for values in (from_processor, from_file, from_bytes):
        assert torch.allclose(values, expected)
    upright.save(tmp_path / "upright.png")
    for name in ("rotated.jpg", "upright.png"):
        assert main(["encode", str(tmp_path / name), "--model", str(root / "model"), "--out", str(tmp_path / f"{name}.safetensors")]) == 0
    assert torch.equal(load_file(tmp_path / "rotated.jpg.safetensors")["image_tokens"],
                       load_file(tmp_path / "upright.png.safetensors")["image_tokens"])  # fmt: skip


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG file that announces width x height pixels (what a decompression bomb looks like from outside)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b""))  # fmt: skip


def test_images_over_the_pixel_budget_are_refused_before_decoding(tmp_path, caplog, monkeypatch):
    import cdb_tokenizer.tools.data as data_module

    (tmp_path / "bomb.png").write_bytes(_png_header(20000, 20000))
    (tmp_path / "big.png").write_bytes(_png_header(9000, 8000))
    (tmp_path / "at_budget.png").write_bytes(_png_header(8000, 8000))
    # Both headers are truncated files, so either comes back None; the error collected says which were refused for
    # their size, unread: 72 MP is over the default 64 MP, 64 MP exactly is not.
    errors = []
    assert decode_image(str(tmp_path / "big.png"), errors=errors) is None  # skipped (and counted) in data sets
    assert data_module.skipped_image_message(str(tmp_path / "big.png"), errors).endswith(
        "big.png (9000x8000 pixels is over the 64-megapixel budget)"
    )
    errors = []
    assert decode_image(str(tmp_path / "at_budget.png"), errors=errors) is None  # truncated: unreadable
    assert "budget" not in str(errors) and isinstance(errors[0], OSError)
    Image.new("RGB", (100, 100)).save(tmp_path / "small.png")
    assert decode_image(str(tmp_path / "small.png"), max_pixels=5_000) is None
    assert decode_image(str(tmp_path / "small.png"), max_pixels=10_000) is not None
    # The default is the module's budget, read at each call: a real image over it is refused, under it decoded.
    monkeypatch.setattr(data_module, "MAX_IMAGE_PIXELS", 5_000)
    assert decode_image(str(tmp_path / "small.png")) is None
    monkeypatch.setattr(data_module, "MAX_IMAGE_PIXELS", 10_000)
    assert decode_image(str(tmp_path / "small.png")) is not None


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["inspect", "--model", "{corrupt}"], "could not load model"),
        (["inspect", "--model", "{mismatch}"], "do not fit its config.json: quantizer.codebook.weight is (64, 8) in the file but (128, 8)"),
        (["inspect", "--model", "{bad_json}"], "config.json is not valid JSON"),
        (["encode", "{photo}", "--model", "{model}", "--out", "{tmp}"], "is a folder"),
        (["encode", "{photo}", "--model", "{model}", "--out", "/dev/null"], "not a regular file"),
        (["encode", "{photo}", "--model", "{model}", "--out", "{link}"], "symbolic link"),
        (["decode", "{tokens}", "--out", "{photo}"], "exists and is not a folder"),
        (["decode", "{tokens}", "--out", "{link_folder}"], "not a regular file"),
        (["reconstruct", "{photo}", "--model", "{model}", "--out", "/proc/version"], "exists and is not a folder"),
        (["decode", "{tokens}", "--out", "/proc/self/no/such"], "cannot create the folder"),
        (["decode", "{out_of_range}", "--out", "{tmp}/d"], "outside the model's [0, 64)"),
        (["decode", "{float_tokens}", "--out", "{tmp}/d"], "not integer code ids"),
        (["decode", "{empty_tokens}", "--out", "{tmp}/d"], "holds no tokens"),
        (["decode", "{wrong_grid}", "--out", "{tmp}/d"], "metadata says 8x8"),
        (["decode", "{truncated}", "--out", "{tmp}/d"], "truncated"),
        (["encode", "{bomb}", "--model", "{model}", "--out", "{tmp}/t.safetensors"], "too large to decode safely"),
        (["encode", "{big}", "--model", "{model}", "--out", "{tmp}/t.safetensors"], "over the budget of 64 megapixels (--max_image_pixels)"),
        (["encode", "{photo}", "--model", "{model}", "--out", "{tmp}/t.safetensors", "--max_image_pixels", "1000"], "over the budget of 1,000 pixels (--max_image_pixels)"),
    ],
)
def test_cli_user_errors_are_one_line_without_a_traceback(root, tmp_path, capsys, arguments, message):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    corrupt, mismatch, bad_json = (tmp_path / name for name in ("corrupt", "mismatch", "bad_json"))
    for folder in (corrupt, mismatch, bad_json):
        shutil.copytree(root / "model", folder)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 100)
    config = json.loads((mismatch / "config.json").read_text())
    (mismatch / "config.json").write_text(json.dumps({**config, "codebook_size": 128}))
    (bad_json / "config.json").write_text("{not json")
    (tmp_path / "link.safetensors").symlink_to(victim)
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "p0.png").symlink_to(victim)
    (tmp_path / "bomb.png").write_bytes(_png_header(20000, 20000))
    (tmp_path / "big.png").write_bytes(_png_header(9000, 8000))
    (tmp_path / "truncated.safetensors").write_bytes((root / "tokens.safetensors").read_bytes()[:-20])
    values = {
        "model": root / "model", "photo": root / "photos" / "p0.png", "tokens": root / "tokens.safetensors",
        "tmp": tmp_path, "corrupt": corrupt, "mismatch": mismatch, "bad_json": bad_json,
        "link": tmp_path / "link.safetensors", "link_folder": tmp_path / "links", "bomb": tmp_path / "bomb.png",
        "big": tmp_path / "big.png", "truncated": tmp_path / "truncated.safetensors",
    }  # fmt: skip
    # Copied elsewhere, the model is named by its absolute path, as files written before 2026-11-30 did.
    _token_file(root, str(tmp_path / "tokens.safetensors"), model=str((root / "model").resolve()))
    values["out_of_range"] = _token_file(tmp_path, "range.safetensors", torch.full((1, 8, 8), 999, dtype=torch.int32))
    values["float_tokens"] = _token_file(tmp_path, "float.safetensors", torch.full((1, 8, 8), 1.5))
    values["empty_tokens"] = _token_file(tmp_path, "empty.safetensors", torch.zeros(0, 8, 8, dtype=torch.int32))
    values["wrong_grid"] = _token_file(tmp_path, "grid.safetensors", torch.zeros(1, 4, 4, dtype=torch.int32))
    assert main([argument.format(**{k: str(v) for k, v in values.items()}) for argument in arguments]) == 1
    assert message in cli_error_line(capsys, arguments[0])
    assert victim.read_text() == "precious"


def test_debug_shows_the_traceback(root, tmp_path, capsys):
    (tmp_path / "corrupt").mkdir()
    shutil.copytree(root / "model", tmp_path / "corrupt", dirs_exist_ok=True)
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"\x00" * 100)
    assert main(["inspect", "--model", str(tmp_path / "corrupt"), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("cdb-vq inspect: error: could not load model")


def test_inputs_with_the_same_base_name_never_overwrite_each_other(root, tmp_path, capsys):
    photos = sample_photos("skimage")[:3]
    for name, photo in zip(("a.png", "a-1.png", "a.jpg"), photos):
        photo.save(tmp_path / name)
    inputs = [str(tmp_path / name) for name in ("a.png", "a-1.png", "a.jpg")]
    assert main(["reconstruct", *inputs, "--model", str(root / "model"), "--out", str(tmp_path / "r")]) == 0
    assert sorted(p.name for p in (tmp_path / "r" / "reconstructions").iterdir()) == ["a-1.png", "a-2.png", "a.png"]
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    photos[0].save(tmp_path / "x" / "p.png")
    photos[1].save(tmp_path / "y" / "p.png")
    tokens = tmp_path / "t.safetensors"
    assert main(["encode", str(tmp_path / "x" / "p.png"), str(tmp_path / "y" / "p.png"), "--model", str(root / "model"), "--out", str(tokens)]) == 0
    assert main(["decode", str(tokens), "--out", str(tmp_path / "d")]) == 0
    decoded = sorted((tmp_path / "d").iterdir())
    assert [p.name for p in decoded] == ["p-1.png", "p.png"]
    with Image.open(decoded[0]) as first, Image.open(decoded[1]) as second:
        assert not np.array_equal(np.asarray(first), np.asarray(second))


def test_the_load_report_is_held_for_its_own_thread_and_error_only(root, tmp_path):
    # Another thread's failing load lost its table into this one's list; a folder whose path holds "report" showed
    # the whole table before a one-line error.
    import logging
    import logging.handlers
    import threading

    from cdb_tokenizer.modeling_cdb_vq import held_load_report
    from cdb_tokenizer.tools.loading import load_tokenizer

    misfit = tmp_path / "misfit"
    shutil.copytree(root / "model", misfit)
    config = json.loads((misfit / "config.json").read_text())
    (misfit / "config.json").write_text(json.dumps({**config, "codebook_size": config["codebook_size"] // 2}))
    reports = tmp_path / "reports" / "m"
    shutil.copytree(root / "model", reports)
    weights = load_file(root / "model" / "model.safetensors")
    weights.pop(next(name for name in weights if name.endswith(".bias")))
    save_file(weights, str(reports / "model.safetensors"), metadata={"format": "pt"})
    shown = logging.handlers.BufferingHandler(capacity=100)
    logging.getLogger("transformers").addHandler(shown)
    errors, other = [], []

    def load_misfit():
        with pytest.raises(ValueError, match="the load report above") as error:
            load_tokenizer(str(misfit))
        errors.append(error)

    try:
        with held_load_report(other):
            worker = threading.Thread(target=load_misfit)
            worker.start()
            worker.join()
        assert errors and not other
        assert sum("LOAD REPORT" in record.getMessage() for record in shown.buffer) == 1
        shown.buffer.clear()
        with pytest.raises(ValueError, match="parameters are missing"):
            load_tokenizer(str(reports))
        assert not any("LOAD REPORT" in record.getMessage() for record in shown.buffer)
    finally:
        logging.getLogger("transformers").removeHandler(shown)
