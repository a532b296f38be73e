"""Restoration training end to end: --degradation is recorded in the config, `cdb-vq restore` needs it."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from conftest import tiny_model

import cdb_tokenizer.tools.steps as steps_module
from cdb_tokenizer import CDBVQImageProcessor, CDBVQModel
from cdb_tokenizer.tools.cli import main as cli_main
from cdb_tokenizer.tools.degradations import degrade
from cdb_tokenizer.tools.steps import derived_seed
from training.train import main as train_main, parse_args

RUN = ["--resolution", "32", "--base_channels", "16", "--channel_multipliers", "1", "2", "2", "--num_res_blocks", "1",
       "--norm_num_groups", "8", "--latent_dim", "16", "--codebook_size", "48", "--codebook_dim", "8", "--semantic_dim",
       "32", "--num_prototypes", "8", "--router_dim", "8", "--model_preset", "tiny", "--train_batch_size", "2",
       "--num_validation_images", "2", "--clip_model", "none", "--report_to", "none", "--lpips_weight", "0",
       "--disc_weight", "0", "--max_train_steps", "2", "--validation_steps", "2", "--checkpointing_steps", "2"]  # fmt: skip


DEGRADATION = "gaussian_blur:0.5-2 | noise:0.02"


@pytest.fixture(scope="module")
def restoration_run_and_batches(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The restoration run, and what each training step's loss saw: the encoder's input and the target."""
    output_dir = tmp_path_factory.mktemp("restore_run")
    seen = []
    real = steps_module.compute_losses

    def recording(model, pixel_values, loss_module, teacher, step, *args, target_pixel_values=None, **kwargs):
        seen.append({"step": step, "inputs": pixel_values.detach().clone(),
                     "target": None if target_pixel_values is None else target_pixel_values.detach().clone()})  # fmt: skip
        return real(model, pixel_values, loss_module, teacher, step, *args, target_pixel_values=target_pixel_values, **kwargs)

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(steps_module, "compute_losses", recording)
        metrics = train_main(RUN + ["--output_dir", str(output_dir), "--degradation", DEGRADATION,
                                    "--high_frequency_weight", "0.5", "--role_preset", "three", "--role_supervision_weight", "1"])  # fmt: skip
    assert "restoration_psnr" in metrics and "degraded_input_psnr" in metrics
    return output_dir, seen


@pytest.fixture(scope="module")
def restoration_run(restoration_run_and_batches) -> Path:
    return restoration_run_and_batches[0]


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photos") / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype("uint8")).save(path)
    return path


def test_a_restoration_run_records_its_degradation_and_writes_role_pictures(restoration_run):
    config = json.loads((restoration_run / "config.json").read_text())
    assert config["restoration_degradation"] == "gaussian_blur:0.5-2|noise:0.02"
    assert config["code_roles"] == {"structure": [0, 16], "texture": [16, 32], "colour": [32, 48]}
    assert (restoration_run / "role_map.png").is_file()
    # restorations.png: degraded input | restored | original, each row one tile wider than reconstructions.png's.
    restorations, reconstructions = (Image.open(restoration_run / f"{name}.png") for name in ("restorations", "reconstructions"))
    tile = (reconstructions.width - 3 * 6) // 2
    assert restorations.size == (reconstructions.width + tile + 6, reconstructions.height)
    records = [json.loads(line) for line in (restoration_run / "logs" / "train_log.jsonl").read_text().splitlines()]
    logged = set().union(*records)
    assert {"loss/high_frequency", "loss/role_supervision", "validation/restoration_psnr"} <= logged


def test_each_picture_of_restorations_png_gets_its_own_draw(tmp_path, monkeypatch):
    # Each picture was degraded alone under one seed: all got the same alternative of an 'A|B' spec and the same
    # strength of a range, so the figure showed one of them only.
    import argparse

    import training.train as train_script

    shown = {}
    monkeypatch.setattr(train_script, "save_reconstruction_figure",
                        lambda *args, degraded, **kwargs: shown.update(degraded=degraded))  # fmt: skip
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    args = argparse.Namespace(degradation="gaussian_blur:0.5-2.5|noise:0.02-0.2")
    train_script.save_restoration_figure(tiny_model().eval(), [image] * 4, args, {}, tmp_path / "restorations.png")
    assert any(not torch.equal(shown["degraded"][0], other) for other in shown["degraded"][1:])


