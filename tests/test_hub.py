"""Hugging Face integration: save/load, remote code without the package, offline Hub cache, import hygiene."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel

import cdb_tokenizer
from cdb_tokenizer import CDBVQImageProcessor, CDBVQModel
from conftest import hub_cache, tiny_model


PACKAGE_DIR = Path(cdb_tokenizer.__file__).parent
REMOTE_CODE_FILES = [
    "configuration_cdb_vq.py", "modeling_cdb_vq.py", "quantization_cdb_vq.py", "image_processing_cdb_vq.py",
]  # fmt: skip
TRAINING_ONLY = ["open_clip", "accelerate", "datasets", "torchmetrics", "lpips", "matplotlib", "torchvision", "sklearn"]

# Run in a fresh interpreter where `import cdb_tokenizer` (and every training-only package) fails.
LOAD_WITHOUT_PACKAGE = """
import sys
for name in ["cdb_tokenizer"] + {training_only}:
    sys.modules[name] = None
import torch
from transformers import AutoImageProcessor, AutoModel
model = AutoModel.from_pretrained({source!r}, trust_remote_code=True)
processor = AutoImageProcessor.from_pretrained({source!r}, trust_remote_code=True)
pixel_values = torch.load({inputs!r})
tokens = model.get_image_tokens(pixel_values)
images = processor.postprocess(model.decode_image_tokens(tokens), return_tensors="pt")["pixel_values"]
torch.save({{"tokens": tokens, "images": images, "model_class": type(model).__module__}}, {outputs!r})
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory, photo_batch):
    """A tiny trained-for-one-step model and its processor saved with save_pretrained, plus reference outputs."""
    folder = tmp_path_factory.mktemp("cdb-vq")
    model = tiny_model()
    model.set_prototypes(torch.randn(8, 32), labels=[f"label {i}" for i in range(8)])
    model.train()
    model(photo_batch)  # initialise the codebook from data, move the running statistics
    model.eval()
    model.save_pretrained(folder)
    CDBVQImageProcessor(size=32).save_pretrained(folder)
    inputs = folder.parent / "inputs.pt"
    torch.save(photo_batch, inputs)
    tokens = model.get_image_tokens(photo_batch)
    reference = {
        "tokens": tokens,
        "reconstruction": model(photo_batch).reconstruction,
        "images": CDBVQImageProcessor(size=32).postprocess(model.decode_image_tokens(tokens), return_tensors="pt")[
            "pixel_values"
        ],
    }
    return folder, inputs, reference


def test_save_pretrained_writes_safetensors_code_and_auto_map(saved):
    folder, _, _ = saved
    files = {path.name for path in folder.iterdir()}
    assert "model.safetensors" in files and "pytorch_model.bin" not in files
    assert set(REMOTE_CODE_FILES) <= files
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "cdb_vq"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_cdb_vq.CDBVQConfig",
        "AutoModel": "modeling_cdb_vq.CDBVQModel",
    }
    processor_config = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoImageProcessor": "image_processing_cdb_vq.CDBVQImageProcessor"}


def test_round_trip_gives_identical_tokens_and_reconstructions(saved, photo_batch):
    folder, _, reference = saved
    model = CDBVQModel.from_pretrained(folder).eval()
    assert bool(model.quantizer.initialized)
    assert torch.equal(model.get_image_tokens(photo_batch), reference["tokens"])
    torch.testing.assert_close(model(photo_batch).reconstruction, reference["reconstruction"], rtol=0, atol=0)
    assert model.code_prototype_labels()[:2] == ["label 0", "label 1"]


def test_auto_classes_load_the_installed_package(saved, photo_batch):
    folder, _, reference = saved
    assert isinstance(AutoConfig.from_pretrained(folder), cdb_tokenizer.CDBVQConfig)
    model = AutoModel.from_pretrained(folder)
    assert isinstance(model, CDBVQModel)
    assert isinstance(AutoImageProcessor.from_pretrained(folder), CDBVQImageProcessor)
    assert torch.equal(model.get_image_tokens(photo_batch), reference["tokens"])


