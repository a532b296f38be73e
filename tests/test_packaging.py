"""Packaging: a wheel (not an editable install) holds the package data that publishing needs and can stage a card."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import TINY_CONFIG


REPO = Path(__file__).resolve().parents[1]

# Runs from the wheel's install folder only: the checkout is not on the path, so a file that the wheel lacks fails.
STAGE_FROM_WHEEL = """
import json, sys
from pathlib import Path
import cdb_tokenizer
from cdb_tokenizer import CDBVQConfig, CDBVQImageProcessor, CDBVQModel
from cdb_tokenizer.tools.publishing import MODEL_CARD_TEMPLATE, stage_folder

target, work = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
assert Path(cdb_tokenizer.__file__).resolve().is_relative_to(target), cdb_tokenizer.__file__
assert MODEL_CARD_TEMPLATE.resolve().is_relative_to(target), MODEL_CARD_TEMPLATE
output = work / "run"
CDBVQModel(CDBVQConfig(**json.loads(sys.argv[3]))).save_pretrained(output)
CDBVQImageProcessor(size={"height": 32, "width": 32}).save_pretrained(output)
staged = stage_folder(output, work / "staged", "cdb-org/cdb-vq-wheel")
print((staged / "README.md").read_text())
"""


def test_wheel_install_stages_a_model_card(tmp_path):
    # Build from a copy, so the build's `build/` and `*.egg-info` folders do not land in the checkout.
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy2(REPO / "pyproject.toml", source)
    shutil.copy2(REPO / "README.md", source)
    shutil.copytree(REPO / "cdb_tokenizer", source / "cdb_tokenizer", ignore=shutil.ignore_patterns("__pycache__"))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"

    def pip(*arguments: str) -> None:
        result = subprocess.run([sys.executable, "-m", "pip", "--no-input", "--quiet", *arguments],
                                capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]

    wheels = tmp_path / "wheels"
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source))
    (wheel,) = wheels.glob("cdb_tokenizer-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "cdb_tokenizer/tools/templates/cdb_vq_model_card.md" in names
    assert {f"cdb_tokenizer/{name}_cdb_vq.py" for name in ("configuration", "modeling", "quantization")} <= names
    assert not any(name.startswith(("tests/", "training/", "benchmarks/")) for name in names)

    target = tmp_path / "site"
    pip("install", "--no-deps", "--no-index", "--target", str(target), str(wheel))

    work = tmp_path / "work"
    work.mkdir()
    staged = subprocess.run(
        [sys.executable, "-c", STAGE_FROM_WHEEL, str(target), str(work), json.dumps(TINY_CONFIG)],
        capture_output=True, text=True, timeout=300, env={**env, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"},
        cwd=work,
    )  # fmt: skip
    assert staged.returncode == 0, staged.stderr[-3000:]
    assert "cdb-org/cdb-vq-wheel" in staged.stdout
    assert (work / "staged" / "README.md").is_file() and (work / "staged" / "model.safetensors").is_file()