def test_restoration_training_feeds_the_encoder_degraded_images_and_targets_the_clean_ones(restoration_run_and_batches):
    _, seen = restoration_run_and_batches
    assert [batch["step"] for batch in seen] == [0, 1]  # --max_train_steps 2, one micro-batch each
    seed = parse_args(RUN + ["--output_dir", "unused"]).seed
    for batch in seen:
        inputs, target = batch["inputs"], batch["target"]
        assert target is not None and target.shape == inputs.shape  # the loss compares with the clean batch
        assert not torch.equal(inputs, target)  # ... while the encoder sees something else
        # ... namely the clean batch degraded by the run's spec, under the micro-batch's seed (what a resume redraws).
        expected = degrade(target, DEGRADATION, seed=derived_seed(seed, batch["step"], 0, 0))
        torch.testing.assert_close(inputs, expected)


def test_restore_writes_restored_images(restoration_run, photo_file, tmp_path, capsys):
    assert cli_main(["restore", str(photo_file), "--model", str(restoration_run), "--out", str(tmp_path / "out")]) == 0
    written = np.asarray(Image.open(tmp_path / "out" / "photo.png"))
    assert written.shape == (32, 32, 3)
    # The photo comes back at the processor's size, which is said (it was silently resized and cropped).
    assert "into " + str(tmp_path / "out") + " at 32x32 pixels, as the model's image processor prepared them (the model was trained to undo gaussian_blur:0.5-2|noise:0.02)" in capsys.readouterr().out
    # The file is the model's restoration of the photo (through its tokens), not the photo itself.
    model = CDBVQModel.from_pretrained(restoration_run).eval()
    processor = CDBVQImageProcessor.from_pretrained(restoration_run)
    pixel_values = processor(Image.open(photo_file), return_tensors="pt").pixel_values
    with torch.no_grad():
        restored = model.decode(model.encode(pixel_values).image_tokens)
    expected = processor.postprocess(restored, return_tensors="np").pixel_values[0]
    np.testing.assert_array_equal(written, expected)
    resized_input = processor.postprocess(pixel_values, return_tensors="np").pixel_values[0]
    assert not np.array_equal(written, resized_input)


def test_restore_refuses_a_model_trained_without_a_degradation(photo_file, tmp_path, capsys):
    folder = tmp_path / "plain"
    tiny_model().save_pretrained(folder)
    CDBVQImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    capsys.readouterr()  # what saving printed
    assert cli_main(["restore", str(photo_file), "--model", str(folder), "--out", str(tmp_path / "out")]) == 1
    error = [line for line in capsys.readouterr().err.splitlines() if "cdb-vq restore" in line]
    assert len(error) == 1 and error[0].startswith("cdb-vq restore: error: ")
    error = error[0]
    assert "was not trained for restoration" in error and "--degradation" in error
    assert not (tmp_path / "out" / "photo.png").exists()


