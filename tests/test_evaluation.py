"""rFID and the other evaluation metrics, offline: a small random feature extractor stands in for Inception."""

import json
import os
import shutil
import logging
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import cdb_tokenizer.tools.evaluation as evaluation
from cdb_tokenizer import CDBVQImageProcessor
from cdb_tokenizer.tools.cli import main as cli_main
from cdb_tokenizer.tools.data import fixed_crops, sample_photos
from cdb_tokenizer.tools.evaluation import (
    FIDUnavailableError,
    RandomFeatureExtractor,
    evaluate,
    fid_metric,
    load_fid_reference,
    optional_fid_metric,
    save_fid_reference,
)
from conftest import RunsCode, cli_error_line, tiny_model

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


class _Output:
    def __init__(self, reconstruction: torch.Tensor, tokens: torch.Tensor):
        self.reconstruction, self.image_tokens = reconstruction, tokens


class StubTokenizer(nn.Module):
    """Stands in for a tokenizer whose reconstructions are chosen by the test: `perfect`, `noise` or `blur`."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.scale = nn.Parameter(torch.ones(()))  # evaluate reads the device and dtype from the parameters
        self.config = type("Config", (), {"codebook_size": 8})()

    def forward(self, pixel_values):
        if self.kind == "perfect":
            reconstruction = pixel_values.clone()
        elif self.kind == "noise":
            reconstruction = torch.rand(pixel_values.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
        else:
            low = nn.functional.avg_pool2d(pixel_values, 4)
            reconstruction = nn.functional.interpolate(low, size=pixel_values.shape[-2:], mode="bilinear")
        tokens = torch.zeros(pixel_values.shape[0], 2, 2, dtype=torch.long)
        return _Output(reconstruction, tokens)


@pytest.fixture(scope="module")
def held_out() -> torch.Tensor:
    """24 fixed 32x32 crops of scikit-learn's photos in [-1, 1]."""
    return fixed_crops(sample_photos("sklearn"), 32, 12, seed=0, crop_scale=(0.05, 0.5))


