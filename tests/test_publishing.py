"""Publishing: the staged folder loads without the package, its README is a model card; only the upload is mocked."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, RepoUrl
from huggingface_hub.errors import HfHubHTTPError

from cdb_tokenizer import CDBVQImageProcessor
from cdb_tokenizer.tools.data import sample_photos
from cdb_tokenizer.tools.evaluation import code_usage_counts, evaluate, save_reconstruction_grid, save_usage_plot
from cdb_tokenizer.tools.publishing import (
    REMOTE_CODE_FILES,
    clip_teacher_hub_id,
    model_files,
    public_fields,
    push_to_hub,
    stage_folder,
)
from conftest import tiny_model


REPO_ROOT = Path(__file__).resolve().parents[1]
HUB_ID = "cdb-org/cdb-vq-tiny"
SECRET = "hf_" + "S3cr3t" * 6
CODE_ROLES = {"structure": [0, 16], "texture": [16, 48], "colour": [48, 64]}
LABELS = ["sky", "grass", "face", "fur", "metal", "water", "text", "stone"]
UPLOADED = {
    "README.md", "config.json", "model.safetensors", "preprocessor_config.json", "configuration_cdb_vq.py",
    "modeling_cdb_vq.py", "quantization_cdb_vq.py", "image_processing_cdb_vq.py", "metrics.json",
    "training_config.json", "reconstructions.png", "codebook_usage.png", "prototypes.safetensors",
}  # fmt: skip

LOAD_WITHOUT_PACKAGE = """
import json, sys
sys.modules["cdb_tokenizer"] = None  # `import cdb_tokenizer` fails: only the staged remote code can be used
from PIL import Image
from transformers import AutoImageProcessor, AutoModel
folder, photo = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
assert not type(model).__module__.startswith("cdb_tokenizer"), type(model).__module__
tokens = model.get_image_tokens(processor(Image.open(photo), return_tensors="pt").pixel_values)
images = processor.postprocess(model.decode_image_tokens(tokens)).pixel_values
print(json.dumps({"tokens": tokens.tolist(), "size": list(images[0].size), "model_class": type(model).__name__}))
"""


@pytest.fixture(scope="module")
def training_output(tmp_path_factory) -> Path:
    """What train.py leaves behind, from a tiny model trained one step on real photos."""
    output_dir = tmp_path_factory.mktemp("run")
    model = tiny_model(code_roles=CODE_ROLES)
    processor = CDBVQImageProcessor(size={"height": 32, "width": 32})
    pixel_values = processor(sample_photos("skimage")[:4], return_tensors="pt").pixel_values
    model.train()
    model(pixel_values)  # k-means codebook init and a usage update, as in training
    prototypes = torch.randn(8, 32)
    model.set_prototypes(prototypes, labels=LABELS)
    model.eval()
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    metrics = evaluate(model, [pixel_values], show_progress=False)
    metrics.update(steps=3, wall_time_seconds=75.0)
    (output_dir / "metrics.json").write_text(json.dumps(metrics))
    training_config = {
        "clip_model": "ViT-B-16", "clip_pretrained": "openai", "dataset_name": "cdb-org/photos",
        "resolution": 32, "learning_rate": 1e-4, "assignment": "cdb", "token_alignment_weight": 0.5,
        "output_dir": "/home/someone/private/run", "hub_token": SECRET, "logging_dir": "logs",
    }  # fmt: skip
    (output_dir / "training_config.json").write_text(json.dumps(training_config))
    with torch.no_grad():
        save_reconstruction_grid(pixel_values, model(pixel_values).reconstruction, output_dir / "reconstructions.png")
    save_usage_plot(code_usage_counts(model, [pixel_values]), output_dir / "codebook_usage.png", code_roles=CODE_ROLES)
    from safetensors.torch import save_file

    save_file({"prototypes": prototypes}, str(output_dir / "prototypes.safetensors"))
    (output_dir / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    (output_dir / "checkpoints" / "checkpoint-3" / "optimizer.bin").write_bytes(b"state")
    (output_dir / "logs").mkdir()
    (output_dir / "logs" / "events.out.tfevents").write_bytes(b"events")
    return output_dir


@pytest.fixture(scope="module")
def staged(training_output, tmp_path_factory) -> Path:
    return stage_folder(training_output, tmp_path_factory.mktemp("staging") / "repo", HUB_ID)


def test_staged_folder_loads_without_the_package(staged, training_output, tmp_path):
    photo = tmp_path / "astronaut.png"
    sample_photos("skimage")[0].save(photo)
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PACKAGE, str(staged), str(photo)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])

    # Same weights as the trained model: the tokens agree with the package's own model on the same photo.
    from cdb_tokenizer import CDBVQModel

    model = CDBVQModel.from_pretrained(training_output).eval()
    processor = CDBVQImageProcessor.from_pretrained(training_output)
    expected = model.get_image_tokens(processor(sample_photos("skimage")[0], return_tensors="pt").pixel_values)
    assert loaded["tokens"] == expected.tolist()
    assert loaded["size"] == [32, 32]
    assert loaded["model_class"] == "CDBVQModel"


def test_readme_is_a_model_card_with_metadata(staged, training_output):
    card = ModelCard.load(staged / "README.md")
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-feature-extraction"
    assert {"image-tokenization", "vector-quantization", "cdb-vq"} <= set(data.tags)
    assert data.license == "apache-2.0"
    assert data.datasets == ["cdb-org/photos"]
    # The tokenizer is trained from scratch: the CLIP teacher is named and linked in the text, not claimed as the
    # model it was fine-tuned from (the Hub's model tree reads base_model so).
    assert data.base_model is None

    text = card.text
    assert f'AutoModel.from_pretrained("{HUB_ID}", trust_remote_code=True)' in text
    assert "get_image_tokens" in text and "decode_image_tokens" in text
    metrics = json.loads((training_output / "metrics.json").read_text())
    assert f"| PSNR (dB, higher is better) | {metrics['psnr']:.2f} |" in text
    assert f"| SSIM (higher is better) | {metrics['ssim']:.4f} |" in text
    assert f"{metrics['utilization']:.1%} of 64 codes" in text
    assert f"| Code perplexity | {metrics['perplexity']:.1f} (max 64) |" in text
    # Figures are copied next to the card and referenced by it.
    for name in ("reconstructions.png", "codebook_usage.png"):
        assert f"]({name})" in text and (staged / name).is_file()
    # Tokenizer facts: rule, codebook size, role ranges, prototype labels, training configuration.
    assert "| Assignment rule | `cdb` |" in text
    assert "| Codebook size | 64 |" in text
    for name, (start, end) in CODE_ROLES.items():
        assert f"| {name} | [{start}, {end}) | {end - start} |" in text
    assert ", ".join(LABELS) in text
    assert "| `learning_rate` | 0.0001 |" in text
    assert "open_clip `ViT-B-16` (`openai`), [timm/vit_base_patch16_clip_224.openai](" in text  # resolved offline


def test_staging_leaves_out_checkpoints_logs_and_secrets(staged):
    assert {path.name for path in staged.iterdir()} == UPLOADED
    public = json.loads((staged / "training_config.json").read_text())
    assert "hub_token" not in public and "output_dir" not in public and "logging_dir" not in public
    assert public["token_alignment_weight"] == 0.5  # a loss weight is not a secret
    for path in staged.iterdir():
        if path.suffix in (".md", ".json"):
            assert SECRET not in path.read_text() and "/home/someone" not in path.read_text(), path.name


def test_public_fields_drops_secrets_and_local_paths():
    public = public_fields(
        {
            "hf_token": "x", "api_key": "y", "note": SECRET, "max_tokens": 5, "cache_dir": "/data/cache",
            "train_data_dir": "/a/b/photos", "prototypes": "text:/home/me/labels.txt", "dirs": ["~/x/y.json"],
            "dataset_name": "org/photos", "clip_model": "hf-hub:org/clip", "url": "https://huggingface.co/org/m",
        }
    )  # fmt: skip
    assert public == {
        "max_tokens": 5, "train_data_dir": "photos", "prototypes": "text:labels.txt", "dirs": ["y.json"],
        "dataset_name": "org/photos", "clip_model": "hf-hub:org/clip", "url": "https://huggingface.co/org/m",
    }  # fmt: skip
    # Relative paths too, under the keys that name files (in free text they cannot be told from prose).
    relative = {
        "train_data_dir": "clients/acme_private/faces", "clip_pretrained": "ckpts/bob/clip.pt",
        "prototypes": "text:clients/acme/labels.txt", "fid_weights": "weights\\inception.pth",
        "model_config": "https://example.org/configs/base.json", "clip_model": "ViT-B-16", "config": "demo.yaml",
        "dataset_name": "org/photos", "note": "see clients/acme",
    }  # fmt: skip
    assert public_fields(relative) == {
        **relative, "train_data_dir": "faces", "clip_pretrained": "clip.pt", "prototypes": "text:labels.txt",
        "fid_weights": "inception.pth",
    }  # fmt: skip


def test_stage_folder_errors_name_the_problem(training_output, tmp_path):
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    for name in (
        "config.json",
        "model.safetensors",
        "configuration_cdb_vq.py",
        "modeling_cdb_vq.py",
        "quantization_cdb_vq.py",
    ):
        (incomplete / name).write_bytes((training_output / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        stage_folder(incomplete, tmp_path / "a", HUB_ID)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        stage_folder(tmp_path / "missing", tmp_path / "b", HUB_ID)
    with pytest.raises(ValueError, match="invalid hub_model_id"):
        stage_folder(training_output, tmp_path / "c", "not a repo id")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        stage_folder(training_output, tmp_path / "busy", HUB_ID)
    with pytest.raises(NotADirectoryError, match="model.safetensors is a file"):
        stage_folder(training_output / "model.safetensors", tmp_path / "d", HUB_ID)
    with pytest.raises(FileNotFoundError, match="checkpoint-3 is a training checkpoint"):
        stage_folder(training_output / "checkpoints" / "checkpoint-3", tmp_path / "e", HUB_ID)


def _mock_hub(uploaded: dict, existing_public: bool = False):
    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        uploaded["files"] = sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))
        uploaded["token"] = self.token
        uploaded["readme"] = (folder / "README.md").read_text()
        return mock.Mock(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc")

    return (
        mock.patch.object(
            HfApi, "create_repo", autospec=True, return_value=RepoUrl(f"https://huggingface.co/{HUB_ID}")
        ),
        mock.patch.object(HfApi, "create_branch", autospec=True),
        mock.patch.object(HfApi, "upload_folder", autospec=True, side_effect=upload_folder),
        # A repository create_repo(private=True) made, or an existing public one.
        mock.patch.object(HfApi, "repo_info", autospec=True, return_value=mock.Mock(private=not existing_public)),
    )


def test_push_to_hub_creates_repo_and_uploads_the_staged_folder(training_output):
    uploaded = {}
    create_repo, create_branch, upload_folder, repo_info = _mock_hub(uploaded)
    with create_repo as create_repo, create_branch as create_branch, upload_folder as upload_folder, repo_info:
        commit = push_to_hub(
            training_output, HUB_ID, private=True, revision="v1", commit_message="first", token="hf_arg"
        )
    create_repo.assert_called_once_with(mock.ANY, HUB_ID, private=True, exist_ok=True)
    create_branch.assert_called_once_with(mock.ANY, HUB_ID, branch="v1", exist_ok=True)
    kwargs = upload_folder.call_args.kwargs
    assert (kwargs["repo_id"], kwargs["revision"], kwargs["commit_message"]) == (HUB_ID, "v1", "first")
    assert set(uploaded["files"]) == UPLOADED  # no checkpoints/ or logs/
    assert uploaded["token"] == "hf_arg"
    assert commit.commit_url.endswith("/commit/abc")
    # The card on branch v1 loads v1: its snippets loaded main, which a new repository's branch leaves empty.
    assert f'from_pretrained("{HUB_ID}", revision="v1", trust_remote_code=True)' in uploaded["readme"]
    assert f"--model {HUB_ID} --revision v1 --out tokens.safetensors" in uploaded["readme"]


def test_push_to_hub_removes_stale_published_files_only(training_output):
    """A file an earlier push published and this one does not is removed in the same commit (a stale
    model.safetensors would shadow new shards: transformers loads it first); files the user added stay."""
    uploaded = {}
    create_repo, create_branch, upload_folder, repo_info = _mock_hub(uploaded)
    with create_repo, create_branch, upload_folder as upload_folder, repo_info:
        push_to_hub(training_output, HUB_ID, token="hf_arg")
    patterns = upload_folder.call_args.kwargs["delete_patterns"]
    ours = [
        "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json", "modeling_cdb_vq.py",
        "role_map.png", "prototypes.safetensors", "metrics.json",
    ]  # fmt: skip
    theirs = [
        ".gitattributes", "README.md", "notes.txt", "examples/sample.png", "model_ema.safetensors",
        "models/other_tokenizer.safetensors", "scripts/train_cdb_vq.py", "old/model.safetensors", "old/metrics.json",
    ]  # fmt: skip
    with mock.patch.object(HfApi, "list_repo_files", return_value=ours + theirs):  # the network call only
        deletions = HfApi()._prepare_folder_deletions(HUB_ID, None, None, "", patterns)
    assert {operation.path_in_repo for operation in deletions} == set(ours)
    # every file a push may leave out (all but the card and the two configs) is cleaned up when a later one does
    always = {"README.md", "config.json", "preprocessor_config.json"}
    published = [name for name in uploaded["files"] if name not in always]
    with mock.patch.object(HfApi, "list_repo_files", return_value=published):
        assert len(HfApi()._prepare_folder_deletions(HUB_ID, None, None, "", patterns)) == len(published)


def test_the_remote_code_a_push_cleans_up_is_the_code_it_uploads(training_output):
    """REMOTE_CODE_FILES (what a later push deletes when it no longer brings it) is found from the package's auto
    classes as the uploaded files are from a folder's auto_map: the .py files save_pretrained wrote, no other."""
    written = sorted(path.name for path in training_output.glob("*.py"))
    uploaded = sorted(path.name for path in model_files(training_output) if path.suffix == ".py")
    assert list(REMOTE_CODE_FILES) == written == uploaded