def test_the_image_feature_extraction_pipeline_gives_the_token_grid(saved):
    # The model card's pipeline_tag: a Hub user tries `pipeline("image-feature-extraction", ...)` first.
    import numpy as np
    from PIL import Image
    from transformers import pipeline

    folder, _, _ = saved
    model = CDBVQModel.from_pretrained(folder).eval()
    processor = CDBVQImageProcessor.from_pretrained(folder)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    extractor = pipeline("image-feature-extraction", model=str(folder), trust_remote_code=True)
    grid = extractor(photo, return_tensors=True)
    expected = model.get_image_tokens(processor(photo, return_tensors="pt").pixel_values)
    assert grid.shape == (1, 8, 8) and torch.equal(grid.flatten(1), expected)
    assert extractor([photo, photo]) == [grid.tolist()] * 2


def run_without_package(source: str, inputs: Path, outputs: Path, env: dict | None = None) -> dict:
    script = LOAD_WITHOUT_PACKAGE.format(training_only=TRAINING_ONLY, source=str(source), inputs=str(inputs), outputs=str(outputs))
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=outputs.parent,
        env={**os.environ, **(env or {})}, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(outputs)


def test_remote_code_loads_where_the_package_is_not_installed(saved, tmp_path):
    folder, inputs, reference = saved
    loaded = run_without_package(str(folder), inputs, tmp_path / "outputs.pt")
    assert loaded["model_class"].startswith("transformers_modules.")
    assert torch.equal(loaded["tokens"], reference["tokens"])
    torch.testing.assert_close(loaded["images"], reference["images"])


def test_hub_id_loads_offline_from_a_cache_laid_out_on_disk(saved, tmp_path):
    folder, inputs, reference = saved
    revision = "0123456789abcdef0123456789abcdef01234567"
    hub_cache(tmp_path / "hub", "org/cdb-vq", {revision: folder}, {"main": revision})
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home")}
    loaded = run_without_package("org/cdb-vq", inputs, tmp_path / "outputs.pt", env)
    assert torch.equal(loaded["tokens"], reference["tokens"])


@pytest.mark.parametrize("file_name", REMOTE_CODE_FILES)
def test_remote_code_imports_only_torch_transformers_and_siblings(file_name):
    tree = ast.parse((PACKAGE_DIR / file_name).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            assert (PACKAGE_DIR / f"{node.module}.py").exists(), f"{file_name} imports a non-flat sibling {node.module}"
    third_party = imported - set(sys.stdlib_module_names)
    assert third_party <= {"torch", "transformers", "numpy", "PIL"}, third_party


def test_package_root_holds_only_remote_code():
    """The boundary is visible in the tree: training-side modules live in cdb_tokenizer/tools/, not beside these."""
    root = {path.name for path in PACKAGE_DIR.glob("*.py")}
    assert root == set(REMOTE_CODE_FILES) | {"__init__.py", "cli.py"}, root
    tools = {path.stem for path in (PACKAGE_DIR / "tools").iterdir() if path.suffix == ".py" or (path / "__init__.py").is_file()}
    assert {"data", "teacher", "losses", "evaluation", "publishing", "priors", "cli", "checkpoints"} <= tools


def test_a_hub_processor_config_that_cannot_be_fetched_is_an_error_not_the_default(saved, tmp_path, monkeypatch):
    """Offline, a repository whose preprocessor_config.json is not in the cache (the model alone was loaded before)
    was tokenised with the default processor instead of its own, without a word; only a file the Hub said is absent
    (huggingface_hub's `.no_exist` record) means "no saved processor"."""
    import shutil

    import huggingface_hub.constants

    from cdb_tokenizer.tools.loading import load_tokenizer

    folder, _, _ = saved
    model_only = tmp_path / "model_only"
    shutil.copytree(folder, model_only, ignore=shutil.ignore_patterns("preprocessor_config.json"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hub"
    hub_cache(cache, "org/cdb-vq", {revision: model_only}, {"main": revision})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="preprocessor_config.json of org/cdb-vq could not be fetched"):
        load_tokenizer("org/cdb-vq", cache_dir=str(cache))
    no_exist = cache / "models--org--cdb-vq" / ".no_exist" / revision / "preprocessor_config.json"
    no_exist.parent.mkdir(parents=True)
    no_exist.touch()  # what huggingface_hub records when the Hub answers that the file does not exist
    _, processor = load_tokenizer("org/cdb-vq", cache_dir=str(cache))
    assert processor.size["height"] == 32  # the default processor, at the model's resolution
