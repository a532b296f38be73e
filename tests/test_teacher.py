"""The CLIP teacher (tiny open_clip model, no weights), its offline behaviour, and the semantic prototypes."""

import json
import logging
import time

import pytest
import torch

import cdb_tokenizer.tools.teacher as teacher_module
from cdb_tokenizer.tools.teacher import (
    TINY_CLIP_CONFIG,
    CLIPTeacher,
    build_clip_model,
    kmeans_prototypes,
    load_clip_teacher,
    load_prototypes,
    read_prototype_labels,
    save_clip_config,
    save_prototypes,
    text_prototypes,
)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    torch.manual_seed(0)
    path = save_clip_config(tmp_path_factory.mktemp("clip") / "tiny_clip.json")
    return load_clip_teacher(str(path), None)


def test_patch_features_are_open_clip_tokens_in_the_joint_space(tiny_teacher):
    pixel_values = torch.rand(2, 3, 48, 48) * 2 - 1
    features = tiny_teacher.patch_features(pixel_values)
    assert features.shape == (2, TINY_CLIP_CONFIG["embed_dim"], 8, 8) and tiny_teacher.embed_dim == 32
    # open_clip's own path: tokens after ln_post, projected like the pooled token.
    visual = tiny_teacher.model.visual
    images = torch.nn.functional.interpolate(pixel_values, size=(32, 32), mode="bicubic", antialias=True)
    images = ((images + 1) / 2 - tiny_teacher.mean) / tiny_teacher.std
    visual.output_tokens = True
    try:
        _, tokens = visual(images)
    finally:
        visual.output_tokens = False
    expected = (tokens @ visual.proj).transpose(1, 2).reshape(2, 32, 8, 8)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)
    resized = tiny_teacher.patch_features(pixel_values, grid_size=(4, 6))
    assert resized.shape == (2, 32, 4, 6)


def test_the_teacher_resizes_as_its_preprocessing_config_says(tmp_path, tiny_teacher):
    # Images were always resized bicubic; some open_clip configs (hf-hub repos) say bilinear.
    assert tiny_teacher.interpolation == "bicubic"
    path = tmp_path / "bilinear_clip.json"
    path.write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": {"interpolation": "bilinear"}}))
    torch.manual_seed(0)
    teacher = load_clip_teacher(str(path), None)
    assert teacher.interpolation == "bilinear"
    pixel_values = torch.rand(1, 3, 48, 48) * 2 - 1
    features = teacher.patch_features(pixel_values)
    teacher.interpolation = "bicubic"
    assert not torch.allclose(teacher.patch_features(pixel_values), features)


def test_text_embeddings_and_prototypes(tiny_teacher):
    embeddings = tiny_teacher.encode_text(["cat", "dog", "tree"])
    assert embeddings.shape == (3, 32)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(embeddings[0], embeddings[1])
    assert torch.equal(text_prototypes(tiny_teacher, ["cat"], "{}"), tiny_teacher.encode_text(["cat"], "{}"))
    with pytest.raises(ValueError, match="must hold one"):
        tiny_teacher.encode_text(["cat"], template="a photo")
    with pytest.raises(ValueError, match="must hold one"):  # a second field was a KeyError from str.format
        tiny_teacher.encode_text(["cat"], template="a {} in {style}")
    torch.testing.assert_close(tiny_teacher.encode_text(["cat"], "a {0}"), tiny_teacher.encode_text(["cat"], "a {}"))


def test_teacher_stays_frozen_in_eval_mode(tiny_teacher):
    tiny_teacher.train()
    assert not tiny_teacher.training and not tiny_teacher.model.training
    assert not any(p.requires_grad for p in tiny_teacher.parameters())


def test_local_checkpoint_gives_the_same_teacher(tiny_teacher, tmp_path):
    checkpoint = tmp_path / "tiny_clip.pt"
    torch.save(tiny_teacher.model.state_dict(), checkpoint)
    config = save_clip_config(tmp_path / "tiny_clip.json")
    reloaded = load_clip_teacher(str(config), str(checkpoint))
    pixel_values = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(reloaded.patch_features(pixel_values), tiny_teacher.patch_features(pixel_values))
    # Its name (metrics.json, trackers, the model card) names local files by their base name: a folder with a space,
    # "/home/John Smith/...", was not cut cleanly out of the free text later and leaked "John Smith".
    assert reloaded.name == "tiny_clip.json (tiny_clip.pt)"