def test_push_to_hub_token_from_environment_or_clear_error(training_output, monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ValueError, match="no Hugging Face token"):
        push_to_hub(training_output, HUB_ID)

    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    uploaded = {}
    create_repo, create_branch, upload_folder, repo_info = _mock_hub(uploaded)
    with create_repo as create_repo, create_branch as create_branch, upload_folder, repo_info:
        push_to_hub(training_output, "cdb-vq-tiny")  # no namespace: the Hub puts it under the token's user
    # Not private=False: that made a new repository public in an organisation whose repositories default to private.
    create_repo.assert_called_once_with(mock.ANY, "cdb-vq-tiny", private=None, exist_ok=True)
    create_branch.assert_not_called()  # no revision: straight to main
    assert uploaded["token"] == "hf_from_env"
    assert f'AutoModel.from_pretrained("{HUB_ID}"' in uploaded["readme"]  # the full id the Hub gave back


def test_a_card_rendered_again_with_the_full_repo_id_is_cleaned_as_the_staged_one(training_output, tmp_path):
    """A bare name (train.py --push_to_hub without --hub_model_id) has its card rendered again with the `user/name`
    the Hub gives back; that card was cleaned of the output folder only, and showed a Windows --train_data_dir whole
    (with the user's name), which staging's own card cuts to its last part."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(training_output, run, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    config = json.loads((run / "training_config.json").read_text())
    config.update(dataset_name=None, train_data_dir="C:\\Users\\bob_x\\acme_client\\photos")
    (run / "training_config.json").write_text(json.dumps(config))
    uploaded = {}
    create_repo, create_branch, upload_folder, repo_info = _mock_hub(uploaded)
    with create_repo, create_branch, upload_folder, repo_info:
        push_to_hub(run, "cdb-vq-tiny", token="hf_arg")  # the Hub answers with cdb-org/cdb-vq-tiny
    assert f'AutoModel.from_pretrained("{HUB_ID}"' in uploaded["readme"]
    assert "a local image folder (`photos`)" in uploaded["readme"]
    assert "bob_x" not in uploaded["readme"] and "acme_client" not in uploaded["readme"]


def test_a_folder_of_another_model_or_without_a_full_auto_map_is_not_published(training_output, tmp_path):
    """A prior's folder (train_prior.py: a language model's config.json and weights) was asked for an image
    processor, then for an auto_map; a config.json without AutoConfig in its auto_map was published, and did not
    load where cdb_tokenizer is not installed."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    prior = tmp_path / "prior"
    LlamaForCausalLM(LlamaConfig(vocab_size=70, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(prior)  # fmt: skip
    with pytest.raises(ValueError, match="holds a 'llama' model .*, not a cdb-vq tokenizer"):
        stage_folder(prior, tmp_path / "a", HUB_ID)
    run = tmp_path / "run"
    shutil.copytree(training_output, run, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    config = json.loads((run / "config.json").read_text())
    del config["auto_map"]["AutoConfig"]
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no auto_map for AutoConfig, AutoModel and AutoImageProcessor"):
        stage_folder(run, tmp_path / "b", HUB_ID)


def test_a_busy_staging_folder_stops_before_the_repo_is_created(training_output, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    create_repo, create_branch, upload_folder, repo_info = _mock_hub({})
    with create_repo as create_repo, create_branch, upload_folder, repo_info:
        with pytest.raises(FileExistsError, match="not empty"):
            push_to_hub(training_output, HUB_ID, token="hf_arg", staging_dir=tmp_path / "busy")
    create_repo.assert_not_called()  # no empty repository left on the Hub


@pytest.mark.parametrize("license", ["MIT", "Apache 2.0", ""])
def test_a_license_that_is_no_hub_id_stops_before_the_repo_is_created(training_output, license):
    # Any string reached the card's metadata; the Hub refuses it only when the commit arrives, after create_repo.
    create_repo, create_branch, upload_folder, repo_info = _mock_hub({})
    with create_repo as create_repo, create_branch, upload_folder, repo_info:
        with pytest.raises(ValueError, match=f"license {license!r} is not a Hub license id: use one such as apache-2.0"):
            push_to_hub(training_output, HUB_ID, token="hf_arg", license=license)
    create_repo.assert_not_called()


def test_an_auto_map_that_names_a_file_elsewhere_publishes_nothing(training_output, tmp_path):
    # transformers keeps a foreign auto_map through load and save: a path in it would upload that file.
    import shutil

    secret = tmp_path / "elsewhere" / "secret_module.py"
    secret.parent.mkdir()
    secret.write_text("API_KEY = 'private'\n")
    output = tmp_path / "output"
    shutil.copytree(training_output, output)
    config = json.loads((output / "config.json").read_text())
    config["auto_map"]["AutoModel"] = f"{secret.with_suffix('')}.CDBVQModel"
    (output / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="auto_map names .*secret_module.CDBVQModel', not a module of"):
        stage_folder(output, tmp_path / "staged", HUB_ID)
    assert not list((tmp_path / "staged").rglob("secret_module.py"))


def test_prototype_labels_with_a_bar_keep_the_card_table(training_output, tmp_path):
    from cdb_tokenizer import CDBVQModel
    from cdb_tokenizer.tools.publishing import render_model_card

    folder = tmp_path / "barred"
    model = CDBVQModel.from_pretrained(training_output)
    model.set_prototypes(model.quantizer.prototypes.clone(), labels=["dog | cat"] + LABELS[1:])
    model.save_pretrained(folder)
    for name in ("preprocessor_config.json", "metrics.json", "training_config.json"):
        (folder / name).write_text((training_output / name).read_text())
    card = str(render_model_card(folder, HUB_ID))
    rows = [line for line in card.splitlines() if "dog" in line and line.startswith("|")]
    assert rows and all(r"dog \| cat" in row for row in rows)

    # Labels with markup or a line break: a table row must stay one row, and `</details>` must not close the block.
    model.set_prototypes(model.quantizer.prototypes.clone(), labels=["dog\ncat", "</details>", "__bg__"] + LABELS[3:])
    model.save_pretrained(folder)
    card = str(render_model_card(folder, HUB_ID))
    assert card.count("</details>") == card.count("<details>") and "&lt;/details&gt;" in card
    assert any(line.startswith("|") and "dog cat" in line for line in card.splitlines())
    assert r"\_\_bg\_\_" in card


def test_publish_script_passes_its_flags_through(training_output, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("publish_script", REPO_ROOT / "training" / "publish.py")
    publish = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(publish)

    uploaded = {}
    create_repo, create_branch, upload_folder, repo_info = _mock_hub(uploaded)
    argv = [
        str(training_output),
        "--hub_model_id",
        HUB_ID,
        "--private",
        "--revision",
        "dev",
        "--commit_message",
        "m",
        "--token",
        "hf_cli",
    ]
    with create_repo as create_repo, create_branch, upload_folder as upload_folder, repo_info:
        assert publish.main(argv) == 0
    create_repo.assert_called_once_with(mock.ANY, HUB_ID, private=True, exist_ok=True)
    assert upload_folder.call_args.kwargs["revision"] == "dev" and uploaded["token"] == "hf_cli"
    assert "published cdb-org/cdb-vq-tiny" in capsys.readouterr().out

    # Dry run: stage only, keep the folder, touch no network.
    staging = tmp_path / "dry"
    assert (
        publish.main([str(training_output), "--hub_model_id", HUB_ID, "--dry_run", "--staging_dir", str(staging),
                      "--revision", "v1"]) == 0
    )  # fmt: skip
    assert 'revision="v1"' in (staging / "README.md").read_text()  # the card the upload to v1 would show
    assert (
        publish.main(
            [str(tmp_path / "missing"), "--hub_model_id", HUB_ID, "--dry_run", "--staging_dir", str(tmp_path / "x")]
        )
        == 1
    )
    assert "does not exist" in capsys.readouterr().err

    # The Hub refusing the upload (an OSError too) read like a mistake in the folder: it says the upload failed.
    refused = HfHubHTTPError("403 Forbidden: you cannot write to this repository.\nRequest id: abc", response=mock.Mock())
    with mock.patch.object(HfApi, "create_repo", autospec=True, side_effect=refused):
        assert publish.main([str(training_output), "--hub_model_id", HUB_ID, "--token", "hf_cli"]) == 1
    assert capsys.readouterr().err == "publish: error: the upload failed: 403 Forbidden: you cannot write to this repository.\n"


def test_a_card_names_no_teacher_when_none_ran(training_output, tmp_path):
    # The offline demo asks for the default teacher, cannot load its weights and trains without it (metrics.json:
    # "teacher": null); the card claimed the teacher as its base model and as distilled into the semantic head.
    import shutil

    run = tmp_path / "run"
    shutil.copytree(training_output, run)
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "teacher": None}))
    card = ModelCard.load(stage_folder(run, tmp_path / "repo", HUB_ID) / "README.md")
    assert card.data.base_model is None
    assert "CLIP teacher: none" in card.text and "ViT-B-16" not in card.text.split("## Training")[0]
    # The flags still name the teacher of the run's settings, and say it was not used.
    assert "ViT-B-16 (unavailable, so not used)" in card.text


@pytest.mark.parametrize("features", ["inception", "random"])
def test_the_card_shows_an_rfid_of_inception_features_only(training_output, tmp_path, features):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(training_output, run)
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "rfid": 12.345, "rfid_features": features}))
    card = ModelCard.load(stage_folder(run, tmp_path / "repo", HUB_ID) / "README.md")
    # The random features of an offline smoke test give a number on another scale: never shown as an rFID.
    assert ("| rFID (Inception features, against the same held-out images; lower is better) | 12.35 |" in card.text) == (features == "inception")