@pytest.fixture
def no_inception_weights(tmp_path, monkeypatch):
    """An empty torch hub cache and no network: the Inception weights cannot be had."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(evaluation, "reachable", lambda url, timeout=3.0: False)


def test_lpips_scores_the_clamped_reconstruction_like_psnr_and_ssim(held_out):
    stub = StubTokenizer("perfect")
    overshoot = lambda pixel_values: _Output(pixel_values * 1.5, torch.zeros(pixel_values.shape[0], 2, 2, dtype=torch.long))  # noqa: E731
    stub.forward = overshoot
    seen = []

    def lpips(reconstruction, target):
        seen.append((float(reconstruction.min()), float(reconstruction.max())))
        return torch.zeros(reconstruction.shape[0])

    evaluate(stub, [held_out[:4]], lpips=lpips, show_progress=False)
    assert seen and all(-1.0 <= low and high <= 1.0 for low, high in seen)


def test_rfid_of_a_set_against_itself_is_zero_and_against_noise_large(held_out):
    fid = fid_metric(RandomFeatureExtractor())
    batches = list(held_out.split(8))
    perfect = evaluate(StubTokenizer("perfect"), batches, fid=fid, show_progress=False)
    blur = evaluate(StubTokenizer("blur"), batches, fid=fid, show_progress=False)
    noise = evaluate(StubTokenizer("noise"), batches, fid=fid, show_progress=False)
    assert abs(perfect["rfid"]) < 1e-4
    assert noise["rfid"] > 10 * blur["rfid"] > 10 * abs(perfect["rfid"])
    assert blur["rfid"] > 1e-3
    # The other metrics come along: a perfect reconstruction has infinite-like PSNR and SSIM 1.
    assert perfect["psnr"] > 60 and perfect["ssim"] == pytest.approx(1.0, abs=1e-4)
    assert noise["psnr"] < blur["psnr"] < perfect["psnr"]
    assert perfect["num_images"] == held_out.shape[0]


def test_rfid_is_reset_between_evaluations_and_runs_on_a_real_tokenizer(held_out):
    model = tiny_model()
    fid = fid_metric(RandomFeatureExtractor(num_features=32))
    first = evaluate(model, list(held_out.split(8)), fid=fid, show_progress=False)
    again = evaluate(model, list(held_out.split(8)), fid=fid, show_progress=False)
    assert first["rfid"] == pytest.approx(again["rfid"], rel=1e-6)  # states do not pile up across calls
    assert first["rfid"] > 0 and set(first) >= {"psnr", "ssim", "utilization", "perplexity", "rfid"}


def test_an_rfid_of_fewer_images_than_feature_dimensions_is_flagged(held_out, caplog):
    # Rank-deficient covariances: the number is mostly sample size (118 at N = 32 for two samples of one
    # distribution with 256-d features), and nothing said so.
    count = held_out.shape[0]
    with caplog.at_level("WARNING"):
        evaluate(StubTokenizer("blur"), list(held_out.split(8)), fid=fid_metric(RandomFeatureExtractor(num_features=count + 1)),
                 show_progress=False)  # fmt: skip
    assert f"rFID of {count} images with {count + 1}-dimensional features" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        evaluate(StubTokenizer("blur"), list(held_out.split(8)), fid=fid_metric(RandomFeatureExtractor(num_features=count - 1)),
                 show_progress=False)  # fmt: skip
    assert "rank-deficient" not in caplog.text


def test_saved_reference_statistics_give_the_same_rfid(held_out, tmp_path):
    fid = fid_metric(RandomFeatureExtractor())
    batches = list(held_out.split(8))
    direct = evaluate(StubTokenizer("blur"), batches, fid=fid, show_progress=False)
    evaluate(StubTokenizer("perfect"), batches, fid=fid, show_progress=False)
    path = save_fid_reference(fid, tmp_path / "reference.safetensors", description="held-out crops")
    reference = load_fid_reference(path)
    assert int(reference["real_features_num_samples"]) == held_out.shape[0]
    reused = evaluate(StubTokenizer("blur"), batches, fid=fid, fid_reference=reference, show_progress=False)
    assert reused["rfid"] == pytest.approx(direct["rfid"], rel=1e-6)
    with pytest.raises(ValueError, match="another one"):
        evaluate(StubTokenizer("blur"), batches, fid=fid_metric(RandomFeatureExtractor(num_features=16)),
                 fid_reference=reference, show_progress=False)  # fmt: skip
    # Statistics that would give a wrong rFID without a word (nan, or another number once cast from integers).
    wrong = {"non-finite values in real_features_sum": {**reference, "real_features_sum": reference["real_features_sum"] * torch.nan},
             "real_features_cov_sum as torch.int64": {**reference, "real_features_cov_sum": reference["real_features_cov_sum"].long()},
             "fewer than 2 images": {**reference, "real_features_num_samples": torch.tensor(1)}}  # fmt: skip
    for message, statistics in wrong.items():
        with pytest.raises(ValueError, match=message):
            evaluate(StubTokenizer("blur"), batches, fid=fid, fid_reference=statistics, show_progress=False)
        save_file(statistics, str(tmp_path / "wrong.safetensors"))
        with pytest.raises(ValueError, match=message):
            load_fid_reference(tmp_path / "wrong.safetensors")


def test_without_inception_weights_fid_says_so_in_one_line_at_once(no_inception_weights, caplog):
    start = time.monotonic()
    with pytest.raises(FIDUnavailableError) as error:
        fid_metric()
    message = str(error.value)
    assert "\n" not in message and "torch hub cache" in message and "weights-inception" in message
    with caplog.at_level(logging.WARNING):
        assert optional_fid_metric() is None
    lines = [record.getMessage() for record in caplog.records if "rFID" in record.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("rFID left out")
    assert time.monotonic() - start < 5  # no download attempted, nothing waited on


def test_inception_weights_that_are_not_only_tensors_are_refused_unread(no_inception_weights, tmp_path):
    # torch-fidelity loads the file with weights_only=False: it must never see one that carries code.
    marker = tmp_path / "code-ran"
    hostile = tmp_path / "inception.pth"
    torch.save({"weight": RunsCode(marker)}, hostile)
    with pytest.raises(FIDUnavailableError, match="tensors only"):
        fid_metric(weights_path=str(hostile))
    os.makedirs(os.path.dirname(evaluation.inception_weights_file()))
    torch.save({"weight": RunsCode(marker)}, evaluation.inception_weights_file())
    with pytest.raises(FIDUnavailableError, match="tensors only"):
        fid_metric()
    assert not marker.exists()
    torch.save({"weight": torch.ones(2)}, hostile)
    assert evaluation.inception_weights(str(hostile)) == str(hostile)


def test_without_torch_fidelity_the_message_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    with pytest.raises(FIDUnavailableError, match="torch-fidelity"):
        fid_metric()


def test_a_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FIDUnavailableError, match="does not exist"):
        fid_metric(weights_path=str(tmp_path / "missing.pth"))


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    model = tiny_model()
    model.train()
    photos = sample_photos("skimage")
    model(CDBVQImageProcessor(size={"height": 32, "width": 32})(photos[:6], return_tensors="pt").pixel_values)
    model.eval().save_pretrained(root / "model")
    CDBVQImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "model")
    (root / "photos").mkdir()
    for index, photo in enumerate(photos[:5]):
        photo.save(root / "photos" / f"photo{index}.png")
    return {"model": root / "model", "photos": root / "photos", "root": root}


def _eval(arguments, capsys) -> tuple[dict, list[str], str]:
    assert cli_main(["eval", *arguments]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return json.loads(lines[-1]), lines, captured.err


def test_cli_eval_fid_with_the_random_extractor_and_a_reference_file(tokenizer_folder, capsys, tmp_path):
    base = ["--model", str(tokenizer_folder["model"]), "--data", str(tokenizer_folder["photos"]), "--no-lpips"]
    reference = tmp_path / "reference.safetensors"
    random_fid = ["--fid", "--fid_feature_extractor", "random", "--fid_reference", str(reference)]
    metrics, lines, err = _eval(base + random_fid, capsys)
    assert metrics["rfid"] > 0 and metrics["num_images"] == 5 and metrics["fid_feature_extractor"] == "random"
    assert any(line.startswith("rFID (random features)") for line in lines) and "not comparable" in err
    assert reference.is_file()
    again, _, _ = _eval(base + random_fid, capsys)
    assert again["rfid"] == pytest.approx(metrics["rfid"], rel=1e-6)
    plain, _, _ = _eval(base, capsys)
    assert "rfid" not in plain and plain["psnr"] == pytest.approx(metrics["psnr"], rel=1e-6)


def test_cli_eval_refuses_a_reference_of_another_setting_and_fid_options_without_fid(tokenizer_folder, capsys, tmp_path):
    base = ["eval", "--model", str(tokenizer_folder["model"]), "--data", str(tokenizer_folder["photos"]), "--no-lpips"]
    reference = tmp_path / "reference.safetensors"
    random_fid = ["--fid", "--fid_feature_extractor", "random", "--fid_reference", str(reference)]
    assert cli_main(base + random_fid + ["--resolution", "64"]) == 0 and reference.is_file()
    capsys.readouterr()
    # Statistics of 64x64 crops against 32x32 reconstructions gave an rFID without a word.
    assert cli_main(base + random_fid + ["--resolution", "32"]) == 1
    assert "was computed with resolution 64x64, this run uses 32x32" in cli_error_line(capsys, "eval")
    # The metrics file written over the reference it had just saved.
    assert cli_main(base + ["--fid", "--fid_feature_extractor", "random", "--fid_reference", str(tmp_path / "same.json"),
                        "--out", str(tmp_path / "same.json")]) == 1  # fmt: skip
    assert "--fid_reference and --out are the same file" in cli_error_line(capsys, "eval")
    # rFID options without --fid did nothing, silently.
    assert cli_main(base + ["--fid_reference", str(reference)]) == 1
    assert "--fid_reference without --fid: no rFID would be computed" in cli_error_line(capsys, "eval")


def test_cli_eval_without_inception_weights_reports_the_rest(tokenizer_folder, capsys, no_inception_weights):
    base = ["--model", str(tokenizer_folder["model"]), "--data", str(tokenizer_folder["photos"]), "--no-lpips"]
    metrics, _, err = _eval(base + ["--fid"], capsys)
    assert "rfid" not in metrics and metrics["psnr"] > 0 and metrics["num_images"] == 5
    assert len([line for line in err.splitlines() if "rFID" in line]) == 1


def test_cli_eval_with_a_damaged_lpips_file_leaves_lpips_out_and_reports_the_rest(tokenizer_folder, capsys, tmp_path, monkeypatch):
    # A file at the cache path that does not load as VGG's tensors ended eval with "'NoneType' object has no
    # attribute 'to'".
    from cdb_tokenizer.tools.losses import lpips_backbone_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    path, _ = lpips_backbone_file("vgg")
    Path(path).parent.mkdir(parents=True)
    Path(path).write_bytes(b"not a state dict" * 64)
    metrics, _, err = _eval(["--model", str(tokenizer_folder["model"]), "--data", str(tokenizer_folder["photos"])], capsys)
    assert "lpips" not in metrics and metrics["psnr"] > 0 and metrics["num_images"] == 5
    assert len([line for line in err.splitlines() if line.startswith("LPIPS left out: cannot load the LPIPS vgg weights")]) == 1


def test_cli_eval_checks_its_output_file_before_opening_the_data(tokenizer_folder, tmp_path, capsys, monkeypatch):
    # A refused --out came after the data set was opened (for a Hub id: downloaded).
    import cdb_tokenizer.tools.cli as cli

    monkeypatch.setattr(cli, "open_dataset", lambda *args: pytest.fail("the data was opened"))
    (tmp_path / "metrics.json").write_text("{}")
    arguments = ["eval", "--model", str(tokenizer_folder["model"]), "--data", "some-org/some-set", "--out", str(tmp_path / "metrics.json")]
    assert cli_main(arguments) == 1
    assert "exists" in cli_error_line(capsys, "eval")


def test_cli_eval_resolution_and_the_imagenet_protocol(tokenizer_folder, capsys, no_inception_weights):
    base = ["--model", str(tokenizer_folder["model"]), "--data", str(tokenizer_folder["photos"]), "--no-lpips"]
    at_64, _, _ = _eval(base + ["--resolution", "64"], capsys)
    model = evaluation_model(tokenizer_folder["model"])
    photos = [Image.open(path) for path in sorted(tokenizer_folder["photos"].glob("*.png"))]
    pixel_values = CDBVQImageProcessor(size={"height": 64, "width": 64})(photos, return_tensors="pt").pixel_values
    expected = evaluate(model, [pixel_values], show_progress=False)
    assert at_64["psnr"] == pytest.approx(expected["psnr"], rel=1e-4)
    # --protocol imagenet: 256x256 centre crops, rFID asked for (left out here: no weights), a folder keeps its split.
    protocol, _, err = _eval(base + ["--protocol", "imagenet", "--max_images", "2"], capsys)
    assert protocol["num_images"] == 2 and "rFID left out" in err
    # The numbers carry what was measured (the metrics file had N and the FID extractor only).
    assert protocol["setting"] == {"model": str(tokenizer_folder["model"]), "data": str(tokenizer_folder["photos"]),
                                   "split": "train", "max_images": 2, "protocol": "imagenet",
                                   "size": [256, 256], "resize": True, "resample": "bicubic",
                                   "center_crop": True}  # fmt: skip
    at_256, _, _ = _eval(base + ["--resolution", "256", "--max_images", "2"], capsys)
    own_size, _, _ = _eval(base + ["--max_images", "2"], capsys)  # the model's processor: 32x32
    assert protocol["psnr"] == pytest.approx(at_256["psnr"], rel=1e-6)  # the protocol measures at 256x256 ...
    assert protocol["psnr"] != pytest.approx(own_size["psnr"], rel=1e-3)  # ... not at the model's own size
    assert cli_main(["eval", *base, "--resolution", "30"]) == 1  # not divisible by the downsampling factor (4)
    assert "not divisible" in capsys.readouterr().err


def _model_with_processor(tokenizer_folder, folder: Path, **settings) -> str:
    """The tokenizer of `tokenizer_folder` in `folder`, with an image processor of other `settings`."""
    shutil.copytree(tokenizer_folder["model"], folder)
    CDBVQImageProcessor(**{"size": {"height": 32, "width": 32}, **settings}).save_pretrained(folder)
    return str(folder)


def test_cli_eval_resolution_resizes_bicubic_whatever_filter_the_model_saved(tokenizer_folder, tmp_path, capsys):
    # --resolution (and --protocol imagenet) is documented as bicubic; it kept the saved processor's filter, so the
    # same weights scored otherwise under "the standard protocol".
    nearest = _model_with_processor(tokenizer_folder, tmp_path / "nearest", resample=0)
    base = ["--data", str(tokenizer_folder["photos"]), "--no-lpips", "--max_images", "2", "--resolution", "64"]
    bicubic, _, _ = _eval(base + ["--model", str(tokenizer_folder["model"])], capsys)
    resized, _, _ = _eval(base + ["--model", nearest], capsys)
    assert resized["psnr"] == bicubic["psnr"] and resized["setting"]["resample"] == "bicubic"


def test_cli_eval_fid_of_one_image_is_one_sentence(tokenizer_folder, capsys):
    # Was "rFID needs at least two images. (0 unreadable images skipped)": two stops, and "1 unreadable images".
    arguments = ["eval", "--model", str(tokenizer_folder["model"]), "--data", str(tokenizer_folder["photos"]),
                 "--no-lpips", "--fid", "--fid_feature_extractor", "random", "--max_images", "1"]  # fmt: skip
    assert cli_main(arguments) == 1
    assert cli_error_line(capsys, "eval").endswith("rFID needs at least two images (0 unreadable images skipped).")


def test_cli_eval_refuses_a_reference_of_other_crops_made_otherwise(tokenizer_folder, tmp_path, capsys):
    # A processor sized {"shortest_edge": s} with a centre crop makes s x s crops, but its reference was recorded as
    # "as processed", which any other such processor matched: 32x32 statistics passed for 64x64 crops. Nor was the
    # resize filter recorded: bicubic statistics passed for nearest-neighbour crops.
    base = ["eval", "--data", str(tokenizer_folder["photos"]), "--no-lpips", "--max_images", "2", "--fid",
            "--fid_feature_extractor", "random", "--fid_reference", str(tmp_path / "ref.safetensors")]  # fmt: skip
    edge_32 = _model_with_processor(tokenizer_folder, tmp_path / "edge_32", size={"shortest_edge": 32})
    assert cli_main(base + ["--model", edge_32]) == 0
    capsys.readouterr()
    edge_64 = _model_with_processor(tokenizer_folder, tmp_path / "edge_64", size={"shortest_edge": 64})
    assert cli_main(base + ["--model", edge_64]) == 1
    assert "was computed with resolution 32x32, this run uses 64x64" in cli_error_line(capsys, "eval")
    nearest = _model_with_processor(tokenizer_folder, tmp_path / "nearest", resample=0)
    assert cli_main(base + ["--model", nearest]) == 1
    line = cli_error_line(capsys, "eval")
    assert "computed with resize bicubic + centre crop, this run uses nearest + centre crop" in line, line
    assert cli_main(base + ["--model", str(tokenizer_folder["model"])]) == 0  # the same 32x32 bicubic crops


def test_eval_protocol_keeps_the_split_the_user_gave(tokenizer_folder, capsys, monkeypatch):
    """--protocol imagenet fills --split only when it was not given: `--split train` on a Hub data set was read as
    the protocol's validation split (the flag could not be told from its default)."""
    import cdb_tokenizer.tools.cli as cli

    opened = []

    def open_dataset(data, image_column, split):  # the network call: only its arguments are recorded
        opened.append(split)
        raise FileNotFoundError("stop here")

    monkeypatch.setattr(cli, "open_dataset", open_dataset)
    base = ["eval", "--model", str(tokenizer_folder["model"]), "--no-lpips", "--protocol", "imagenet"]
    for extra, split in [(["--data", "org/images", "--split", "train"], "train"), (["--data", "org/images"], "validation"),
                         (["--data", str(tokenizer_folder["photos"])], "train"), (["--data", "org/images", "--split", "test"], "test")]:  # fmt: skip
        cli_main(base + extra)
        assert opened.pop() == split, extra
    cli_main(["eval", "--model", str(tokenizer_folder["model"]), "--data", "org/images"])  # no protocol
    assert opened.pop() == "train"
    # A local folder laid out as train/ + validation/ (ImageNet's) is read at the protocol's split: it evaluated the
    # training images. Without train/, the folder is one split, whatever its sub-folders.
    imagenet = tokenizer_folder["photos"].parent / "imagenet"
    (imagenet / "train").mkdir(parents=True), (imagenet / "validation").mkdir()
    cli_main(base + ["--data", str(imagenet)])
    assert opened.pop() == "validation"
    shutil.rmtree(imagenet / "validation")  # train/ + test/: which one the user meant is not guessed
    assert cli_main(base + ["--data", str(imagenet)]) == 1 and not opened
    assert "has a train/ folder but no validation/ one; pass --split" in capsys.readouterr().err
    shutil.rmtree(imagenet / "train")
    cli_main(base + ["--data", str(imagenet)])
    assert opened.pop() == "train"
    capsys.readouterr()


