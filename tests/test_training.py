"""training/train.py end to end on the CPU: outputs, logged loss terms, resume, NaN handling, bad inputs."""

import argparse
import json
import os
import logging
import shutil
import stat
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import cdb_tokenizer.tools.steps as steps_module
import training.train as train_script
from cdb_tokenizer.tools.files import plain_file_mode
from cdb_tokenizer.tools.teacher import save_clip_config
from conftest import image_folder, refit_manifest, tiny_model
from training.train import TrainingStopped, main, parse_args

TINY_MODEL = ["--resolution", "32", "--base_channels", "16", "--channel_multipliers", "1", "2", "2", "--num_res_blocks", "1", "--norm_num_groups", "8", "--latent_dim", "16", "--codebook_size", "64", "--codebook_dim", "8", "--semantic_dim", "32", "--num_prototypes", "8", "--router_dim", "8"]
# A short run without the optional parts (no teacher, no LPIPS, no discriminator).
PLAIN_RUN = TINY_MODEL + ["--model_preset", "tiny", "--train_batch_size", "2", "--num_validation_images", "2", "--clip_model", "none", "--report_to", "none", "--lpips_weight", "0", "--disc_weight", "0"]  # fmt: skip
# `balance` and `role_supervision` are built (and logged) only with a positive weight; the run keeps both at 0.
LOSS_TERMS = (
    "l1", "l2", "lpips", "generator_adversarial", "adaptive_weight", "codebook", "commitment",
    "semantic_distillation", "token_alignment", "code_alignment", "vq", "total", "discriminator",
)  # fmt: skip