def test_private_strings_are_scrubbed_whole_not_out_of_other_words(training_output, tmp_path):
    # A --cache_dir of "/data" was replaced inside the card's data set link: "huggingface.codatasets/...".
    import shutil

    run = tmp_path / "run"
    shutil.copytree(training_output, run)
    config = json.loads((run / "training_config.json").read_text())
    (run / "training_config.json").write_text(json.dumps({**config, "cache_dir": "/data"}))
    staged = stage_folder(run, tmp_path / "repo", HUB_ID)
    text = (staged / "README.md").read_text()
    assert "https://huggingface.co/datasets/cdb-org/photos" in text and "huggingface.codatasets" not in text
    assert "/data" not in json.dumps(json.loads((staged / "training_config.json").read_text()))
    # A relative save_to_disk folder given as --dataset_name reads like a Hub id: train.py records it as local.
    (run / "training_config.json").write_text(json.dumps({**config, "dataset_name": "data/saved", "dataset_is_local": True}))
    text = (stage_folder(run, tmp_path / "repo-local", HUB_ID) / "README.md").read_text()
    assert "huggingface.co/datasets/data/saved" not in text


def test_clip_teacher_hub_id():
    assert clip_teacher_hub_id("ViT-B-32", "laion2b_s34b_b79k") == "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    # The teacher's loader reads "ViT-B/16" as "ViT-B-16": so does the card's link.
    assert clip_teacher_hub_id("ViT-B/32", "laion2b_s34b_b79k") == "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    assert clip_teacher_hub_id("hf-hub:someone/clip-model", None) == "someone/clip-model"
    assert clip_teacher_hub_id("ViT-B-16", "no-such-tag") is None
    assert clip_teacher_hub_id(None, None) is None