def evaluation_model(folder):
    from cdb_tokenizer import CDBVQModel

    return CDBVQModel.from_pretrained(folder).eval()


def test_train_validation_fid_the_picture_and_the_final_log_line(tmp_path, no_inception_weights, caplog):
    from test_training import PLAIN_RUN

    from training.train import main

    with caplog.at_level(logging.INFO):
        metrics = main(PLAIN_RUN + ["--output_dir", str(tmp_path / "run"), "--max_train_steps", "1",
                                    "--num_validation_images", "4", "--validation_fid", "random"])  # fmt: skip
    assert metrics["rfid"] > 0 and "psnr" in metrics
    assert metrics["rfid_features"] == "random"  # metrics.json says which features, so no card calls it an rFID
    final = caplog.records[-1].getMessage()
    assert "Done in " in final and "wall time" in final and f"PSNR {metrics['psnr']:.2f} dB" in final
    assert f"rFID {metrics['rfid']:.3f}" in final
    with Image.open(tmp_path / "run" / "reconstructions.png") as picture:  # the demo's two photos, shorter side 256
        assert picture.width >= 2 * 384 and picture.height >= 3 * 256
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        offline = main(PLAIN_RUN + ["--output_dir", str(tmp_path / "offline"), "--max_train_steps", "1",
                                    "--num_validation_images", "4", "--validation_fid"])  # fmt: skip
    assert "rfid" not in offline and "rfid_features" not in offline and "psnr" in offline
    assert len([r for r in caplog.records if r.getMessage().startswith("rFID left out")]) == 1