def read_log(output_dir) -> list[dict]:
    lines = (Path(output_dir) / "logs" / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def loss_records(output_dir) -> dict[int, dict]:
    return {record["step"]: record for record in read_log(output_dir) if "loss/total" in record}


@pytest.fixture
def fake_lpips_weights(tmp_path, monkeypatch):
    """Random SqueezeNet weights where torch hub looks for the LPIPS backbone (the real ones need a download)."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    folder = tmp_path / "torch_home" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(torchvision.models.squeezenet1_1().state_dict(), folder / "squeezenet1_1-b8a52dc0.pth")


def test_end_to_end_run_writes_a_loadable_tokenizer_and_logs_every_loss_term(tmp_path, fake_lpips_weights):
    from transformers import AutoImageProcessor, AutoModel

    labels = ["sky", "tree", "water", "building", "person", "animal", "road", "flower"]
    (tmp_path / "labels.txt").write_text("\n".join(["# prototypes"] + labels) + "\n")
    clip_config = save_clip_config(tmp_path / "tiny_clip.json")
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    save_file({"w": torch.zeros(1)}, str(output_dir / "private.safetensors"))  # a user's own file, kept 0o600
    os.chmod(output_dir / "private.safetensors", 0o600)
    metrics = main(TINY_MODEL + [
        "--output_dir", str(output_dir), "--max_train_steps", "3", "--train_batch_size", "2", "--ema_decay", "none",
        "--num_validation_images", "3", "--clip_model", str(clip_config), "--clip_pretrained", "none",
        "--prototypes", f"text:{tmp_path / 'labels.txt'}", "--l2_weight", "1.0", "--lpips_weight", "0.5",
        "--lpips_network", "squeeze", "--disc_weight", "0.5", "--disc_start", "0", "--disc_base_channels", "8",
        "--disc_num_layers", "2", "--use_ema", "--validation_steps", "2", "--checkpointing_steps", "2",
        "--checkpoints_total_limit", "1",
    ])  # fmt: skip

    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "reconstructions.png",
                 "codebook_usage.png", "training_config.json", "prototypes.safetensors"):  # fmt: skip
        assert (output_dir / name).is_file(), name
    assert [p.name for p in (output_dir / "checkpoints").iterdir()] == ["checkpoint-3"]
    # Weights are as readable as the run's other files (safetensors alone creates them 0o600).
    checkpoint = output_dir / "checkpoints" / "checkpoint-3"
    for path in (output_dir / "model.safetensors", checkpoint / "model.safetensors", checkpoint / "training_state.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == plain_file_mode() == stat.S_IMODE((output_dir / "config.json").stat().st_mode), path
    assert stat.S_IMODE((output_dir / "private.safetensors").stat().st_mode) == 0o600  # not the run's to share
    # The teacher statistics behind the prototype ties: in the checkpoint (resumption), not in the model for use.
    checkpoint_weights = load_file(output_dir / "checkpoints" / "checkpoint-3" / "model.safetensors")
    assert float(checkpoint_weights["quantizer.teacher_statistics.counts"].sum()) > 0
    final_weights = load_file(output_dir / "model.safetensors")
    assert not any("teacher_statistics" in key for key in final_weights)
    # --use_ema: the saved tokenizer carries the averaged weights (kept in the last checkpoint), not the raw ones.
    ema_weights = load_file(output_dir / "checkpoints" / "checkpoint-3" / "training_state.safetensors")
    averaged = {name.removeprefix("ema/"): value for name, value in ema_weights.items() if name.startswith("ema/")}
    assert "quantizer.codebook.weight" in averaged and "encoder.conv_in.weight" in averaged
    for name, value in averaged.items():
        assert torch.equal(final_weights[name], value.to(final_weights[name].dtype)), name
    assert not torch.equal(checkpoint_weights["encoder.conv_in.weight"], final_weights["encoder.conv_in.weight"])
    assert list((output_dir / "logs").rglob("events.out.tfevents.*"))
    saved = json.loads((output_dir / "metrics.json").read_text())
    assert saved == metrics
    for key in ("psnr", "ssim", "lpips", "utilization", "perplexity", "wall_time_seconds"):
        assert np.isfinite(saved[key]), key
    assert saved["steps"] == 3 and saved["prototypes"] == 8 and 0 < saved["utilization"] <= 1
    with Image.open(output_dir / "reconstructions.png") as grid:
        # scikit-learn's two held-out photos (shorter side 256) and a zoomed detail, originals beside reconstructions
        assert grid.width >= 2 * 384 and grid.height >= 3 * 256
    assert json.loads((output_dir / "training_config.json").read_text())["model_config"]["semantic_dim"] == 32

    records = loss_records(output_dir)
    assert sorted(records) == [1, 2, 3]
    for term in LOSS_TERMS:
        assert all(np.isfinite(records[step][f"loss/{term}"]) for step in records), term
    assert any("validation/psnr" in record for record in read_log(output_dir))

    model = AutoModel.from_pretrained(output_dir, trust_remote_code=True)
    processor = AutoImageProcessor.from_pretrained(output_dir, trust_remote_code=True)
    assert type(model).__name__ == "CDBVQModel" and model.config.semantic_dim == 32
    assert model.config.prototype_labels == labels
    assert set(model.code_prototype_labels()) <= set(labels)
    pixel_values = processor(Image.new("RGB", (50, 40), (200, 30, 30)), return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 3, 32, 32)
    tokens = model.get_image_tokens(pixel_values)
    assert tokens.shape == (1, 64) and model.decode_image_tokens(tokens).shape == (1, 3, 32, 32)


def test_resumed_run_matches_the_uninterrupted_run_step_for_step(tmp_path):
    run = PLAIN_RUN + ["--max_train_steps", "4", "--checkpointing_steps", "2", "--dead_code_restart_steps", "2", "--usage_decay", "0.3", "--dead_code_threshold", "0.9", "--disc_weight", "0.5", "--disc_start", "1", "--disc_base_channels", "8", "--disc_num_layers", "2", "--use_ema", "--dropout", "0.2"]  # fmt: skip
    main(run + ["--output_dir", str(tmp_path / "straight")])
    # An interrupted run leaves exactly checkpoint-2 behind; resume it in a fresh folder.
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "checkpoint-2", tmp_path / "resumed" / "checkpoints" / "checkpoint-2")
    # The first session's wall time, as its checkpoint recorded it (made long here), counts in the resumed run's.
    state_file = tmp_path / "resumed" / "checkpoints" / "checkpoint-2" / "training_state.json"
    state = json.loads(state_file.read_text())
    assert state["wall_time_seconds"] > 0
    state_file.write_text(json.dumps({**state, "wall_time_seconds": 5000.0}))
    refit_manifest(state_file.parent)
    main(run + ["--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "latest"])
    wall_time = json.loads((tmp_path / "resumed" / "metrics.json").read_text())["wall_time_seconds"]
    assert 5000 < wall_time < 5000 + json.loads((tmp_path / "straight" / "metrics.json").read_text())["wall_time_seconds"] * 5

    straight, resumed = loss_records(tmp_path / "straight"), loss_records(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4]
    assert any(straight[step]["codebook/restarted"] > 0 for step in straight)  # the restarts are part of the state
    for step in (3, 4):
        for key, value in straight[step].items():
            assert resumed[step][key] == value, (step, key)
    final_straight = load_file(tmp_path / "straight" / "model.safetensors")
    final_resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(final_straight[key], final_resumed[key]) for key in final_straight)


def test_a_resume_past_an_epoch_with_gradient_accumulation_re_enters_the_data_where_it_left(tmp_path):
    # The test above resumes inside the first epoch with one micro-batch a step: losing the epoch on resume, or the
    # accumulation factor in the batches to skip, passed it. 16 demo photos at batch 2 with 2 micro-batches a step:
    # 4 steps an epoch, so checkpoint-5 is in the second epoch, one step in.
    run = PLAIN_RUN + ["--max_train_steps", "6", "--checkpointing_steps", "5", "--gradient_accumulation_steps", "2",
                       "--validation_steps", "100"]  # fmt: skip
    main(run + ["--output_dir", str(tmp_path / "straight")])
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "checkpoint-5", tmp_path / "resumed" / "checkpoints" / "checkpoint-5")
    main(run + ["--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "latest"])
    straight, resumed = loss_records(tmp_path / "straight"), loss_records(tmp_path / "resumed")
    assert sorted(resumed) == [6]
    assert resumed[6] == straight[6]


def test_a_resumed_run_trains_at_its_own_learning_rate_and_ema_decay(tmp_path):
    # The stop message advises resuming "with a lower --learning_rate": the checkpoint's optimiser state used to
    # carry the old rate (and the old EMA decay) over the new flags, silently.
    run = PLAIN_RUN + ["--max_train_steps", "4", "--checkpointing_steps", "2", "--lr_scheduler", "cosine",
                       "--lr_warmup_steps", "0", "--learning_rate", "1e-3", "--use_ema", "--output_dir", str(tmp_path)]  # fmt: skip
    main(run)
    straight = loss_records(tmp_path)
    (tmp_path / "checkpoints" / "checkpoint-4").rename(tmp_path / "checkpoints" / "interrupted")
    main(run + ["--resume_from_checkpoint", str(tmp_path / "checkpoints" / "checkpoint-2"), "--learning_rate", "1e-5",
                "--ema_weights_decay", "0.5"])  # fmt: skip
    resumed = loss_records(tmp_path)
    for step in (3, 4):  # the same point of the cosine schedule, at a peak 100 times lower
        assert resumed[step]["train/learning_rate"] == pytest.approx(straight[step]["train/learning_rate"] / 100)
    state = json.loads((tmp_path / "checkpoints" / "checkpoint-4" / "training_state.json").read_text())
    assert state["ema_weights_decay"] == 0.5
    assert state["ema_weights_updates"] == 4  # the warm-up goes on from the checkpoint's count


def test_the_logged_learning_rate_is_the_one_each_step_trained_at(tmp_path):
    # The log showed the rate after the schedule's step: the next step's (a warm-up's first step trains at 0).
    main(PLAIN_RUN + ["--max_train_steps", "3", "--lr_scheduler", "linear", "--lr_warmup_steps", "2",
                      "--learning_rate", "1e-3", "--output_dir", str(tmp_path)])  # fmt: skip
    rates = [record["train/learning_rate"] for step, record in sorted(loss_records(tmp_path).items())]
    assert rates == pytest.approx([0.0, 5e-4, 1e-3])


def test_a_resume_with_another_batch_size_says_the_data_order_changes(tmp_path, caplog):
    run = PLAIN_RUN + ["--max_train_steps", "2", "--checkpointing_steps", "1", "--output_dir", str(tmp_path)]
    main(run)
    # The tiny preset's 50 warm-up steps are more than this run has: its learning rate never peaks, which is said.
    assert "--lr_warmup_steps 50 is not below the run's 2 steps" in caplog.text
    caplog.clear()
    main(run + ["--max_train_steps", "3", "--resume_from_checkpoint", "latest", "--lr_warmup_steps", "2"])
    assert "re-enters the data" not in caplog.text  # the same flags: an exact continuation
    assert "is not below the run's" not in caplog.text
    assert "Resuming with lr_warmup_steps 50 -> 2, max_train_steps 2 -> 3: the learning-rate schedule" in caplog.text
    caplog.clear()
    main(PLAIN_RUN + ["--max_train_steps", "1", "--lr_scheduler", "constant", "--output_dir", str(tmp_path / "constant")])
    assert "lr_warmup_steps" not in caplog.text  # a constant rate has no warm-up to miss
    main(run + ["--max_train_steps", "4", "--resume_from_checkpoint", "latest", "--train_batch_size", "3"])
    assert "Resuming with train_batch_size 2 -> 3: the run re-enters the data at another batch" in caplog.text


def test_a_checkpoint_from_before_the_fixed_validation_seed_is_named(caplog):
    # Its held-out images were drawn with --seed: with another seed than the fixed one they are now others.
    now = {"seed": 3, "validation_seed": train_script.VALIDATION_SAMPLE_SEED}
    train_script.warn_if_data_order_changed({"seed": 3}, now)
    assert "written before validation images were drawn under a fixed seed: with --seed 3" in caplog.text
    caplog.clear()
    train_script.warn_if_data_order_changed({"seed": 0}, {**now, "seed": 0})  # seed 0 drew the same images
    train_script.warn_if_data_order_changed(now, now)
    assert "fixed seed" not in caplog.text


def test_a_checkpoint_of_another_folder_may_start_a_cleared_one(tmp_path):
    # Only a checkpoint that --overwrite_output_dir would delete is refused with it.
    for resume in ("latest", str(tmp_path / "run" / "checkpoints" / "checkpoint-2")):
        with pytest.raises(SystemExit):
            parse_args(PLAIN_RUN + ["--output_dir", str(tmp_path / "run"), "--overwrite_output_dir", "--resume_from_checkpoint", resume])
    parse_args(PLAIN_RUN + ["--output_dir", str(tmp_path / "run"), "--overwrite_output_dir",
                            "--resume_from_checkpoint", str(tmp_path / "other" / "checkpoints" / "checkpoint-2")])  # fmt: skip


@pytest.mark.parametrize("variable, name", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_sharded_training_is_refused_before_any_work(tmp_path, monkeypatch, variable, name):
    # On CPUs accelerate silently ran DDP for an FSDP config; on GPUs FSDP crashed or lost the codebook's updates.
    # DeepSpeed's ZeRO shards the same weights, and its checkpoints could not be resumed (pickle).
    monkeypatch.setenv(variable, "true")
    with pytest.raises(ValueError, match=f"train.py does not support {name}"):
        main(PLAIN_RUN + ["--max_train_steps", "1", "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def _nan_at(steps):
    real = steps_module.compute_losses

    def compute_losses(model, pixel_values, loss_module, teacher, step, *args):
        losses = real(model, pixel_values, loss_module, teacher, step, *args)
        if step in steps:
            losses.terms["l1"] = losses.terms["l1"] * float("nan")
            losses.total = losses.total + losses.terms["l1"]
        return losses

    return compute_losses


@pytest.mark.parametrize("assignment", ["nearest", "cdb"])
def test_ema_codebook_trains_end_to_end(tmp_path, assignment):
    """`--ema_decay` with each rule runs the tiny preset through training, validation and saving."""
    output_dir = tmp_path / "run"
    metrics = main(PLAIN_RUN + ["--output_dir", str(output_dir), "--max_train_steps", "3", "--assignment", assignment, "--ema_decay", "0.8"])  # fmt: skip
    assert np.isfinite(metrics["psnr"])
    assert json.loads((output_dir / "config.json").read_text())["ema_decay"] == 0.8
    assert all(np.isfinite(record["loss/total"]) for record in loss_records(output_dir).values())


def test_a_nan_step_is_skipped_and_named(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(steps_module, "compute_losses", _nan_at({1}))
    metrics = main(PLAIN_RUN + ["--output_dir", str(tmp_path / "run"), "--max_train_steps", "3"])
    assert metrics["nonfinite_steps"] == 1 and metrics["steps"] == 3
    assert "the l1 loss is NaN or infinite" in caplog.text
    assert sorted(loss_records(tmp_path / "run")) == [1, 3]
    state = load_file(tmp_path / "run" / "model.safetensors")
    assert all(torch.isfinite(value.float()).all() for value in state.values())


def test_a_skipped_last_step_still_writes_its_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(steps_module, "compute_losses", _nan_at({2}))  # the third and last step
    output_dir = tmp_path / "run"
    metrics = main(PLAIN_RUN + ["--output_dir", str(output_dir), "--max_train_steps", "3", "--checkpointing_steps", "3"])
    assert metrics["nonfinite_steps"] == 1 and np.isfinite(metrics["psnr"])
    assert (output_dir / "checkpoints" / "checkpoint-3" / "model.safetensors").is_file()


def test_resuming_from_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path):
    output_dir = tmp_path / "run"
    run = PLAIN_RUN + ["--output_dir", str(output_dir), "--checkpointing_steps", "1", "--checkpoints_total_limit", "2"]
    main(run + ["--max_train_steps", "3"])
    checkpoints = output_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    main(run + ["--max_train_steps", "4", "--resume_from_checkpoint", str(checkpoints / "checkpoint-2")])
    # checkpoint-2 (resumed from) and this run's 3 and 4 count; the abandoned run's 3 is kept aside, never rotated.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["abandoned-checkpoint-3", "checkpoint-3", "checkpoint-4"]
    main(run + ["--max_train_steps", "4", "--resume_from_checkpoint", str(checkpoints / "checkpoint-3")])
    # Going back a second time: a free name, no error.
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "abandoned-checkpoint-3", "abandoned-checkpoint-4", "checkpoint-3", "checkpoint-4"]  # fmt: skip
    main(run + ["--max_train_steps", "4", "--resume_from_checkpoint", str(checkpoints / "checkpoint-3")])
    assert "abandoned-checkpoint-4-2" in {p.name for p in checkpoints.iterdir()}


def test_losses_that_stay_nan_stop_cleanly_keeping_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(steps_module, "compute_losses", _nan_at({1, 2, 3, 4}))
    output_dir = tmp_path / "run"
    # Step 2 is skipped and still checkpointed on schedule (with step 1's weights: it changed nothing); step 3 stops.
    with pytest.raises(TrainingStopped, match=r"2 steps in a row.*l1.*checkpoint-2"):
        main(PLAIN_RUN + ["--output_dir", str(output_dir), "--max_train_steps", "6", "--checkpointing_steps", "1",
                          "--max_nonfinite_steps", "2"])  # fmt: skip
    first = load_file(output_dir / "checkpoints" / "checkpoint-1" / "model.safetensors")
    second = load_file(output_dir / "checkpoints" / "checkpoint-2" / "model.safetensors")
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not (output_dir / "model.safetensors").exists()


def test_image_folder_run_skips_unreadable_images_with_a_count(tmp_path):
    image_folder(tmp_path / "data", {"train": 8, "validation": 2}, broken={"train": ["broken.png"], "validation": ["broken.png"]})
    metrics = main(PLAIN_RUN + ["--train_data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "run"),
                                "--train_batch_size", "3", "--max_train_steps", "3", "--num_validation_images", "3"])  # fmt: skip
    # 9 training images, 3 batches of 3: one epoch, so the broken one is met exactly once.
    assert metrics["skipped_images"] == 1 and metrics["skipped_validation_images"] == 1
    assert metrics["num_images"] == 2


def test_too_few_readable_validation_images_for_rfid_leave_rfid_out(tmp_path, caplog):
    image_folder(tmp_path / "data", {"train": 4, "validation": 1}, broken={"validation": ["broken.png"]})
    metrics = main(PLAIN_RUN + ["--train_data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "run"),
                                "--max_train_steps", "1", "--validation_fid", "random"])  # fmt: skip
    assert metrics["num_images"] == 1 and "rfid" not in metrics
    assert "validating without rFID" in caplog.text


def test_streamed_folder_trains_and_resumes(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for index in range(7):
        Image.fromarray(np.full((36, 36, 3), index * 30, dtype=np.uint8)).save(folder / f"{index}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    run = PLAIN_RUN + ["--train_data_dir", str(folder), "--streaming", "--output_dir", str(tmp_path / "run"),
                       "--checkpointing_steps", "2"]  # fmt: skip
    # Two images held out of the stream for validation; five readable ones and the broken one to train on, so each
    # pass gives two batches of two and meets the broken image once: three passes in six steps, one broken file.
    metrics = main(run + ["--max_train_steps", "6"])
    assert metrics["num_images"] == 2 and metrics["skipped_images"] == 1
    straight = loss_records(tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "checkpoint-6")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "checkpoint-4")
    (tmp_path / "run" / "logs" / "train_log.jsonl").unlink()
    main(run + ["--max_train_steps", "6", "--resume_from_checkpoint", "latest"])  # the stream is replayed to step 2
    resumed = loss_records(tmp_path / "run")
    assert sorted(resumed) == [3, 4, 5, 6]
    assert all(resumed[step]["loss/total"] == straight[step]["loss/total"] for step in resumed)


def test_push_to_hub_hands_the_output_folder_to_publishing(tmp_path, monkeypatch, caplog):
    calls = []

    def push_to_hub(output_dir, hub_model_id, **kwargs):
        calls.append((output_dir, hub_model_id, kwargs))
        if hub_model_id == "me/down":
            raise ConnectionError("connection reset by peer")
        return types.SimpleNamespace(commit_url="https://huggingface.co/me/tok/commit/abc")

    publishing = types.ModuleType("cdb_tokenizer.tools.publishing")
    publishing.push_to_hub = push_to_hub
    publishing.check_push_settings = lambda hub_model_id, token=None: calls.append(("checked", hub_model_id)) or "token"
    monkeypatch.setitem(sys.modules, "cdb_tokenizer.tools.publishing", publishing)
    output_dir = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        main(PLAIN_RUN + ["--output_dir", str(output_dir), "--max_train_steps", "1", "--push_to_hub", "--hub_model_id", "me/tok"])
    assert calls == [("checked", "me/tok"), (str(output_dir), "me/tok", {"private": False, "token": None})]
    assert "Uploaded to me/tok: https://huggingface.co/me/tok/commit/abc" in caplog.text  # it said nothing
    # A failed upload was a traceback from the Hub client: now one message, saying the model is saved and how to retry.
    from training.train import UploadFailed

    output_dir = tmp_path / "down"
    with pytest.raises(UploadFailed, match=r"the upload to me/down failed \(ConnectionError: connection reset by peer\)"
                       r"\. The model is saved in .*down; retry the upload with: python training/publish\.py .*down "
                       r"--hub_model_id me/down --private$"):  # a private run's retry must not create a public repo
        main(PLAIN_RUN + ["--output_dir", str(output_dir), "--max_train_steps", "1", "--push_to_hub", "--hub_model_id",
                          "me/down", "--hub_private_repo"])  # fmt: skip
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "metrics.json").is_file()


def test_push_to_hub_without_a_token_stops_before_training(tmp_path, monkeypatch):
    # The token and the repo id were first checked after training: hours of it, on a real run.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    with pytest.raises(ValueError, match="no Hugging Face token"):
        main(PLAIN_RUN + ["--output_dir", str(tmp_path / "run"), "--max_train_steps", "1", "--push_to_hub"])
    with pytest.raises(ValueError, match="invalid hub_model_id 'run one'"):
        main(PLAIN_RUN + ["--output_dir", str(tmp_path / "run one"), "--max_train_steps", "1", "--push_to_hub", "--hub_token", "hf_x"])
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run one" / "checkpoints").exists()


def test_the_default_hub_repository_is_the_output_folders_name(tmp_path, monkeypatch):
    # `--output_dir .` gave the repository name '' ("invalid hub_model_id ''"), not the folder's.
    monkeypatch.chdir(tmp_path)
    names = {".": tmp_path.name, "run/": "run", str(tmp_path / "run"): "run", "run/sub/..": "run"}
    for output_dir, name in names.items():
        assert train_script.hub_model_id(argparse.Namespace(hub_model_id=None, output_dir=output_dir)) == name
    assert train_script.hub_model_id(argparse.Namespace(hub_model_id="me/tok", output_dir=".")) == "me/tok"


def test_bad_image_column_names_the_columns(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for index in range(4):
        Image.new("RGB", (8, 8)).save(folder / f"{index}.png")
    with pytest.raises(ValueError, match=r"'photo' is not a column.*\['image'\]"):
        main(PLAIN_RUN + ["--train_data_dir", str(folder), "--image_column", "photo", "--output_dir", str(tmp_path / "run")])


def test_command_line_reports_a_missing_folder_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "training" / "train.py"), "--train_data_dir", str(tmp_path / "nowhere"),
         "--output_dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode != 0
    assert "nowhere" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------------ arguments


def test_no_data_flags_give_the_tiny_demo_and_data_flags_the_base_preset(tmp_path):
    demo = parse_args([])
    assert demo.model_preset == "tiny" and demo.resolution == 64 and demo.output_dir == "outputs/cdb-vq-demo"
    assert demo.model_config_dict["codebook_size"] == 1024 and demo.lpips_weight == 0.0
    real = parse_args(["--train_data_dir", str(tmp_path)])
    assert real.model_preset == "base" and real.resolution == 256 and real.lpips_weight == 1.0
    assert "codebook_size" not in real.model_config_dict  # CDBVQConfig's own default
    assert parse_args(["--clip_model", "none"]).clip_model is None
    epochs = parse_args(["--num_train_epochs", "2"])
    assert epochs.max_train_steps is None


def test_an_output_dir_starting_with_a_tilde_is_in_the_home_folder(tmp_path, monkeypatch):
    # `output_dir: ~/runs/x` in a YAML config (or --output_dir=~/runs/x) reaches no shell: the home folder is meant.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert parse_args(["--output_dir=~/runs/x"]).output_dir == str(tmp_path / "home" / "runs" / "x")
    config = tmp_path / "run.yaml"
    config.write_text("output_dir: ~/runs/y\n")
    assert parse_args(["--config", str(config)]).output_dir == str(tmp_path / "home" / "runs" / "y")


def test_a_mistyped_flag_is_answered_with_the_closest_one(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--max_steps", "20", "--codebok_size=8"])
    error = capsys.readouterr().err
    assert "unrecognized arguments: --max_steps 20 --codebok_size=8 (did you mean --max_train_steps or --codebook_size?)" in error
    with pytest.raises(SystemExit):
        parse_args(["--zzz"])
    assert "did you mean" not in capsys.readouterr().err  # nothing close: no guess


def test_config_file_keys_are_flag_names_and_the_command_line_wins(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 0.01\ncodebook_size: 128\nassignment: nearest\nema_decay: null\nrandom_flip: false\n")
    args = parse_args(["--config", str(config), "--learning_rate", "0.02"])
    assert args.learning_rate == 0.02 and args.random_flip is False
    assert args.model_config_dict["codebook_size"] == 128 and args.model_config_dict["assignment"] == "nearest"
    assert "ema_decay" in args.model_config_dict and args.model_config_dict["ema_decay"] is None


def test_a_command_line_epoch_count_wins_over_the_config_files_steps(tmp_path):
    # The recipes set max_train_steps: `--config recipe.yaml --num_train_epochs 1` trained the recipe's steps,
    # silently.
    config = tmp_path / "run.yaml"
    config.write_text("max_train_steps: 7\n")
    assert parse_args(["--config", str(config), "--num_train_epochs", "1"]).max_train_steps is None  # epochs decide
    assert parse_args(["--config", str(config)]).max_train_steps == 7
    both = ["--config", str(config), "--num_train_epochs", "1", "--max_train_steps", "5"]
    assert parse_args(both).max_train_steps == 5
    config.write_text("max_train_steps: 7\nnum_train_epochs: 2\n")  # both in the file: the steps, as on a command line
    assert parse_args(["--config", str(config)]).max_train_steps == 7


def test_a_folder_too_small_to_hold_out_validation_images_says_what_to_do(tmp_path, fresh_accelerator_state):
    image_folder(tmp_path / "one", {"photos": 1})
    with pytest.raises(ValueError, match=r"has 1 image, too few to hold out 2 for validation: .*a validation/ folder"):
        main(PLAIN_RUN + ["--train_data_dir", str(tmp_path / "one"), "--output_dir", str(tmp_path / "run"),
                          "--max_train_steps", "1"])  # fmt: skip


def test_an_output_dir_among_the_training_images_is_refused(tmp_path, capsys):
    # Its reconstructions.png and codebook_usage.png were read as training (and held-out) images by the resume.
    image_folder(tmp_path / "flat", {"photos": 3})
    with pytest.raises(SystemExit):
        parse_args(PLAIN_RUN + ["--train_data_dir", str(tmp_path / "flat"), "--output_dir", str(tmp_path / "flat/x")])
    assert "is inside the images of --train_data_dir" in capsys.readouterr().err
    # With split folders only train/, validation/ and test/ are read: a run beside them is fine.
    image_folder(tmp_path / "split", {"train": 3, "validation": 2})
    parse_args(PLAIN_RUN + ["--train_data_dir", str(tmp_path / "split"), "--output_dir", str(tmp_path / "split/x")])


def test_every_config_field_flag_parses_to_its_type():
    # --quantizer_format (int | None) was parsed as a float, which the config then refused: "got 3.0".
    from cdb_tokenizer.tools.train_args import _model_config_fields

    preset = parse_args([]).model_config_dict  # values that build together (the demo preset's, else the defaults)
    examples = {"quantizer_format": 2, "ema_decay": 0.5, "router_logit_bound": 0.25}  # fields whose default is None
    for name, parameter in _model_config_fields().items():
        value = examples.get(name, preset.get(name, parameter.default))
        if name in ("channel_multipliers", "code_roles") or isinstance(value, bool) or value is None:
            continue  # lists, JSON and --flag/--no-flag: tested elsewhere
        parsed = parse_args([f"--{name}", str(value)]).model_config_dict[name]
        assert parsed == value and type(parsed) is type(value), (name, parsed)
    assert parse_args(["--quantizer_format", "none", "--ema_decay", "none"]).model_config_dict["ema_decay"] is None


def test_model_config_file_then_flags(tmp_path):
    from cdb_tokenizer import CDBVQConfig

    CDBVQConfig(codebook_size=128, assignment="sinkhorn", latent_dim=24).to_json_file(tmp_path / "config.json")
    args = parse_args(["--model_config", str(tmp_path / "config.json"), "--latent_dim", "40"])
    config = args.model_config_dict
    assert config["codebook_size"] == 128 and config["assignment"] == "sinkhorn" and config["latent_dim"] == 40
    assert args.resolution == config["resolution"] == 256  # the saved model's resolution, not the preset's


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--codebook_size", "0"], "codebook_size must be a positive integer"),
        (["--norm_num_groups", "7"], "norm_num_groups"),
        (["--assignment", "random"], "invalid choice"),
        (["--code_roles", '{"a": [0, 10]}'], "code_roles must add up to codebook_size"),
        (["--random_crop_scale", "0.5", "0.2"], "random_crop_scale"),
        (["--prototypes", "kmeans:zero"], "kmeans:N needs a positive N"),
        (["--prototypes", "text:/no/such/labels.txt"], "does not exist"),
        (["--train_data_dir", "/no/such/folder"], "does not exist"),
        (["--num_grid_images", "0"], "--num_grid_images must be an integer in [1, inf), got 0."),
        (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be an integer in [1, inf), got 0."),
        (["--ema_weights_decay", "1.5"], "--ema_weights_decay must be in (0, 1)"),
        # rFID of one image raised at the first validation, after training, before that step's checkpoint.
        (["--validation_fid", "random", "--num_validation_images", "1"], "--validation_fid needs --num_validation_images"),
        # A second field raised a KeyError from str.format once the teacher was loaded; '{0}' was refused.
        (["--prototype_template", "a {} in {style}"], "must hold one '{}' where the label goes"),
        (["--prototype_template", "a photo"], "must hold one '{}' where the label goes"),
        (["--prototype_template", "a {"], "is not a format string"),
        # Data flags without data: --streaming used to crash inside the loader, the others were ignored.
        (["--streaming", "--max_train_steps", "3"], "--streaming only apply to --train_data_dir or --dataset_name"),
        (["--max_train_samples", "2", "--validation_split", "x"], "--max_train_samples, --validation_split only apply"),
        # Deleting the run before resuming it left nothing to resume (every checkpoint gone).
        (["--overwrite_output_dir", "--resume_from_checkpoint", "latest"], "give one or the other"),
        (["--train_data_dir", "/tmp", "--max_train_samples", "0"], "--max_train_samples must be a positive integer"),
    ],
)
def test_invalid_arguments_exit_with_a_message_naming_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`:UserWarning")  # no optimizer steps here
def test_the_discriminator_schedule_spans_the_steps_it_trains(tmp_path, fresh_accelerator_state):
    from accelerate import Accelerator

    args = parse_args(PLAIN_RUN + ["--disc_weight", "0.1", "--disc_start", "4", "--max_train_steps", "10",
                                   "--lr_scheduler", "linear", "--lr_warmup_steps", "0", "--output_dir", str(tmp_path)])  # fmt: skip
    parts = train_script.build_training_parts(args, tiny_model(), Accelerator(cpu=True), None, None, max_train_steps=10)
    rates = []
    for _ in range(10 - 4):  # the step function steps it once per step from --disc_start on
        rates.append(parts.disc_optimizer.param_groups[0]["lr"])
        parts.disc_scheduler.step()
    assert rates[0] == pytest.approx(args.learning_rate)
    assert rates[-1] == pytest.approx(args.learning_rate / 6)  # its last step at the schedule's last rate
    assert parts.disc_optimizer.param_groups[0]["lr"] == pytest.approx(0.0)


def test_resuming_a_run_without_a_discriminator_with_one_names_the_flag(tmp_path, fresh_accelerator_state):
    # accelerate looked for the second model's file: "pytorch_model_1.bin missing ... damaged or tampered with".
    run = PLAIN_RUN + ["--max_train_steps", "1", "--output_dir", str(tmp_path)]
    main(run)
    (tmp_path / "metrics.json").unlink()  # as if the run were stopped after its checkpoint
    with pytest.raises(ValueError, match=r"without a discriminator \(--disc_weight 0\), and this run trains one"):
        main(run + ["--max_train_steps", "2", "--resume_from_checkpoint", "latest", "--disc_weight", "0.5"])


def test_fp16_with_a_discriminator_is_refused_before_any_work(tmp_path, fresh_accelerator_state):
    # accelerate's one gradient scaler cannot serve the generator's and the discriminator's optimisers.
    with pytest.raises(ValueError, match=r"fp16 cannot train the discriminator .*use bf16"):
        main(PLAIN_RUN + ["--output_dir", str(tmp_path / "run"), "--max_train_steps", "1", "--mixed_precision", "fp16",
                          "--disc_weight", "0.5"])  # fmt: skip
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fp16_where_accelerate_has_no_gradient_scaler_is_refused(tmp_path, fresh_accelerator_state):
    # On the CPU accelerate trained fp16 runs in float32 (no scaler, no autocast) under an fp16 label, and the step's
    # non-finite gradient check, left to the scaler under fp16, was off: an infinite gradient made NaN weights.
    with pytest.raises(ValueError, match=r"mixed precision fp16 .*needs a GPU: on this cpu device accelerate has no gradient scaler"):
        main(PLAIN_RUN + ["--output_dir", str(tmp_path / "run"), "--max_train_steps", "1", "--mixed_precision", "fp16"])
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("scaler", [None, "a scaler"])
def test_a_nonfinite_gradient_norm_skips_the_step_unless_a_gradient_scaler_handles_it(scaler):
    applied = []
    accelerator = types.SimpleNamespace(mixed_precision="fp16", scaler=scaler,
                                        clip_grad_norm_=lambda parameters, norm: torch.tensor(float("inf")))  # fmt: skip
    parts = types.SimpleNamespace(accelerator=accelerator, max_grad_norm=1.0, model=torch.nn.Linear(1, 1),
                                  optimizer=types.SimpleNamespace(step=lambda: applied.append(1)))  # fmt: skip
    skipped = steps_module._apply_gradients(parts, adversarial=False)
    # Without a scaler nothing else would skip it; a scaler skips it itself and must see the step to lower its scale.
    assert (skipped, applied) == (("gradient norm", []) if scaler is None else (None, [1]))


def test_a_tracker_that_is_not_installed_is_refused_before_any_work(tmp_path, monkeypatch, fresh_accelerator_state):
    # accelerate only warned ("no supported trackers are currently installed") and the run trained with no tracker.
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    with pytest.raises(ValueError, match=r"--report_to tensorboard: the tensorboard package is not installed; .*--report_to none"):
        main(PLAIN_RUN + ["--output_dir", str(tmp_path / "run"), "--max_train_steps", "1", "--report_to", "tensorboard"])
    assert not (tmp_path / "run").exists()


def test_logged_losses_are_the_mean_over_processes_and_new_unreadable_images_are_shared(monkeypatch):
    """The log took the main process's loss terms beside usage counted over every process, and its count of
    unreadable images was the main process's until a checkpoint shared them."""
    other_process = {"l1": 0.5, "total": 3.0}
    shared = []

    class TwoProcesses:
        num_processes, device = 2, torch.device("cpu")

        def reduce(self, tensor, reduction):
            assert reduction == "sum"
            return tensor + torch.tensor([*other_process.values(), 0.0])

    state = train_script.RunState(skipped_ids={"a.png"}, unshared_skips=True)
    monkeypatch.setattr(train_script.RunState, "share_skipped_ids", lambda self, accelerator: shared.append(1))
    values = train_script.mean_over_processes(TwoProcesses(), {"l1": 0.25, "total": 1.0}, state)
    assert values == {"l1": 0.375, "total": 2.0} and shared == [1]
    state.unshared_skips = False
    train_script.mean_over_processes(TwoProcesses(), {"l1": 0.25, "total": 1.0}, state)
    assert shared == [1]  # nothing new anywhere: no gather


def test_a_bad_flag_value_is_one_line_without_the_usage_block(capsys):
    # Each of these printed ~95 lines of usage before its one line.
    cases = {
        ("--degradation", "blur:1"): "unknown degradation 'blur' in 'blur:1'",
        ("--code_roles", "notjson"): "argument --code_roles: 'notjson' is not valid JSON",  # was "invalid loads value"
        ("--code_roles", "[1, 2]"): "argument --code_roles: '[1, 2]' is not a JSON object",
        ("--learning_rate", "abc"): "argument --learning_rate: invalid float value: 'abc'",
        # --role_preset was dropped without a word when --code_roles was given too.
        ("--role_preset", "three", "--code_roles", '{"structure": [0, 512], "texture": [512, 1024]}'):
            "--role_preset three and --code_roles both set the code roles; give one of them.",
    }  # fmt: skip
    for flags, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            parse_args(list(flags))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err, err
        assert err.strip().splitlines() == [err.strip()] and "usage:" not in err  # argparse's type errors too


@pytest.mark.parametrize("flags, message", [
    # NaN passed the `< 0` check: every step was skipped and an untrained tokenizer saved, with exit status 0.
    (["--l1_weight", "nan"], "--l1_weight must be a number in [0, inf), got nan."),
    (["--high_frequency_weight", "inf"], "--high_frequency_weight must be a number in [0, inf), got inf."),
    # These trained, then blamed corrupt weights or divergence.
    (["--learning_rate", "inf"], "--learning_rate must be a number in (0, inf), got inf."),
    (["--adam_epsilon", "0"], "--adam_epsilon must be a number in (0, inf), got 0.0."),
    (["--max_grad_norm", "-1"], "--max_grad_norm must be a number in [0, inf), got -1.0."),  # clipping silently off
    (["--disc_base_channels", "1"], "--disc_base_channels must be an integer in [4, inf), got 1."),  # ZeroDivisionError
    (["--disc_num_layers", "0"], "--disc_num_layers must be an integer in [1, inf), got 0."),
    (["--kmeans_init_batches", "-1"], "--kmeans_init_batches must be an integer in [0, inf), got -1."),  # islice()
    (["--lr_warmup_steps", "-3"], "--lr_warmup_steps must be an integer in [0, inf), got -3."),
    (["--lr_scheduler", "bogus"], "argument --lr_scheduler: invalid choice: 'bogus'"),
    (["--resolution", "100000"], "--resolution 100000 is above 8192"),  # a 120 GB allocation in the SSIM check
])  # fmt: skip
def test_flag_values_out_of_range_are_refused_at_start_up(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(flags)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("line, message", [
    ("random_flip: 'no'", "random_flip must be true or false, got 'no'"),  # a true string: flips stayed on
    ("max_train_steps: 2.5", "max_train_steps is not a valid value of --max_train_steps"),  # a TypeError traceback
    ("train_batch_size: true", "train_batch_size is not a valid value of --train_batch_size"),
    ("lr_scheduler: bogus", "lr_scheduler must be one of"),
    ("mixed_precision: no", "YAML reads an unquoted yes/no/on/off as true/false; quote it"),  # "got False"
    ("report_to: [tensorboard]", "report_to takes one value"),  # became the text '["tensorboard"]'
    ("random_crop_scale: 0.8", "random_crop_scale takes a list"),  # a TypeError traceback
    ("random_crop_scale: [0.5]", "random_crop_scale takes 2 values"),
])  # fmt: skip
def test_config_file_values_are_checked_as_their_flags_are(tmp_path, line, message, capsys):
    # argparse converts string defaults only: YAML's numbers and booleans went through unchecked.
    config = tmp_path / "run.yaml"
    config.write_text(line + "\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(config)])
    assert message in capsys.readouterr().err
    config.write_text("max_train_steps: 7\nrandom_crop_scale: [0.5, 1]\ncode_roles: {structure: [0, 32], texture: [32, 64]}\n"
                      "validation_fid: true\nkmeans_init_batches: 0\n")  # fmt: skip
    args = parse_args(["--config", str(config), "--codebook_size", "64"])
    assert args.max_train_steps == 7 and args.random_crop_scale == [0.5, 1.0]
    assert args.validation_fid == "inception" and args.kmeans_init_batches == 0  # YAML's bare flag; 0: the default
    assert args.model_config_dict["code_roles"] == {"structure": [0, 32], "texture": [32, 64]}


def test_a_data_set_saved_with_save_to_disk_trains_and_is_recorded_as_local(tmp_path, fresh_accelerator_state):
    # `load_dataset` refused a saved Dataset, with advice ("use load_from_disk") no flag could follow.
    import datasets

    from cdb_tokenizer.tools.data import sample_photos

    photos = [photo.resize((40, 40)) for photo in sample_photos("skimage")[:6]]
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": photos}, features=features).save_to_disk(str(tmp_path / "saved"))
    output_dir = tmp_path / "run"
    main(PLAIN_RUN + ["--output_dir", str(output_dir), "--max_train_steps", "1", "--dataset_name", str(tmp_path / "saved")])
    config = json.loads((output_dir / "training_config.json").read_text())
    assert config["dataset_is_local"] is True  # so the model card never links it as a Hub data set
    assert json.loads((output_dir / "metrics.json").read_text())["steps"] == 1


def test_a_damaged_lpips_file_leaves_validation_lpips_out_with_a_warning(tmp_path, monkeypatch, caplog, fresh_accelerator_state):
    # A file at the cache path that does not load as VGG's tensors ended the run ("'NoneType' object has no attribute
    # 'to'"), as it ended `cdb-vq eval`: both now go through `cached_lpips`.
    from cdb_tokenizer.tools.losses import lpips_backbone_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    path = Path(lpips_backbone_file("vgg")[0])
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a state dict" * 64)
    args = parse_args(PLAIN_RUN + ["--output_dir", str(tmp_path / "run")])
    from accelerate import Accelerator

    assert train_script.load_lpips_modules(args, Accelerator(cpu=True)) == (None, None)
    assert "Validating without LPIPS: cannot load the LPIPS vgg weights" in caplog.text


def test_unknown_config_file_keys_are_rejected(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rat: 0.01\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(config)])
    assert "learning_rat" in capsys.readouterr().err


def test_training_leaves_the_parsed_arguments_as_they_were(tmp_path):
    """args are read, never rewritten: the epoch-derived step count and skipped images go to training_config.json."""
    args = parse_args(PLAIN_RUN + ["--num_train_epochs", "1", "--validation_steps", "1000", "--checkpointing_steps", "1000",
                                   "--output_dir", str(tmp_path)])  # fmt: skip
    before = dict(vars(args))
    train_script.train(args)
    assert vars(args) == before and args.max_train_steps is None
    recorded = json.loads((tmp_path / "training_config.json").read_text())
    assert recorded["max_train_steps"] > 0 and recorded["skipped_validation_images"] == 0


def test_epochs_round_up_to_whole_steps():
    # One epoch of 3 batches with 8 accumulated per step gave 0 steps: an untrained model, saved without a word.
    sampler = types.SimpleNamespace(batches_per_epoch=3)
    args = types.SimpleNamespace(max_train_steps=None, num_train_epochs=1, gradient_accumulation_steps=8)
    assert train_script.total_train_steps(args, sampler) == 1
    args.num_train_epochs, args.gradient_accumulation_steps = 3, 2
    assert train_script.total_train_steps(args, sampler) == 5  # 9 batches: 4.5 windows, the last one partial


def test_kmeans_initialisation_reads_the_signal_features_with_code_roles(monkeypatch):
    # train.py's k-means init (several batches) must seed each role range from latents of its kind, as the
    # quantizer's own first-forward init does: it passes the batches' signal features on; without roles, none.
    from accelerate import Accelerator

    from cdb_tokenizer.tools.roles import three_role_ranges

    seen = {}
    for roles in (False, True):
        model = tiny_model(code_roles=three_role_ranges(64)) if roles else tiny_model()
        monkeypatch.setattr(model.quantizer, "initialize_codebook",
                            lambda latents, signal_features=None, **kwargs: seen.__setitem__(roles, (latents, signal_features)))  # fmt: skip
        args = argparse.Namespace(resolution=32, train_batch_size=2, kmeans_init_batches=2, kmeans_init_iterations=1, seed=0,
                                  degradation=None)
        batches = iter([{"pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1} for _ in range(2)])
        train_script.initialize_codebook(args, model, batches, Accelerator(cpu=True))
    assert seen[False][1] is None
    latents, signals = seen[True]
    assert signals is not None and signals.shape == (latents.shape[0], 3)


def test_an_error_raised_in_a_loader_worker_is_still_one_line(capsys, monkeypatch):
    # With --dataloader_num_workers > 0 torch re-raises "Caught ValueError in DataLoader worker process 0." with the
    # worker's whole traceback in the message: ~15 lines where the main process prints one.
    from cdb_tokenizer.tools.messages import run_script

    monkeypatch.setattr(sys, "argv", ["/somewhere/training/train.py"])

    def failing_main():
        raise ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                         '  File "data.py", line 320, in __getitem__\nValueError: None of the training images can be read.\n')  # fmt: skip

    with pytest.raises(SystemExit) as exit_info:
        run_script(failing_main, ValueError)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "train.py: error: ValueError: None of the training images can be read.\n"


def test_a_one_line_error_is_one_write(monkeypatch):
    # The processes of a run print their lines at once; `print` wrote the text and the newline apart, and two ranks'
    # errors ran together on one line.
    from cdb_tokenizer.tools.messages import run_script

    writes = []
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(write=writes.append, flush=lambda: None))
    monkeypatch.setattr(sys, "argv", ["train_prior.py", "--tokens_dir", "tokens"])  # named as argparse's errors are

    def failing_main():
        raise ValueError("the data folder is empty")

    with pytest.raises(SystemExit):
        run_script(failing_main, ValueError)
    assert writes == ["train_prior.py: error: the data folder is empty\n"]


def test_cdb_vq_debug_shows_the_traceback_of_a_one_line_error(monkeypatch):
    from cdb_tokenizer.tools.messages import run_script

    def failing_main():
        raise ValueError("a bug that happens to be a ValueError")

    monkeypatch.setenv("CDB_VQ_DEBUG", "1")
    with pytest.raises(ValueError, match="a bug that happens"):  # raised as it is, traceback and all
        run_script(failing_main, ValueError)


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("splits", [{"train": 4, "validation": 10}, {"train": 10}], ids=["validation split", "held out"])
def test_validation_images_are_a_seeded_sample_whatever_the_seed(tmp_path, splits, streaming):
    # They were the first N files, and files come sorted: a class-sorted folder (ImageNet's layout) gave validation
    # images of the first classes only (streamed, they still were). Images held out of the training split depended on
    # --seed: a resume with another seed validated on images it had trained on.
    from accelerate import Accelerator

    from cdb_tokenizer.tools.data import decode_image

    image_folder(tmp_path / "data", splits)  # image i of a split: grey level 20 * i
    validation_split = "validation" if "validation" in splits else "train"

    def chosen(seed: int) -> list[int]:
        args = parse_args(["--train_data_dir", str(tmp_path / "data"), "--num_validation_images", "3", "--resolution",
                           "32", "--seed", str(seed), "--output_dir", str(tmp_path / "run")]
                          + ["--streaming", "--shuffle_buffer_size", "10"] * streaming)  # fmt: skip
        train, pixel_values, _ = train_script.load_data(args, Accelerator(cpu=True))
        shades = sorted(round(float((image.mean() + 1) / 2 * 255) / 20) for image in pixel_values)
        if validation_split == "train":  # held out: none of them is trained on
            trained = [np.asarray(decode_image(item["image"])).mean() / 20 for item in train]
            assert len(trained) == 7 and not set(shades) & {round(shade) for shade in trained}
        return shades

    first = chosen(0)
    assert len(first) == len(set(first)) == 3 and first != [0, 1, 2]  # three different images, not the first three
    assert chosen(1) == first  # the same images whatever --seed: runs of several seeds are scored alike


def test_the_demo_validates_on_the_same_crops_whatever_the_seed(tmp_path):
    from accelerate import Accelerator

    def crops(seed: int) -> torch.Tensor:
        args = parse_args(["--seed", str(seed), "--num_validation_images", "4", "--output_dir", str(tmp_path / "run")])
        return train_script.load_data(args, Accelerator(cpu=True))[1]

    first = crops(0)
    assert first.shape[0] == 4 and not torch.equal(first[0], first[1])
    assert torch.equal(crops(3), first)


@pytest.mark.parametrize("split", ["train", "TRAIN", "train[:10%]"])
def test_the_training_split_is_no_validation_split(split, tmp_path, capsys):
    image_folder(tmp_path / "data", {"train": 4})
    with pytest.raises(SystemExit):
        parse_args(["--train_data_dir", str(tmp_path / "data"), "--validation_split", split, "--output_dir", str(tmp_path / "run")])
    assert "--validation_split train validates on the training images" in capsys.readouterr().err


def test_cached_prototypes_are_rebuilt_when_what_they_came_from_changes(tmp_path, caplog):
    # The cache was keyed by the --prototypes string alone: new labels in the same file, another template or another
    # teacher got the old prototypes (and labels) back, and a damaged cache file was a raw SafetensorError.
    from accelerate import Accelerator

    from cdb_tokenizer.tools.teacher import load_clip_teacher

    clip_config = save_clip_config(tmp_path / "tiny_clip.json")
    teacher = load_clip_teacher(str(clip_config), None)
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("cat\ndog\n")

    def build(*flags):
        args = parse_args(TINY_MODEL + ["--num_prototypes", "2", "--clip_model", str(clip_config), "--clip_pretrained", "none",
                                        "--prototypes", f"text:{labels_file}", "--output_dir", str(tmp_path / "run"), *flags])  # fmt: skip
        caplog.clear()
        with caplog.at_level("INFO"):
            prototypes, labels = train_script.build_prototypes(args, teacher, None, None, Accelerator(cpu=True))
        return prototypes, labels, "Using the prototypes cached" in caplog.text

    first, labels, cached = build()
    assert labels == ["cat", "dog"] and not cached
    assert build()[2]  # the same labels, template and teacher: the cache
    labels_file.write_text("sky\ntree\n")
    second, labels, cached = build()
    assert labels == ["sky", "tree"] and not cached and not torch.equal(first, second)
    third, labels, cached = build("--prototype_template", "{}")
    assert not cached and not torch.equal(second, third)
    (tmp_path / "run" / "prototypes.safetensors").write_bytes(b"\x00" * 7)  # a run killed while writing it
    assert build("--prototype_template", "{}")[1] == ["sky", "tree"]


def test_prototypes_are_left_out_without_a_teacher(tmp_path, caplog):
    # Without a teacher the codes cannot be tied to prototypes: a cached or given file was installed anyway, with
    # arbitrary ties and labels that a published model would show.
    from accelerate import Accelerator

    from cdb_tokenizer.tools.teacher import save_prototypes

    save_prototypes(tmp_path / "given.safetensors", torch.randn(2, 32), ["cat", "dog"])
    args = parse_args(TINY_MODEL + ["--prototypes", str(tmp_path / "given.safetensors"), "--output_dir", str(tmp_path / "run")])
    with caplog.at_level("WARNING"):
        assert train_script.build_prototypes(args, None, None, None, Accelerator(cpu=True)) == (None, None)
    assert "needs the CLIP teacher, which is unavailable" in caplog.text


def test_a_resume_without_the_teacher_it_was_trained_with_is_refused_by_name(tmp_path):
    # Offline, the teacher is unavailable: the resume then built a model without prototypes and with another
    # semantic_dim, and failed deep in loading the weights (or trained on without the semantic terms).
    clip_config = save_clip_config(tmp_path / "tiny_clip.json")
    run = PLAIN_RUN + ["--max_train_steps", "2", "--checkpointing_steps", "1", "--output_dir", str(tmp_path / "run")]
    main(run + ["--clip_model", str(clip_config), "--clip_pretrained", "none", "--prototypes", "kmeans:4",
                "--prototype_kmeans_batches", "1"])  # fmt: skip
    with pytest.raises(ValueError, match=r"other settings \(teacher 'tiny_clip.json \(random weights\)' -> None, "
                                         r"prototypes 'kmeans:4' -> None\).*CLIP teacher"):  # fmt: skip
        main(run + ["--max_train_steps", "3", "--resume_from_checkpoint", "latest"])  # PLAIN_RUN: --clip_model none


def test_a_resume_keeps_its_teacher_weights_and_the_published_prototypes_file_with_the_model(tmp_path):
    # A resume compared teachers by name (base names for files): another tiny.pt passed, distilling one teacher into
    # a model whose prototypes came from another. And a resume may rebuild the prototypes file from other data
    # (kmeans:N over other batches), which then differed from the model's prototypes, and was what got published.
    from cdb_tokenizer.tools.teacher import TINY_CLIP_CONFIG, build_clip_model, load_prototypes

    clip_config = save_clip_config(tmp_path / "tiny_clip.json")
    checkpoints = [tmp_path / name / "tiny.pt" for name in ("a", "b")]
    for seed, path in enumerate(checkpoints):
        path.parent.mkdir()
        torch.manual_seed(seed)
        torch.save(build_clip_model(TINY_CLIP_CONFIG).state_dict(), path)
    output_dir = tmp_path / "run"
    run = PLAIN_RUN + ["--checkpointing_steps", "1", "--output_dir", str(output_dir), "--clip_model", str(clip_config),
                       "--prototypes", "kmeans:4"]  # fmt: skip
    main(run + ["--max_train_steps", "1", "--clip_pretrained", str(checkpoints[0]), "--prototype_kmeans_batches", "1"])
    with pytest.raises(ValueError, match=r"other settings \(teacher_weights '\w+' -> '\w+'\)"):
        main(run + ["--max_train_steps", "2", "--clip_pretrained", str(checkpoints[1]), "--prototype_kmeans_batches",
                    "1", "--resume_from_checkpoint", "latest"])  # fmt: skip

    main(run + ["--max_train_steps", "2", "--clip_pretrained", str(checkpoints[0]), "--prototype_kmeans_batches", "2",
                "--resume_from_checkpoint", "latest"])  # fmt: skip
    model = train_script.CDBVQModel.from_pretrained(output_dir)
    assert torch.equal(load_prototypes(output_dir / "prototypes.safetensors")[0], model.quantizer.prototypes)
    # What the teacher and the prototypes decided, not the flags' --semantic_dim 32 / --num_prototypes 8.
    recorded = json.loads((output_dir / "training_config.json").read_text())
    assert (recorded["num_prototypes"], recorded["model_config_dict"]["num_prototypes"]) == (4, 4)


def test_a_resume_with_edited_prototype_labels_is_refused(tmp_path):
    # The resume restored the checkpoint's prototype embeddings but took the labels from the edited file: each label
    # then named another label's embedding, in the saved config and the model card.
    clip_config = save_clip_config(tmp_path / "tiny_clip.json")
    labels = tmp_path / "labels.txt"
    labels.write_text("sky\ntree\ncat\ndog\n")
    run = PLAIN_RUN + ["--checkpointing_steps", "1", "--output_dir", str(tmp_path / "run"), "--clip_model",
                       str(clip_config), "--clip_pretrained", "none", "--num_prototypes", "4"]  # fmt: skip
    main(run + ["--max_train_steps", "1", "--prototypes", f"text:{labels}"])
    moved = tmp_path / "moved.txt"
    moved.write_text(labels.read_text())  # the same labels from another place resume
    main(run + ["--max_train_steps", "2", "--prototypes", f"text:{moved}", "--resume_from_checkpoint", "latest"])
    moved.write_text("tree\nsky\ncat\ndog\n")
    with pytest.raises(ValueError, match=r"other settings \(prototypes 'text labels and template \w+' -> 'text labels"):
        main(run + ["--max_train_steps", "3", "--prototypes", f"text:{moved}", "--resume_from_checkpoint", "latest"])


def test_a_resumed_run_counts_on_its_nan_steps_in_a_row(tmp_path, monkeypatch):
    # The count of non-finite steps in a row started again at 0 on resume: a resumed run tolerated more of them.
    run = PLAIN_RUN + ["--output_dir", str(tmp_path / "run"), "--checkpointing_steps", "1", "--max_nonfinite_steps", "2"]
    monkeypatch.setattr(steps_module, "compute_losses", _nan_at({1}))  # step 2, the last before the checkpoint
    main(run + ["--max_train_steps", "2"])
    monkeypatch.setattr(steps_module, "compute_losses", _nan_at({2}))  # the resumed run's first step, step 3
    with pytest.raises(TrainingStopped, match=r"2 steps in a row"):
        main(run + ["--max_train_steps", "4", "--resume_from_checkpoint", "latest"])