def test_staged_config_keeps_its_fields_and_loses_its_secrets(training_output, tmp_path):
    """A code role named like a secret (`text_tokens`) was dropped from the staged config.json, which then did not
    load; labels that hold a local path or a token must not reach the card, whose escaping (`_` -> `\\_`) hid them
    from the last pass."""
    from cdb_tokenizer import CDBVQModel

    run = tmp_path / "run"
    model = tiny_model(code_roles={"background": [0, 32], "text_tokens": [32, 64]})
    labels = ["/home/alice_smith/cats", "C:\\Users\\bob_x\\dogs", f"token {SECRET}"] + LABELS[3:]
    model.set_prototypes(torch.randn(8, 32), labels=labels)
    model.save_pretrained(run)
    CDBVQImageProcessor.from_pretrained(training_output).save_pretrained(run)
    for name in ("metrics.json", "training_config.json"):
        (run / name).write_text((training_output / name).read_text())
    staged = stage_folder(run, tmp_path / "repo", HUB_ID)
    config = json.loads((staged / "config.json").read_text())
    assert config["code_roles"] == {"background": [0, 32], "text_tokens": [32, 64]}
    assert config["prototype_labels"][:3] == ["cats", "dogs", "token [redacted]"]
    assert CDBVQModel.from_pretrained(staged).config.role_names == ["background", "text_tokens"]
    for path in staged.iterdir():
        if path.suffix in (".md", ".json"):
            text = path.read_text()
            assert "alice" not in text and "bob" not in text and "S3cr3t" not in text, path.name


