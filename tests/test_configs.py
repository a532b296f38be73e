"""The training recipes in configs/: every file parses with train.py's own parser and builds its model on the meta
device (no memory, no weights), with the shape the recipe promises."""

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cdb_tokenizer import CDBVQConfig, CDBVQModel
from cdb_tokenizer.tools.teacher import read_prototype_labels
from training.train import parse_args

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# What each recipe promises: resolution, token grid side, codebook size and code dimension.
EXPECTED = {
    "imagenet_f16_k16384.yaml": (256, 16, 16384, 8),
    "imagenet_f8.yaml": (256, 32, 16384, 8),
    "imagenet_f16_semantic.yaml": (256, 16, 16384, 8),
}


def test_every_recipe_is_checked():
    assert sorted(path.name for path in CONFIGS) == sorted(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_recipe_parses_and_builds_its_model_on_the_meta_device(path, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name files relative to the repository root
    args = parse_args(["--config", str(path.relative_to(REPO))])
    config = CDBVQConfig(**args.model_config_dict)
    with torch.device("meta"):
        model = CDBVQModel(config)
    resolution, grid, codebook_size, codebook_dim = EXPECTED[path.name]
    assert args.resolution == config.resolution == resolution
    assert model.token_grid_size(resolution, resolution) == (grid, grid)
    assert model.quantizer.codebook.weight.shape == (codebook_size, codebook_dim)
    assert model.quantizer.codebook.weight.is_meta
    assert config.l2_normalize_codes
    assert args.model_preset == "base" and args.dataset_name and args.max_train_steps >= 100_000
    assert args.lpips_weight > 0 and args.disc_weight > 0 and args.mixed_precision == "bf16"
    parameters = sum(parameter.numel() for parameter in model.parameters())
    assert 30e6 < parameters < 200e6  # a LlamaGen-class backbone (its VQ-16: ~72M parameters)
    # A flag on the command line still wins over the file.
    assert parse_args(["--config", str(path.relative_to(REPO)), "--learning_rate", "3e-4"]).learning_rate == 3e-4


def test_semantic_recipe_uses_a_clip_teacher_and_the_imagenet_class_names(monkeypatch):
    import open_clip

    monkeypatch.chdir(REPO)
    args = parse_args(["--config", "configs/imagenet_f16_semantic.yaml"])
    assert args.clip_model in ("ViT-B-16", "ViT-L-14") and args.clip_model in open_clip.list_models()
    assert args.clip_pretrained in open_clip.list_pretrained_tags_by_model(args.clip_model)
    kind, _, path = args.prototypes.partition(":")
    labels = read_prototype_labels(path)
    assert kind == "text" and len(labels) == 1000
    assert (labels[0], labels[1], labels[999]) == ("tench", "goldfish", "toilet paper")  # ImageNet class order
    for name in ("imagenet_f16_k16384.yaml", "imagenet_f8.yaml"):
        assert parse_args(["--config", f"configs/{name}"]).clip_model is None


def test_a_recipe_takes_a_local_folder_and_none_from_the_command_line(monkeypatch, tmp_path):
    """As the recipes' comments say: a local copy replaces the file's Hub data set, and 'none' unsets a key."""
    monkeypatch.chdir(REPO)
    (tmp_path / "train" / "n01440764").mkdir(parents=True)
    recipe = ["--config", "configs/imagenet_f16_semantic.yaml"]
    args = parse_args(recipe + ["--train_data_dir", str(tmp_path)])
    assert (args.train_data_dir, args.dataset_name) == (str(tmp_path), None)
    assert args.validation_split == "validation" and args.validation_fid == "inception"  # the rest of the file holds
    args = parse_args(recipe + ["--train_data_dir", str(tmp_path), "--validation_split", "none",
                                "--validation_fid", "none", "--prototypes", "none", "--clip_model", "none"])  # fmt: skip
    assert (args.validation_split, args.validation_fid, args.prototypes, args.clip_model) == (None, None, None, None)
    assert parse_args(recipe + ["--dataset_name", "me/photos"]).dataset_name == "me/photos"
    with pytest.raises(SystemExit):  # both on the command line is still a contradiction
        parse_args(recipe + ["--dataset_name", "me/photos", "--train_data_dir", str(tmp_path)])
    # The file's data set configuration goes with its data set.
    config = tmp_path / "run.yaml"
    config.write_text("dataset_name: org/photos\ndataset_config_name: large\n")
    assert parse_args(["--config", str(config)]).dataset_config_name == "large"
    assert parse_args(["--config", str(config), "--train_data_dir", str(tmp_path)]).dataset_config_name is None