def test_missing_weights_offline_give_none_and_one_line_without_download(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(teacher_module, "reachable", lambda url, timeout=3.0: False)

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted offline")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_download)
    monkeypatch.setattr("open_clip.pretrained.download_pretrained_from_url", no_download)
    start = time.time()
    with caplog.at_level(logging.INFO, logger="cdb_tokenizer.tools.teacher"):
        assert load_clip_teacher("ViT-B-16", "openai", cache_dir=str(tmp_path)) is None
        assert load_clip_teacher("ViT-B-32", "hf-hub:laion/nothing-cached", cache_dir=str(tmp_path)) is None
        assert load_clip_teacher("hf-hub:org/not-cached", None, cache_dir=str(tmp_path)) is None
    assert time.time() - start < 10
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 3 and all(line.startswith("CLIP teacher unavailable") for line in lines)
    assert "ViT-B-16" in lines[0]


def test_a_hugging_face_text_tower_offline_gives_none_and_one_line(monkeypatch, tmp_path, caplog):
    # open_clip builds such a text tower (and its tokenizer) from the Hub, outside the weights' own look-up.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    config = json.loads(json.dumps(TINY_CLIP_CONFIG))
    config["text_cfg"] = {"hf_model_name": "xlm-roberta-base", "hf_tokenizer_name": "xlm-roberta-base",
                          "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler", "context_length": 16}  # fmt: skip
    path = save_clip_config(tmp_path / "hf_text_clip.json", config)
    with caplog.at_level(logging.WARNING, logger="cdb_tokenizer.tools.teacher"):
        assert load_clip_teacher(str(path), None, cache_dir=str(tmp_path)) is None
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("CLIP teacher unavailable") and "\n" not in lines[0]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # it writes a TorchScript file
def test_torchscript_clip_files_are_never_loaded(tiny_teacher, monkeypatch, tmp_path, caplog):
    """OpenAI's original CLIP files are TorchScript (code): the URL copy of an `openai` tag is never used, even when
    it lies in ~/.cache/clip, and a TorchScript or pickled-object checkpoint gives the one-line 'unavailable'."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("open_clip.pretrained.download_pretrained_from_url", pytest.fail)
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "ViT-B-32.pt"))  # where the clip package caches it
    config = save_clip_config(tmp_path / "tiny_clip.json")
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": tiny_teacher.model.state_dict(), "object": time.struct_time((0,) * 9)}, pickled)
    with caplog.at_level(logging.WARNING, logger="cdb_tokenizer.tools.teacher"):
        assert load_clip_teacher("ViT-B-32", "openai", cache_dir=str(tmp_path)) is None
        assert load_clip_teacher(str(config), str(tmp_path / "ViT-B-32.pt")) is None
        assert load_clip_teacher(str(config), str(pickled)) is None
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 3 and all(line.startswith("CLIP teacher unavailable") and "\n" not in line for line in lines)
    assert "TorchScript" in lines[0] and "TorchScript" in lines[1] and "pickled.pt" in lines[2]
    # weights that do not fit the config are a mistake, with what does not fit: never a silent run without teacher
    wrong = tmp_path / "wrong.pt"
    torch.save({name: value[..., :1] if value.ndim else value for name, value in tiny_teacher.model.state_dict().items()}, wrong)
    with pytest.raises(ValueError, match="does not fit the model"):
        load_clip_teacher(str(config), str(wrong))


def test_prototype_files_are_checked(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "prototypes.safetensors"
    for tensor, message in [
        (torch.ones(4), "must be a \\(P, D\\) floating-point tensor"),
        (torch.ones(3, 4, dtype=torch.long), "floating-point"),
        (torch.full((3, 4), float("nan")), "NaN"),
    ]:
        save_file({"prototypes": tensor}, str(path))
        with pytest.raises(ValueError, match=message):
            load_prototypes(path)
    save_file({"prototypes": torch.ones(3, 4)}, str(path), metadata={"labels": '["a", "b"]'})
    with pytest.raises(ValueError, match="JSON list of 3 strings"):
        load_prototypes(path)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors prototype file"):
        load_prototypes(path)


def test_mistakes_are_errors_not_offline(tmp_path):
    with pytest.raises(ValueError, match="unknown open_clip model"):
        load_clip_teacher("ViT-Q-99", None)
    with pytest.raises(ValueError, match="tags are"):
        load_clip_teacher("ViT-B-16", "no_such_tag")
    with pytest.raises(ValueError, match="does not exist"):
        load_clip_teacher("ViT-B-16", str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="does not exist"):
        load_clip_teacher(str(tmp_path / "missing.json"), None)


def test_teacher_needs_a_vit_tower():
    with pytest.raises(ValueError, match="VisionTransformer"):
        CLIPTeacher(torch.nn.Linear(2, 2))
    model = build_clip_model(TINY_CLIP_CONFIG)
    assert CLIPTeacher(model).native_grid_size == (8, 8)


def test_kmeans_prototypes_and_safetensors_round_trip(tiny_teacher, tmp_path):
    batches = [torch.rand(2, 3, 32, 32) * 2 - 1 for _ in range(2)]
    prototypes = kmeans_prototypes(tiny_teacher, batches, num_prototypes=5, seed=0)
    assert prototypes.shape == (5, 32)
    torch.testing.assert_close(prototypes.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(kmeans_prototypes(tiny_teacher, batches, 5, seed=0), prototypes)

    labels = ["a", "b", "c", "d", "e"]
    path = save_prototypes(tmp_path / "prototypes.safetensors", prototypes, labels, source="kmeans:5")
    loaded, loaded_labels = load_prototypes(path)
    assert torch.equal(loaded, prototypes) and loaded_labels == labels
    save_prototypes(path, prototypes)
    assert load_prototypes(path)[1] is None
    with pytest.raises(ValueError, match="2 labels for 5"):
        save_prototypes(path, prototypes, ["a", "b"])
    with pytest.raises(FileNotFoundError):
        load_prototypes(tmp_path / "missing.safetensors")


def test_prototype_label_files(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("sky\n\n# a comment\n  tree  \n")
    assert read_prototype_labels(path) == ["sky", "tree"]
    path.write_text("# only comments\n")
    with pytest.raises(ValueError, match="holds no labels"):
        read_prototype_labels(path)
    with pytest.raises(FileNotFoundError):
        read_prototype_labels(tmp_path / "missing.txt")


def test_the_reachability_probe_goes_through_the_proxy_the_environment_names(monkeypatch):
    # Behind a proxy the Hub's host is never reachable directly: the probe took such a machine for an offline one,
    # and a semantic recipe trained without its teacher.
    import socket

    from cdb_tokenizer.tools.downloads import reachable

    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    try:
        open_port = listening.getsockname()[1]
        assert reachable(f"https://127.0.0.1:{open_port}/", timeout=1)  # no proxy: the host itself
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{open_port}")
        assert reachable("https://nowhere.invalid/weights.bin", timeout=1)  # the proxy answers for it
        monkeypatch.setenv("no_proxy", "nowhere.invalid")
        assert not reachable("https://nowhere.invalid/weights.bin", timeout=1)  # NO_PROXY: direct, and unreachable
        monkeypatch.delenv("no_proxy")
        monkeypatch.setenv("https_proxy", f"127.0.0.1:{closed_port}")  # a proxy that is down (no scheme given)
        assert not reachable("https://nowhere.invalid/weights.bin", timeout=1)
        monkeypatch.delenv("https_proxy")
        monkeypatch.setenv("all_proxy", f"http://127.0.0.1:{open_port}")  # ALL_PROXY serves every scheme
        assert reachable("https://nowhere.invalid/weights.bin", timeout=1)
    finally:
        listening.close()


@pytest.mark.parametrize("model_name, message", [("RN50", "needs an open_clip VisionTransformer image tower"),
                                                 ("coca_ViT-B-32", "uses attentional pooling")])  # fmt: skip
def test_a_teacher_without_patch_tokens_is_refused_before_its_weights_are_fetched(model_name, message, monkeypatch):
    # It was refused only after the download (and offline it was "unavailable": the run went on, the mistake hidden).
    import open_clip

    tag = open_clip.list_pretrained_tags_by_model(model_name)[0]

    def fetch(*args, **kwargs):
        raise AssertionError("the weights were fetched")

    monkeypatch.setattr(teacher_module, "_tag_checkpoint", fetch)
    with pytest.raises(ValueError, match=message):
        load_clip_teacher(model_name, tag)


def test_the_prototype_cache_key_follows_what_the_prototypes_are_built_from(tmp_path):
    from cdb_tokenizer.tools.teacher import prototype_key

    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    text = f"text:{tmp_path / 'labels.txt'}"
    base = dict(template="a photo of a {}.", teacher_name="ViT-B-16 openai", seed=0, kmeans_batches=32, data="photos/ 256 8 None 1")
    assert prototype_key(text, **base) == prototype_key(text, **{**base, "data": "other/ 128 4 None 2"})  # text ignores the data
    assert prototype_key(text, **base) != prototype_key(text, **{**base, "template": "{}"})
    for change in ({"data": "other/ 256 8 None 1"}, {"seed": 1}, {"kmeans_batches": 8}, {"teacher_name": "ViT-B-32 openai"}):
        assert prototype_key("kmeans:16", **base) != prototype_key("kmeans:16", **{**base, **change}), change


def test_files_that_are_not_what_the_flags_ask_for_are_named_mistakes(tiny_teacher, tmp_path):
    # A transformers config.json as --clip_model gave CLIP.__init__'s TypeError traceback; a text file gave only
    # "Expecting value: line 1 column 1"; a labels file as --clip_pretrained was "unavailable" and the run trained on
    # without the teacher, with a torch message in terminal colour codes.
    transformers_config = tmp_path / "config.json"
    transformers_config.write_text(json.dumps({"architectures": ["CDBVQModel"], "model_type": "cdb_vq"}))
    with pytest.raises(ValueError, match=r"config.json.*not an open_clip model config \(.*architectures"):
        load_clip_teacher(str(transformers_config), None)
    text = tmp_path / "labels.json"
    text.write_text("cat\ndog\n")
    with pytest.raises(ValueError, match=r"labels.json' is not JSON"):
        load_clip_teacher(str(text), None)
    config = save_clip_config(tmp_path / "tiny_clip.json")
    with pytest.raises(ValueError, match=r"labels.json is not a checkpoint"):
        load_clip_teacher(str(config), str(text))


def test_the_teacher_knows_its_weights_by_content_not_by_file_name(tiny_teacher, tmp_path):
    # A resume compared teachers by name, which gives local files by their base name: another epoch_5.pt passed.
    config = save_clip_config(tmp_path / "tiny_clip.json")
    first, second = tmp_path / "a" / "tiny.pt", tmp_path / "b" / "tiny.pt"
    for path, seed in ((first, 0), (second, 1)):
        path.parent.mkdir()
        torch.manual_seed(seed)
        torch.save(build_clip_model(TINY_CLIP_CONFIG).state_dict(), path)
    teachers = [load_clip_teacher(str(config), str(path)) for path in (first, second, first)]
    assert teachers[0].name == teachers[1].name
    assert teachers[0].weights_digest == teachers[2].weights_digest != teachers[1].weights_digest
    assert load_clip_teacher(str(config), None).weights_digest is None


def test_kmeans_refuses_more_prototypes_than_features(tiny_teacher):
    # 5,000 centres from 128 features were built without a word: thousands of jittered copies, tied arbitrarily.
    batches = [torch.rand(2, 3, 32, 32) * 2 - 1]
    with pytest.raises(ValueError, match=r"kmeans:200 asks for more prototypes than the 128 teacher patch features "
                                         r"of 1 batch; .*--prototype_kmeans_batches"):  # fmt: skip
        kmeans_prototypes(tiny_teacher, batches, num_prototypes=200, seed=0)