def _broken(training_output: Path, folder: Path, broken: str) -> Path:
    import shutil

    shutil.copytree(training_output, folder)
    if broken == "metrics":
        (folder / "metrics.json").write_text("{not json")
    else:
        from safetensors.torch import save_file

        save_file({"bert.embeddings.weight": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("broken, message", [("metrics", "metrics.json is not valid JSON"), ("weights", "do not fit")])
def test_a_folder_that_cannot_be_staged_creates_no_repository(training_output, tmp_path, broken, message):
    run = _broken(training_output, tmp_path / "run", broken)
    create_repo, create_branch, upload_folder, repo_info = _mock_hub({})
    with create_repo as create_repo, create_branch, upload_folder as upload_folder, repo_info:
        with pytest.raises(ValueError, match=message):
            push_to_hub(run, HUB_ID, token="hf_arg")
    create_repo.assert_not_called()  # no empty repository left on the Hub
    upload_folder.assert_not_called()


def test_private_refuses_an_existing_public_repository(training_output):
    create_repo, create_branch, upload_folder, repo_info = _mock_hub({}, existing_public=True)
    with create_repo, create_branch, upload_folder as upload_folder, repo_info:
        with pytest.raises(ValueError, match="already exists and is public"):
            push_to_hub(training_output, HUB_ID, private=True, token="hf_arg")
        upload_folder.assert_not_called()
        push_to_hub(training_output, HUB_ID, token="hf_arg")  # without --private it is published there
        upload_folder.assert_called_once()


def _saved_model(folder: Path, metrics: dict | None = None, **config) -> Path:
    """A tiny model of `config` saved with its processor (and `metrics` as metrics.json): enough for a card."""
    model = tiny_model(**config).train()
    model(torch.rand(2, 3, 32, 32) * 2 - 1)  # a usage update, as in training
    model.eval().save_pretrained(folder)
    CDBVQImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_the_role_map_caption_names_the_colour_of_each_role_of_the_model(tmp_path):
    # The caption was "structure blue, texture red, colour green" whatever the roles: two of them not in this model,
    # and no colour for `other`.
    from cdb_tokenizer.tools.publishing import render_model_card

    folder = _saved_model(tmp_path / "custom", code_roles={"texture": [0, 32], "other": [32, 64]})
    text = render_model_card(folder, HUB_ID, figures={"role_map": "role_map.png"}).text
    caption = text.split("their role maps")[1].split("![Role map]")[0]
    assert "left to right, texture: red, other: orange):" in " ".join(caption.split())
    assert "structure" not in caption and "green" not in caption


def test_codebook_summary_names_the_tied_prototype_apart_from_the_nearest(training_output):
    # The summary listed the prototype a code is tied to as "prototype" / "label", the names code_report() and the
    # --codes file use for the nearest prototype by cosine: one command printed two answers under one name.
    from cdb_tokenizer import CDBVQModel
    from cdb_tokenizer.tools.publishing import codebook_summary

    model = CDBVQModel.from_pretrained(training_output)
    top = codebook_summary(model, top_k=5)["top_codes"]
    ties, labels = model.quantizer.code_to_prototype.tolist(), model.code_prototype_labels()
    assert all(set(code) == {"code", "usage", "role", "tied_prototype", "tied_label"} for code in top)
    assert [code["tied_prototype"] for code in top] == [ties[code["code"]] for code in top]
    assert [code["tied_label"] for code in top] == [labels[code["code"]] for code in top]


def test_codebook_summary_of_a_model_without_roles_names_no_role(tmp_path):
    # It showed a placeholder role `all` (a real role could be named so), where code_report() and --codes say None.
    from cdb_tokenizer import CDBVQModel
    from cdb_tokenizer.tools.publishing import codebook_summary, render_model_card

    folder = _saved_model(tmp_path / "plain")
    summary = codebook_summary(CDBVQModel.from_pretrained(folder), top_k=3)
    assert summary["roles"] == []
    assert [code["role"] for code in summary["top_codes"]] == [None] * 3
    text = render_model_card(folder, HUB_ID).text
    assert "This model has a single code range (no role split)." in text and "| all |" not in text


@pytest.mark.parametrize("restoration_psnr, restores", [(18.99, False), (24.74, False), (27.5, True)])
def test_the_restoration_section_says_when_the_model_does_not_restore(tmp_path, restoration_psnr, restores):
    # The card said the model "turns such photos into restored ones" beside its own metrics showing the restored
    # output 5.7 dB below the degraded input.
    from cdb_tokenizer.tools.publishing import render_model_card

    metrics = {"psnr": 25.0, "restoration_psnr": restoration_psnr, "degraded_input_psnr": 24.74}
    folder = _saved_model(tmp_path / "deblur", metrics, restoration_degradation="gaussian_blur:0.5-2.5")
    text = render_model_card(folder, HUB_ID).text
    section = " ".join(text.split("## Restoration")[1].split("## Training")[0].split())
    assert ("turns such photos into restored ones" in section) == restores
    assert ("this model does not yet restore" in section) == (not restores)
    if restoration_psnr == 18.99:
        assert "the restored output is 18.99 dB PSNR, below the degraded input's 24.74 dB" in section


def test_the_card_says_when_the_teacher_was_random_and_where_unlabelled_prototypes_came_from(training_output, tmp_path):
    # A teacher with --clip_pretrained none was shown as plain "open_clip `tiny_clip.json`", and prototypes without
    # labels were always "k-means centres of CLIP image features", also when they came from a file.
    import shutil

    from cdb_tokenizer import CDBVQModel

    run = tmp_path / "run"
    shutil.copytree(training_output, run)
    training_config = json.loads((run / "training_config.json").read_text())
    training_config.update(clip_model="tiny_clip.json", clip_pretrained=None, prototypes="given.safetensors")
    (run / "training_config.json").write_text(json.dumps(training_config))
    model = CDBVQModel.from_pretrained(run)
    model.set_prototypes(model.quantizer.prototypes.clone(), None)  # vectors without labels
    model.save_pretrained(run)

    text = ModelCard.load(stage_folder(run, tmp_path / "repo", HUB_ID) / "README.md").text
    assert "open_clip `tiny_clip.json` with random weights" in text
    assert "vectors given in a file" in text and "k-means centres" not in text

    training_config.update(clip_pretrained="tiny.pt", prototypes="kmeans:8")
    (run / "training_config.json").write_text(json.dumps(training_config))
    text = ModelCard.load(stage_folder(run, tmp_path / "repo2", HUB_ID) / "README.md").text
    assert "random weights" not in text and "k-means centres of CLIP image features" in text