def test_detail_box_finds_the_textured_window_and_the_figure_has_full_size_tiles():
    from cdb_tokenizer.tools.evaluation import detail_box, reconstruction_figure

    image = torch.zeros(3, 256, 384)
    image[:, 160:224, 32:96] = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    top, left = detail_box((image + 1) / 2, 64)
    assert abs(top - 160) <= 16 and abs(left - 32) <= 16
    noisy = (image + 0.1 * torch.randn(image.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    figure = reconstruction_figure([image, image[:, :, :256]], [noisy, noisy[:, :, :256]], zoom_size=64, zoom_factor=4)
    assert figure.width >= 2 * 384 and figure.height >= 256 + 256 + 4 * 64
    # The zoomed tiles are the detail window magnified 4x (nearest): the last row, its two 256x256 tiles 6 pixels
    # (the figure's gap) in from the left and bottom edges, original then reconstruction.
    import numpy as np

    pixels = np.asarray(figure)
    def zoomed_window(source):
        window = (((source[:, top : top + 64, left : left + 64] + 1) / 2).clamp(0, 1) * 255).round().byte()
        return window.permute(1, 2, 0).numpy().repeat(4, axis=0).repeat(4, axis=1)

    for column, source in ((6, image), (6 + 256 + 6, noisy)):
        np.testing.assert_array_equal(pixels[-6 - 256 : -6, column : column + 256], zoomed_window(source))
    # A restoration model's figure: degraded input | restored | original, in every row.
    blurred = torch.nn.functional.avg_pool2d(image[None], 3, stride=1, padding=1)[0]
    restoration = reconstruction_figure([image], [noisy], zoom_size=64, zoom_factor=4, degraded=[blurred])
    assert restoration.width == 3 * 384 + 4 * 6
    pixels = np.asarray(restoration)
    for column, source in ((6, blurred), (6 + 262, noisy), (6 + 2 * 262, image)):
        np.testing.assert_array_equal(pixels[-6 - 256 : -6, column : column + 256], zoomed_window(source))


def test_thread_count_follows_idle_cores_and_explicit_settings(monkeypatch):
    import argparse

    import training.train as train_script

    monkeypatch.setattr(train_script.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for load, expected in ((0.1, 2), (1.3, 1), (6.0, 1)):
        monkeypatch.setattr(train_script.os, "getloadavg", lambda load=load: (load, load, load))
        assert train_script.default_num_threads() == expected, load
    monkeypatch.setattr(train_script.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on this machine share its cores
    assert train_script.default_num_threads() == 1
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert train_script.set_num_threads(argparse.Namespace(num_threads=2)) == 2 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert train_script.set_num_threads(argparse.Namespace(num_threads=None)) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def cached_inception_weights(tmp_path, monkeypatch):
    """Random Inception weights written where the real ones are cached (the torch hub cache of a fresh TORCH_HOME),
    with any network check failing the test. Yields the file's path."""
    pytest.importorskip("torch_fidelity")
    from torch_fidelity import feature_extractor_inceptionv3 as inception_module

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(evaluation, "reachable", lambda url, timeout=3.0: pytest.fail("no network check expected"))
    with monkeypatch.context() as patch:  # build the network once without weights, to write a weights file
        patch.setattr(inception_module.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        patch.setattr(inception_module.torch, "load", lambda *args, **kwargs: {})
        network = inception_module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], "unused")
    path = Path(evaluation.inception_weights_file())
    path.parent.mkdir(parents=True)
    torch.save(network.state_dict(), path)
    return path


def test_inception_fid_loads_cached_weights_without_network(cached_inception_weights):
    """The standard path: torch-fidelity's Inception built from the weights file in the torch hub cache (random
    weights here, written where the real ones would be), no network attempted."""
    fid = fid_metric()
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    fid.update(images, real=True)
    fid.update(images, real=False)
    assert abs(float(fid.compute())) < 1e-2
    assert fid.real_features_sum.shape == (2048,)  # the 2,048-d pool features of the standard FID


def test_inception_weights_swapped_after_the_check_never_reach_the_unpickler(cached_inception_weights, tmp_path, monkeypatch):
    # torch-fidelity unpickles its weights file with weights_only=False. A file replaced between the tensors-only
    # check and that load (here: just before torch-fidelity builds its network) must not be what it reads.
    from torch_fidelity import feature_extractor_inceptionv3 as inception_module

    marker = tmp_path / "code-ran"
    build = inception_module.FeatureExtractorInceptionV3.__init__

    def swap_then_build(self, *args, **kwargs):
        torch.save({"weight": RunsCode(marker)}, cached_inception_weights)
        build(self, *args, **kwargs)

    monkeypatch.setattr(inception_module.FeatureExtractorInceptionV3, "__init__", swap_then_build)
    fid = fid_metric()
    assert not marker.exists()
    assert fid.inception.Conv2d_1a_3x3.conv.weight.abs().sum() > 0  # built from the weights read before the swap


def test_files_are_replaced_whole_or_not_at_all(tmp_path):
    from cdb_tokenizer.tools.files import replace_file, write_text

    path = write_text(tmp_path / "report.md", "first\n")

    def fail_halfway(temporary):
        temporary.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_file(path, fail_halfway)
    assert path.read_text() == "first\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]  # no temporary left behind
    (tmp_path / "folder.md").mkdir()
    with pytest.raises(FileExistsError, match="not a regular file"):
        write_text(tmp_path / "folder.md", "x")
    seen = []
    replace_file(tmp_path / "plot.png", lambda temporary: seen.append(temporary.suffix) or temporary.write_bytes(b"x"))
    assert seen == [".png"]  # writers that read the format from the suffix (matplotlib) still can
    # A folder the temporary file cannot be made in: the error named the hidden temporary, not the file asked for.
    with pytest.raises(FileNotFoundError) as error:
        replace_file(tmp_path / "missing" / "codes.json", lambda temporary: temporary.write_text("{}"))
    assert error.value.filename == str(tmp_path / "missing" / "codes.json")
    # A full disk during the write named no file ("[Errno 28] No space left on device", e.g. training_config.json's).
    def full_disk(temporary):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=r"No space left on device: '.*report.md'") as error:
        replace_file(path, full_disk)
    assert error.value.errno == 28 and error.value.filename == str(path)


def test_files_are_never_written_through_a_planted_temporary_name(tmp_path):
    """Another user of a shared folder cannot make a write land elsewhere by planting links where temporary files go."""
    import os

    from cdb_tokenizer.tools.files import write_text

    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("theirs\n")
    folder = tmp_path / "shared"
    folder.mkdir()
    for name in (f".report.{os.getpid()}.tmp.md", ".report.tmp.md", f".report.{os.getpid()}.md"):
        (folder / name).symlink_to(elsewhere)
    path = write_text(folder / "report.md", "ours\n")
    assert elsewhere.read_text() == "theirs\n"
    assert not path.is_symlink() and path.read_text() == "ours\n"


def test_max_batches_draws_no_more_batches_than_it_uses(held_out):
    from cdb_tokenizer.tools.evaluation import code_usage_counts

    model = tiny_model().eval()
    drawn = []

    def loader():
        for batch in held_out.split(4):
            drawn.append(batch)  # a data loader decodes a batch when it is drawn
            yield batch

    evaluate(model, loader(), max_batches=2, show_progress=False)
    assert len(drawn) == 2
    drawn.clear()
    code_usage_counts(model, loader(), max_batches=1)
    assert len(drawn) == 1


# ------------------------------------------------------------------------------ cdb-vq eval --fid --fid_weights


def test_cli_eval_fid_weights_gives_an_inception_rfid_from_that_file(
    tokenizer_folder, cached_inception_weights, tmp_path, capsys, monkeypatch
):
    # The weights are moved out of the torch hub cache: only --fid_weights can find them (and a network check fails
    # the test), so the rFID below is from that file.
    weights = tmp_path / "elsewhere" / "inception.pth"
    weights.parent.mkdir()
    cached_inception_weights.rename(weights)
    base = ["--model", str(tokenizer_folder["model"]), "--data", str(tokenizer_folder["photos"]), "--no-lpips",
            "--max_images", "3"]  # fmt: skip
    built = []  # the Inception networks eval builds: (weights_path, their first convolution's weights)
    make_fid = evaluation.fid_metric

    def recording_fid_metric(*args, **kwargs):
        metric = make_fid(*args, **kwargs)
        built.append((kwargs.get("weights_path"), metric.inception.Conv2d_1a_3x3.conv.weight.detach().clone()))
        return metric

    monkeypatch.setattr(evaluation, "fid_metric", recording_fid_metric)
    metrics, lines, err = _eval(base + ["--fid", "--fid_weights", str(weights)], capsys)
    assert "rFID left out" not in err and "not comparable" not in err
    assert metrics["fid_feature_extractor"] == "inception-v3-compat" and metrics["num_images"] == 3
    assert 0 <= metrics["rfid"] < float("inf")
    assert any(line.split()[:1] == ["rFID"] and f"{metrics['rfid']:.3f}" in line for line in lines)
    # One network, built from the file given, with its weights.
    file_weights = torch.load(weights, weights_only=True)["Conv2d_1a_3x3.conv.weight"]
    assert len(built) == 1 and built[0][0] == str(weights) and torch.equal(built[0][1], file_weights)


def test_cli_eval_fid_weights_missing_or_not_tensors_is_a_one_line_error(
    tokenizer_folder, no_inception_weights, tmp_path, capsys
):
    # A weights file the user named that cannot be used is a mistake to fix before the run (without the option, the
    # cache's missing weights only leave rFID out: test_cli_eval_without_inception_weights_reports_the_rest).
    # A weights file carrying code is never unpickled.
    marker = tmp_path / "code-ran"
    hostile = tmp_path / "hostile.pth"
    torch.save({"weight": RunsCode(marker)}, hostile)
    base = ["eval", "--model", str(tokenizer_folder["model"]), "--data", str(tokenizer_folder["photos"]), "--no-lpips",
            "--max_images", "2", "--fid", "--fid_weights"]  # fmt: skip
    for weights, reason in ((tmp_path / "missing.pth", "does not exist"), (hostile, "cannot be read as tensors only"),
                            (tokenizer_folder["model"] / "config.json", "cannot be read as tensors only")):  # fmt: skip
        assert cli_main(base + [str(weights)]) == 1
        line = cli_error_line(capsys, "eval")
        assert line.startswith("cdb-vq eval: error: --fid_weights: ") and str(weights) in line and reason in line, line
    assert not marker.exists()


def test_cli_eval_refuses_fid_weights_without_fid_in_one_line(tokenizer_folder, tmp_path, capsys):
    weights = tmp_path / "inception.pth"
    torch.save({"weight": torch.ones(2)}, weights)
    arguments = ["eval", "--model", str(tokenizer_folder["model"]), "--data", str(tokenizer_folder["photos"]),
                 "--no-lpips", "--fid_weights", str(weights)]  # fmt: skip
    assert cli_main(arguments) == 1
    line = cli_error_line(capsys, "eval")
    assert "--fid_weights without --fid: no rFID would be computed; add --fid." in line, line


def test_cli_eval_refuses_a_reference_made_with_other_inception_weights(
    tokenizer_folder, cached_inception_weights, tmp_path, capsys
):
    base = ["eval", "--model", str(tokenizer_folder["model"]), "--data", str(tokenizer_folder["photos"]), "--no-lpips",
            "--max_images", "2", "--fid", "--fid_reference", str(tmp_path / "reference.safetensors")]  # fmt: skip
    assert cli_main(base) == 0  # the cached weights: recorded by content
    capsys.readouterr()
    assert cli_main(base + ["--fid_weights", str(cached_inception_weights)]) == 0  # the same file, named: accepted
    capsys.readouterr()
    other = tmp_path / "other_inception.pth"
    state = torch.load(cached_inception_weights, weights_only=True)
    state["Conv2d_1a_3x3.conv.weight"] = state["Conv2d_1a_3x3.conv.weight"] + 1
    torch.save(state, other)
    assert cli_main(base + ["--fid_weights", str(other)]) == 1
    assert "was computed with weights " in cli_error_line(capsys, "eval")


def test_validation_of_a_mixed_precision_run_scores_the_model_in_float32(fresh_accelerator_state):
    # accelerate's bf16 wrapper stays on `forward` after unwrap_model: validation ran under autocast and scored other
    # tokens (and PSNR / SSIM / perplexity) than `cdb-vq eval` does for the same weights.
    import copy

    import torch.nn.functional as F
    from accelerate import Accelerator

    torch.manual_seed(1)
    pixels = F.interpolate(torch.rand(8, 3, 8, 8), size=32, mode="bilinear") * 2 - 1
    model = tiny_model()
    expected = evaluate(copy.deepcopy(model), list(pixels.split(4)), show_progress=False)
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    prepared = accelerator.unwrap_model(accelerator.prepare(model))
    assert "_original_forward" in prepared.__dict__  # the wrapper is there ...
    assert evaluate(prepared, list(pixels.split(4)), show_progress=False) == expected  # ... and not used
    with torch.no_grad():
        trained_forward = prepared(pixels).reconstruction  # outside evaluation the run keeps its mixed precision
    assert trained_forward.dtype == torch.float32 and prepared.forward.__func__ is not type(prepared).forward


@pytest.mark.parametrize("setting", [{"do_normalize": False}, {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}])
def test_eval_refuses_a_processor_that_does_not_map_pixels_to_minus_one_to_one(setting, tokenizer_folder, tmp_path, capsys):
    # evaluate scores [-1, 1] pixels: with do_normalize=False the same model got 10.06 dB from eval, 8.11 from reconstruct.
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tokenizer_folder["model"], folder)
    CDBVQImageProcessor(size={"height": 32, "width": 32}, **setting).save_pretrained(folder)
    assert cli_main(["eval", "--model", str(folder), "--data", str(tokenizer_folder["photos"]), "--no-lpips"]) == 1
    assert "image processor does not map pixels to [-1, 1]" in cli_error_line(capsys, "eval")


def test_the_normalisation_check_reads_any_processor_without_crashing():
    # A remote-code processor may hold NumPy statistics, or lack the settings altogether: a TypeError / AttributeError.
    import types

    import numpy as np

    from cdb_tokenizer.tools import cli
    from cdb_tokenizer.tools.cli import CLIError

    plain = dict(do_rescale=True, rescale_factor=np.float32(1 / 255), do_normalize=True)
    cli._refuse_other_normalisation(types.SimpleNamespace(**plain, image_mean=np.full(3, 0.5), image_std=(0.5,) * 3), "m")
    for processor in (types.SimpleNamespace(**plain, image_mean=np.array([0.485, 0.456, 0.406]), image_std=0.5),
                      types.SimpleNamespace()):  # fmt: skip
        with pytest.raises(CLIError, match="does not map pixels to \\[-1, 1\\]"):
            cli._refuse_other_normalisation(processor, "m")


def test_create_folders_that_fails_deeper_removes_what_it_made(tmp_path, monkeypatch):
    # `new/sub/<300 characters>`: `new` and `new/sub` were made, then the long name failed (ENAMETOOLONG); the
    # caller got the error and no list, so the CLI and train.py left the empty folders behind.
    from cdb_tokenizer.tools.files import create_folders

    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError):
        create_folders("new/sub/" + "x" * 300 + "/run")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        create_folders("ghost/../file.txt")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file.txt"]


def test_create_folders_makes_the_folder_its_caller_then_uses(tmp_path, monkeypatch):
    # It expanded `~` while train.py and the CLI use the path as given: `--output_dir=~/runs/x` (or `output_dir:
    # ~/runs/x` in a YAML config) made $HOME/runs/x, then was refused as "cannot be written to", and left it there.
    from cdb_tokenizer.tools.files import create_folders

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    created = create_folders("~/runs/x")
    assert Path("~/runs/x").is_dir() and created[-1] == Path("~/runs/x")
    assert not (tmp_path / "home").exists()