def test_reconstruct_role_map_and_inspect_code_report(restoration_run, photo_file, tmp_path, capsys):
    out = tmp_path / "recon"
    assert cli_main(["reconstruct", str(photo_file), "--model", str(restoration_run), "--out", str(out), "--role-map"]) == 0
    assert (out / "role_maps" / "photo.png").is_file()
    assert cli_main(["inspect", "--model", str(restoration_run), "--codes", str(tmp_path / "codes.csv")]) == 0
    printed = capsys.readouterr().out
    assert "what the codes learned" in printed and "texture" in printed
    lines = (tmp_path / "codes.csv").read_text().splitlines()
    assert lines[0].startswith("code,usage,role,prototype") and len(lines) == 49
    assert cli_main(["inspect", "--model", str(restoration_run), "--codes", str(tmp_path / "codes.json")]) == 0
    # Both files hold the model's own readout, value for value (None: an empty CSV cell, JSON null).
    import csv

    report = CDBVQModel.from_pretrained(restoration_run).code_report()
    assert json.loads((tmp_path / "codes.json").read_text()) == pytest.approx(report)
    with open(tmp_path / "codes.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    for row, record in zip(rows, report, strict=True):
        for key, value in record.items():
            if value is None:
                assert row[key] == "", key
            elif isinstance(value, str):
                assert row[key] == value
            else:
                assert float(row[key]) == pytest.approx(value, rel=1e-6, abs=1e-12), key


def test_role_map_needs_roles(photo_file, tmp_path, capsys):
    folder = tmp_path / "plain"
    tiny_model().save_pretrained(folder)
    CDBVQImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    assert cli_main(["reconstruct", str(photo_file), "--model", str(folder), "--out", str(tmp_path / "o"), "--role-map"]) == 1
    assert "has no code roles" in capsys.readouterr().err


@pytest.mark.parametrize("spec, message", [("sharpen:1", "unknown degradation 'sharpen'"), ("noise:-1", "bad strength"),
                                           ("", "non-empty"),  # was a plain run, without a word
                                           ("gaussian_blur:0", "degrades nothing"), ("downscale:1", "degrades nothing")])  # fmt: skip
def test_bad_degradation_flags_are_refused(spec, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        parse_args(RUN + ["--output_dir", str(tmp_path / "x"), "--degradation", spec])
    assert message in capsys.readouterr().err


def test_model_card_shows_the_role_map_code_readout_and_restoration(restoration_run, tmp_path):
    from cdb_tokenizer.tools.publishing import stage_folder

    staged = stage_folder(restoration_run, tmp_path / "staged", "someone/deblur")
    card = (staged / "README.md").read_text()
    assert (staged / "role_map.png").is_file() and "![Role map](role_map.png)" in card
    assert "What the codes of each role learned" in card and "| texture | 16 |" in card
    assert "## Restoration" in card and "gaussian_blur:0.5-2|noise:0.02" in card
    assert "Restoration PSNR" in card
    assert (staged / "restorations.png").is_file() and "![Restorations](restorations.png)" in card


def test_a_resume_keeps_the_restoration_it_was_trained_for(restoration_run, tmp_path):
    """Resumed without --degradation, a restoration run went on with clean inputs and saved a model whose config no
    longer said it restores (so `cdb-vq restore` refused it), without a word."""
    import shutil

    output_dir = tmp_path / "run"
    shutil.copytree(restoration_run, output_dir)
    same = RUN + ["--output_dir", str(output_dir), "--max_train_steps", "3", "--resume_from_checkpoint", "latest",
                  "--role_preset", "three", "--role_supervision_weight", "1"]  # fmt: skip
    for flags, changed in [([], "restoration_degradation 'gaussian_blur:0.5-2|noise:0.02' -> None"),
                           (["--degradation", "noise:0.1", "--high_frequency_weight", "0.5"], "-> 'noise:0.1'")]:  # fmt: skip
        with pytest.raises(ValueError, match="checkpoint was trained with other settings .*" + re.escape(changed)):
            train_main(same + flags)
        # ... before anything is written: the run's training_config.json still says what it trained.
        assert json.loads((output_dir / "training_config.json").read_text())["degradation"] == DEGRADATION
    train_main(same + ["--degradation", DEGRADATION])  # the same degradation resumes (a loss weight may change)
    assert json.loads((output_dir / "config.json").read_text())["restoration_degradation"] == "gaussian_blur:0.5-2|noise:0.02"
    records = [json.loads(line) for line in (output_dir / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert max(record["step"] for record in records if "loss/total" in record) == 3


def test_the_codebook_starts_from_latents_of_degraded_images(monkeypatch):
    # The k-means initialisation encoded the clean images, while training only ever shows the encoder degraded ones.
    from accelerate import Accelerator

    from cdb_tokenizer import CDBVQConfig
    from training.train import initialize_codebook

    args = parse_args(RUN + ["--output_dir", "unused", "--degradation", DEGRADATION, "--kmeans_init_batches", "2"])
    model = CDBVQModel(CDBVQConfig(**args.model_config_dict))
    batches = [{"pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1} for _ in range(2)]
    seen = []
    real_encode = model.encode
    monkeypatch.setattr(model, "encode", lambda pixel_values, **kwargs: seen.append(pixel_values) or real_encode(pixel_values, **kwargs))
    initialize_codebook(args, model, iter(batches), Accelerator(cpu=True))
    assert len(seen) == 2
    for index, (batch, inputs) in enumerate(zip(batches, seen)):
        expected = degrade(batch["pixel_values"], DEGRADATION, seed=derived_seed(args.seed, -1, index, 0))
        torch.testing.assert_close(inputs, expected)


def test_restore_names_a_degradation_it_does_not_know(restoration_run, photo_file, tmp_path, capsys):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(restoration_run, folder)
    config = json.loads((folder / "config.json").read_text())
    config["restoration_degradation"] = "sharpen:3"  # a config from elsewhere: restore said it undoes "sharpen:3"
    (folder / "config.json").write_text(json.dumps(config))
    assert cli_main(["restore", str(photo_file), "--model", str(folder), "--out", str(tmp_path / "out")]) == 1
    assert "records restoration_degradation 'sharpen:3', which is no degradation this version knows" in capsys.readouterr().err
    assert not (tmp_path / "out" / "photo.png").exists()
    # One that degrades nothing (train.py refuses to make it) was accepted: "trained to undo gaussian_blur:0".
    config["restoration_degradation"] = "gaussian_blur:0"
    (folder / "config.json").write_text(json.dumps(config))
    assert cli_main(["restore", str(photo_file), "--model", str(folder), "--out", str(tmp_path / "out")]) == 1
    assert "records restoration_degradation 'gaussian_blur:0', which degrades nothing" in capsys.readouterr().err
    assert not (tmp_path / "out" / "photo.png").exists()
