"""No run loses its last good state (issue 11): atomic checkpoints, `latest` skips incomplete ones, output folders
holding another run are refused, a finished run is not rewritten, and the log does not repeat steps."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cdb_tokenizer import CDBVQModel
from cdb_tokenizer.tools.checkpoints import MANIFEST, CheckpointError, complete_checkpoints
from conftest import SEVERAL_PROCESSES, refit_manifest
from training.train import OutputDirInUse, main, parse_args


TINY = ["--resolution", "32", "--base_channels", "16", "--channel_multipliers", "1", "2", "2", "--num_res_blocks", "1", "--norm_num_groups", "8", "--latent_dim", "16", "--codebook_size", "64", "--codebook_dim", "8", "--semantic_dim", "32", "--num_prototypes", "8", "--router_dim", "8", "--model_preset", "tiny", "--train_batch_size", "2", "--num_validation_images", "2", "--clip_model", "none", "--lpips_weight", "0", "--disc_weight", "0"]  # fmt: skip
RUN = TINY + ["--report_to", "none", "--max_train_steps", "4", "--checkpointing_steps", "1", "--use_ema"]

# The child process stalls while it writes checkpoint-3 (after accelerate has written the weights and optimiser
# states into checkpoint-3.tmp), so that the parent can kill -9 it in the middle of the write.
STALL_AT_STEP_3 = """
import sys, time
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
import cdb_tokenizer.tools.checkpoints as checkpoints
real = checkpoints.save_file
def save_file(tensors, path, *args, **kwargs):
    if "checkpoint-3.tmp" in str(path):
        time.sleep(120)
    return real(tensors, path, *args, **kwargs)
checkpoints.save_file = save_file
from training.train import main
main({argv!r})
"""


def steps_logged(output_dir: Path) -> list[int]:
    lines = (output_dir / "logs" / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "loss/total" in line]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted run: 4 steps, a checkpoint after each."""
    output_dir = tmp_path_factory.mktemp("straight") / "run"
    main(RUN + ["--output_dir", str(output_dir)])
    return output_dir


def test_checkpoints_are_complete_with_a_manifest_and_hold_no_pickled_custom_state(straight):
    folders = sorted(p.name for p in (straight / "checkpoints").iterdir())
    assert folders == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]  # --checkpoints_total_limit 3
    checkpoint = straight / "checkpoints" / "checkpoint-4"
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    assert manifest["step"] == 4
    assert {name: (checkpoint / name).stat().st_size for name in manifest["files"]} == manifest["files"]
    assert "training_state.safetensors" in manifest["files"] and "training_state.json" in manifest["files"]
    assert not list(checkpoint.glob("custom_checkpoint_*"))
    ema = load_file(checkpoint / "training_state.safetensors")
    assert "ema/decoder.conv_in.weight" in ema and "ema/quantizer.router.code_keys" in ema
    assert json.loads((checkpoint / "training_state.json").read_text())["ema_weights_decay"] == 0.999


@SEVERAL_PROCESSES
def test_kill_9_while_a_checkpoint_is_written_then_resume_ends_with_the_uninterrupted_weights(straight, tmp_path, caplog):
    """Two runs (--checkpoints_total_limit 3 and 1) are killed with SIGKILL in the middle of writing checkpoint-3."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    runs = {limit: RUN + ["--output_dir", str(tmp_path / f"run-{limit}"), "--checkpoints_total_limit", limit] for limit in ("3", "1")}
    children = {
        limit: subprocess.Popen([sys.executable, "-c", STALL_AT_STEP_3.format(repo=str(REPO), argv=argv)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for limit, argv in runs.items()
    }  # fmt: skip
    try:
        deadline = time.monotonic() + 150
        waiting = dict(children)
        while waiting:
            for limit, child in list(waiting.items()):
                if (tmp_path / f"run-{limit}" / "checkpoints" / "checkpoint-3.tmp" / "model.safetensors").is_file():
                    os.kill(child.pid, signal.SIGKILL)
                    child.wait(timeout=30)
                    del waiting[limit]
                else:
                    assert child.poll() is None, "the training process ended before writing checkpoint-3"
            assert time.monotonic() < deadline, "checkpoint-3.tmp never appeared"
            time.sleep(0.05)
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait(timeout=30)
    expected = load_file(straight / "model.safetensors")
    for limit, argv in runs.items():
        output_dir = tmp_path / f"run-{limit}"
        assert children[limit].returncode == -signal.SIGKILL
        # The previous checkpoint survived (rotation waits for a complete new one); the interrupted one is incomplete.
        complete, incomplete = complete_checkpoints(output_dir)
        assert [p.name for p in complete] == (["checkpoint-2"] if limit == "1" else ["checkpoint-1", "checkpoint-2"])
        assert [p.name for p, _ in incomplete] == ["checkpoint-3.tmp"]

        caplog.clear()
        main(argv + ["--resume_from_checkpoint", "latest"])
        assert "Skipping the incomplete checkpoint" in caplog.text and "checkpoint-3.tmp" in caplog.text
        assert "checkpoint-2 (step 2)" in caplog.text
        final = load_file(output_dir / "model.safetensors")
        assert final.keys() == expected.keys() and all(torch.equal(final[key], expected[key]) for key in final)
        assert steps_logged(output_dir) == [1, 2, 3, 4]  # steps after the checkpoint are not logged twice
        assert not (output_dir / "checkpoints" / "checkpoint-3.tmp").exists()
        assert len(complete_checkpoints(output_dir)[0]) == int(limit)


def test_latest_skips_a_damaged_checkpoint_and_a_named_one_is_refused(straight, tmp_path, caplog):
    import shutil

    output_dir = tmp_path / "run"
    shutil.copytree(straight, output_dir)
    (output_dir / "model.safetensors").unlink()
    for name in ("checkpoint-3", "checkpoint-4"):
        shutil.rmtree(output_dir / "checkpoints" / name)
    damaged = output_dir / "checkpoints" / "checkpoint-2"
    (damaged / "training_state.safetensors").write_bytes(b"garbage")  # another size than the manifest says
    with pytest.raises(CheckpointError, match=r"not a complete checkpoint: training_state.safetensors has 7 bytes"):
        main(RUN + ["--output_dir", str(output_dir), "--resume_from_checkpoint", str(damaged)])
    # Same size, wrong content: refused with a clear error too (by its digest).
    size = (straight / "checkpoints" / "checkpoint-2" / "training_state.safetensors").stat().st_size
    (damaged / "training_state.safetensors").write_bytes(b"\xff" * size)
    with pytest.raises(CheckpointError, match="training_state.safetensors is not the file that was written"):
        main(RUN + ["--output_dir", str(output_dir), "--resume_from_checkpoint", "latest"])
    # Only incomplete checkpoints left: latest stops instead of silently training from scratch.
    (damaged / "training_state.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"no complete checkpoint, only incomplete ones \(checkpoint-2: "):
        main(RUN + ["--output_dir", str(output_dir), "--resume_from_checkpoint", "latest"])


def test_a_checkpoint_changed_after_it_was_written_is_refused(straight, tmp_path, caplog):
    # The manifest checked sizes only: a dtype flipped in a safetensors header (same size) resumed into a decoder
    # bias of 1e9, and one more random_states_1.pkl halved the learning-rate schedule's position, without a word.
    import shutil

    output_dir = tmp_path / "run"
    shutil.copytree(straight, output_dir)
    (output_dir / "model.safetensors").unlink()
    checkpoint = output_dir / "checkpoints" / "checkpoint-4"
    weights = checkpoint / "model.safetensors"
    header = weights.read_bytes()
    weights.write_bytes(header.replace(b'"F32"', b'"I32"', 1))  # the same size
    with pytest.raises(CheckpointError, match="model.safetensors is not the file that was written"):
        main(RUN + ["--output_dir", str(output_dir), "--resume_from_checkpoint", str(checkpoint)])
    weights.write_bytes(header)
    shutil.copy(checkpoint / "random_states_0.pkl", checkpoint / "random_states_1.pkl")
    with pytest.raises(CheckpointError, match=r"holds files its manifest does not list \(random_states_1.pkl\)"):
        main(RUN + ["--output_dir", str(output_dir), "--resume_from_checkpoint", str(checkpoint)])
    # `latest` skips it, as it skips an incomplete one, and resumes from the one before (a requeue goes on).
    caplog.clear()
    main(RUN + ["--output_dir", str(output_dir), "--resume_from_checkpoint", "latest"])
    assert f"Skipping the checkpoint {checkpoint}" in caplog.text and "checkpoint-3 (step 3)" in caplog.text
    final, expected = load_file(output_dir / "model.safetensors"), load_file(straight / "model.safetensors")
    assert all(torch.equal(final[key], expected[key]) for key in expected)


def test_a_checkpoint_named_by_its_name_is_found_in_the_output_folder(straight, tmp_path, monkeypatch, caplog, capsys):
    # diffusers' convention (`--resume_from_checkpoint checkpoint-800`, as docs/training.md shows) was refused from
    # any other working folder: "is not a checkpoint folder".
    import shutil

    output_dir = tmp_path / "run"
    shutil.copytree(straight, output_dir)
    monkeypatch.chdir(tmp_path)
    main(RUN + ["--output_dir", str(output_dir), "--resume_from_checkpoint", "checkpoint-3"])
    assert "checkpoint-3 (step 3)" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"'checkpoint-9' is not a checkpoint folder \(nor one of .*checkpoints\)"):
        main(RUN + ["--output_dir", str(output_dir), "--resume_from_checkpoint", "checkpoint-9"])
    # With --overwrite_output_dir the name passed the guard, and the run deleted the checkpoint it was to resume.
    with pytest.raises(SystemExit):
        main(RUN + ["--output_dir", str(output_dir), "--resume_from_checkpoint", "checkpoint-3", "--overwrite_output_dir"])
    assert "--overwrite_output_dir deletes the checkpoints --resume_from_checkpoint would continue from" in capsys.readouterr().err
    assert (output_dir / "checkpoints" / "checkpoint-3").is_dir()


def test_latest_with_only_unfinished_writes_starts_over(tmp_path, caplog):
    # A kill during the first checkpoint's write jammed every later `latest` (a requeue): no checkpoint was ever
    # complete, so there is nothing to lose by starting over.
    output_dir = tmp_path / "run"
    (output_dir / "checkpoints" / "checkpoint-1.tmp").mkdir(parents=True)
    (output_dir / "checkpoints" / "checkpoint-1.tmp" / "model.safetensors").write_bytes(b"half")
    main(RUN + ["--output_dir", str(output_dir), "--resume_from_checkpoint", "latest"])
    assert "Skipping the incomplete checkpoint" in caplog.text and "starting a new run" in caplog.text
    assert steps_logged(output_dir) == [1, 2, 3, 4] and (output_dir / "model.safetensors").is_file()
    assert not (output_dir / "checkpoints" / "checkpoint-1.tmp").exists()  # replaced by the complete one


def test_a_full_disk_at_the_final_save_is_one_line_and_a_resume_saves_the_model(straight, tmp_path, monkeypatch, caplog):
    # safetensors' "I/O error: No space left on device" is no OSError: a full traceback, after a bare "[Errno 28]".
    import shutil

    from safetensors import SafetensorError

    from training.train import ModelSaveError

    output_dir = tmp_path / "run"
    shutil.copytree(straight, output_dir)
    for name in ("model.safetensors", "metrics.json"):
        (output_dir / name).unlink()

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with monkeypatch.context() as patch:
        patch.setattr(CDBVQModel, "save_pretrained", full_disk)
        with pytest.raises(ModelSaveError, match=r"could not save the model to .*run \(.*No space left on device.*MiB "
                                                 r"free on its disk\); the checkpoint of step 4 is complete: make room, "
                                                 r"then --resume_from_checkpoint latest saves the model"):  # fmt: skip
            main(RUN + ["--output_dir", str(output_dir), "--resume_from_checkpoint", "latest"])
    caplog.clear()
    main(RUN + ["--output_dir", str(output_dir), "--resume_from_checkpoint", "latest"])
    expected, saved = load_file(straight / "model.safetensors"), load_file(output_dir / "model.safetensors")
    assert all(torch.equal(saved[key], expected[key]) for key in expected)
    # No step was trained: no speed (it was 0.0002 s/step, the time of nothing divided by one).
    assert json.loads((output_dir / "metrics.json").read_text())["seconds_per_step"] is None
    assert "no step trained in this run" in caplog.text


def test_resuming_a_weight_ema_without_use_ema_says_it_is_dropped(straight, tmp_path, caplog):
    # The saved model silently became the raw weights (10.46 instead of 10.73 dB in the crash review).
    import shutil

    output_dir = tmp_path / "run"
    shutil.copytree(straight, output_dir)
    (output_dir / "model.safetensors").unlink()
    shutil.rmtree(output_dir / "checkpoints" / "checkpoint-4")
    main([flag for flag in RUN if flag != "--use_ema"] + ["--output_dir", str(output_dir), "--resume_from_checkpoint", "latest"])
    assert "The checkpoint holds a weight EMA (it was written with --use_ema), which this run without --use_ema drops" in caplog.text


def test_an_output_folder_holding_another_run_is_refused_and_overwrite_starts_over(straight, tmp_path, capsys):
    import shutil

    output_dir = tmp_path / "run"
    shutil.copytree(straight, output_dir)
    model_before = (output_dir / "model.safetensors").read_bytes()
    other_run = TINY + ["--report_to", "none", "--max_train_steps", "1", "--codebook_size", "32", "--output_dir", str(output_dir)]
    with pytest.raises(OutputDirInUse, match=r"holds another run .*--resume_from_checkpoint latest.*--overwrite_output_dir"):
        main(other_run)
    # Another folder's checkpoint passed: it set this run's later checkpoints aside and overwrote its model.
    foreign = str(straight / "checkpoints" / "checkpoint-2")
    with pytest.raises(OutputDirInUse, match=r"holds another run .*checkpoint-2 is a checkpoint of another folder"):
        main(other_run + ["--resume_from_checkpoint", foreign])
    # The folder itself, or a typo, is no checkpoint: said before --overwrite_output_dir deletes the run for it.
    with pytest.raises(CheckpointError, match="is a run's folder, not a checkpoint: pass one of its checkpoints/"):
        main(other_run + ["--resume_from_checkpoint", str(output_dir), "--overwrite_output_dir"])
    with pytest.raises(FileNotFoundError, match="is not a checkpoint folder"):
        main(other_run + ["--resume_from_checkpoint", str(tmp_path / "checkpoint-9"), "--overwrite_output_dir"])
    assert (output_dir / "model.safetensors").read_bytes() == model_before
    assert len(complete_checkpoints(output_dir)[0]) == 3

    # From the command line: one line, no traceback.
    import runpy

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["train.py", *other_run])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(REPO / "training" / "train.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err and "holds another run" in err.strip().splitlines()[-1]

    main(other_run + ["--overwrite_output_dir"])
    assert [p.name for p in (output_dir / "checkpoints").iterdir()] == ["checkpoint-1"]
    assert steps_logged(output_dir) == [1]
    assert json.loads((output_dir / "config.json").read_text())["codebook_size"] == 32


HOLD_OUTPUT_DIR = """
import sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from cdb_tokenizer.tools.files import claim_output_dir
assert claim_output_dir(Path({output_dir!r})) is None
print("held", flush=True)
time.sleep(120)
"""


def test_a_folder_another_process_trains_in_is_refused_even_with_overwrite(straight, tmp_path):
    """Two runs in one --output_dir (a second launch, or two benchmark runs sharing a folder) would interleave their
    checkpoints, and --overwrite_output_dir would delete the other's last good one while it trains."""
    import shutil

    output_dir = tmp_path / "run"
    shutil.copytree(straight, output_dir)
    checkpoints_before = sorted(p.name for p in (output_dir / "checkpoints").iterdir())
    holder = subprocess.Popen([sys.executable, "-c", HOLD_OUTPUT_DIR.format(repo=str(REPO), output_dir=str(output_dir))],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        other_run = TINY + ["--report_to", "none", "--max_train_steps", "1", "--output_dir", str(output_dir)]
        with pytest.raises(OutputDirInUse, match=r"Another run is writing to --output_dir .*run now .*choose another"):
            main(other_run + ["--overwrite_output_dir"])
        assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == checkpoints_before
        with pytest.raises(OutputDirInUse, match="Another run is writing"):
            main(other_run + ["--resume_from_checkpoint", "latest"])
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone (killed: the OS dropped its lock), so the folder is free again.
    main(other_run + ["--overwrite_output_dir"])
    assert [p.name for p in (output_dir / "checkpoints").iterdir()] == ["checkpoint-1"]


def claimed_by_another_process(output_dir: Path) -> bool:
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); from pathlib import Path; from cdb_tokenizer.tools.files import claim_output_dir; print(claim_output_dir(Path({str(output_dir)!r})))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "None"


def test_a_run_releases_its_folder_when_it_ends_or_is_refused(straight, tmp_path):
    """In a notebook or a test session the process lives on after a run: its folder must not stay locked, neither
    after the run nor after a refusal (which used to tell every later run that another one was writing there)."""
    import shutil

    output_dir = tmp_path / "run"
    shutil.copytree(straight, output_dir)
    with pytest.raises(OutputDirInUse, match="holds another run"):
        main(TINY + ["--report_to", "none", "--max_train_steps", "1", "--output_dir", str(output_dir)])
    assert claimed_by_another_process(output_dir)
    main(TINY + ["--report_to", "none", "--max_train_steps", "1", "--output_dir", str(output_dir), "--overwrite_output_dir"])
    assert claimed_by_another_process(output_dir)


def test_a_failed_run_leaves_no_folder_holding_only_its_lock(tmp_path, monkeypatch):
    # A run refused after claiming --output_dir (here: no images) left the folders it made, holding its lock file.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("not an image")
    flags = TINY + ["--report_to", "none", "--train_data_dir", str(tmp_path / "data")]
    with pytest.raises(FileNotFoundError, match="found no images"):
        main(flags + ["--output_dir", str(tmp_path / "new" / "run")])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data"]
    (tmp_path / "mine").mkdir()  # a folder the run did not make stays, as it was (its lock file was left in it)
    with pytest.raises(FileNotFoundError, match="found no images"):
        main(flags + ["--output_dir", str(tmp_path / "mine")])
    assert (tmp_path / "mine").is_dir() and list((tmp_path / "mine").iterdir()) == []
    assert claimed_by_another_process(tmp_path / "mine")  # released: another process can claim it
    # Relative, through `..` and a folder that does not exist: only what the run made goes (the user's empty keep/
    # went, and a ghost/ the run had made stayed).
    (tmp_path / "keep").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="found no images"):
        main(flags + ["--output_dir", "ghost/../keep/new/run"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data", "keep", "mine"]
    assert list((tmp_path / "keep").iterdir()) == []


def test_a_folder_that_cannot_be_locked_is_trained_in_with_a_warning(tmp_path, monkeypatch, caplog):
    # A lock file another user left in a shared folder (PermissionError), or a file system without locks.
    import filelock

    from cdb_tokenizer.tools import files

    for error in (PermissionError(13, "Permission denied"), NotImplementedError("FileSystem does not appear to support flock")):
        def acquire(self, *args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(filelock.FileLock, "acquire", acquire)
        folder = tmp_path / type(error).__name__
        folder.mkdir()
        with caplog.at_level("WARNING"):
            assert files.claim_output_dir(folder) is None
        assert f"Could not lock --output_dir {folder}" in caplog.text and "would not be refused" in caplog.text
        caplog.clear()


def test_a_resume_with_nothing_left_to_train_says_so_and_leaves_the_model(straight, tmp_path, caplog):
    import shutil

    output_dir = tmp_path / "run"
    shutil.copytree(straight, output_dir)
    stamp = (output_dir / "model.safetensors").stat().st_mtime_ns
    metrics = main(RUN + ["--output_dir", str(output_dir), "--resume_from_checkpoint", "latest"])
    assert "Nothing left to train" in caplog.text
    assert (output_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert metrics == json.loads((straight / "metrics.json").read_text())

    # Resuming an earlier checkpoint with nothing left to train abandons nothing: the later checkpoints (the ones the
    # saved model came from) stay as they are, and `latest` still names the last one.
    before = sorted(path.name for path in (output_dir / "checkpoints").iterdir())
    main(RUN + ["--max_train_steps", "2", "--output_dir", str(output_dir),
                "--resume_from_checkpoint", str(output_dir / "checkpoints" / "checkpoint-2")])  # fmt: skip
    assert sorted(path.name for path in (output_dir / "checkpoints").iterdir()) == before
    assert (output_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_run_whose_validation_would_fail_is_refused_at_start_up(capsys):
    with pytest.raises(SystemExit):
        parse_args(TINY[2:] + ["--resolution", "4"])
    assert "--resolution 4x4 is too small for validation" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(TINY[2:] + ["--resolution", "34"])
    assert re.search(r"34.*(multiple|divisible)", capsys.readouterr().err)
    parse_args(TINY)  # the tiny test config itself is fine


def test_secrets_never_reach_the_training_config_or_the_trackers(tmp_path, caplog):
    secret = "hf_" + "S" * 34
    output_dir = tmp_path / "run"
    main(TINY + ["--report_to", "tensorboard", "--max_train_steps", "1", "--output_dir", str(output_dir), "--hub_token", secret])
    written = b"".join(p.read_bytes() for p in output_dir.rglob("*") if p.is_file())
    assert secret.encode() not in written
    assert json.loads((output_dir / "training_config.json").read_text()).get("hub_token") is None
    assert "--hub_token shows in the process list" in caplog.text


def test_a_resumed_run_logs_each_step_once_in_tensorboard(tmp_path):
    # The steps a resumed run trains again kept the interrupted run's points beside the new ones in TensorBoard.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir = tmp_path / "run"
    flags = TINY + ["--report_to", "tensorboard", "--max_train_steps", "4", "--checkpointing_steps", "2",
                    "--output_dir", str(output_dir)]  # fmt: skip
    main(flags)
    main(flags + ["--resume_from_checkpoint", str(output_dir / "checkpoints" / "checkpoint-2")])
    events = EventAccumulator(str(output_dir / "logs" / "cdb-vq"))
    events.Reload()
    tags = [tag for tag in events.Tags()["scalars"] if tag.startswith("train")]
    assert tags, events.Tags()["scalars"]
    for tag in tags:
        assert [event.step for event in events.Scalars(tag)] == [1, 2, 3, 4], tag


def test_the_hub_token_leaves_the_command_line_that_trackers_copy(monkeypatch):
    from training.train import parse_args as parse_training_args

    secret = "hf_" + "T" * 34
    for spelling in (["--hub_token", secret], ["--hub_token=" + secret], ["--hub_tok", secret], ["--hub_tok=" + secret]):
        monkeypatch.setattr(sys, "argv", ["train.py", *TINY, *spelling])  # argparse takes a prefix too
        assert parse_training_args().hub_token == secret  # parsed first, then blanked where W&B would read it
        assert secret not in " ".join(sys.argv) and "[redacted]" in sys.argv[-1], spelling


def test_wandb_is_started_without_its_own_metadata_code_git_or_console_capture(monkeypatch):
    # W&B uploads the command line, host, user, paths, git remote and console by itself; each setting the
    # installed wandb knows is switched off (the fake stands for a wandb that lacks one of them).
    from types import ModuleType

    from cdb_tokenizer.tools.runs import WANDB_PRIVATE_SETTINGS, tracker_init_kwargs

    class Settings:
        model_fields = {key: None for key in WANDB_PRIVATE_SETTINGS if key != "disable_code"}

        def __init__(self, **values):
            self.values = values

    wandb = ModuleType("wandb")
    wandb.Settings = Settings
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    assert tracker_init_kwargs("tensorboard") == {}
    for report_to in ("wandb", "all"):
        settings = tracker_init_kwargs(report_to)["wandb"]["settings"].values
        assert settings == {key: value for key, value in WANDB_PRIVATE_SETTINGS.items() if key != "disable_code"}
        assert settings["x_disable_meta"] is True and settings["console"] == "off"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # the test writes a protocol-4 pickle
def test_a_random_state_file_that_cannot_be_read_safely_is_refused_not_skipped(straight, tmp_path):
    # accelerate skips a random-state file it cannot read (info-level log): the resume would silently stop being exact.
    import pickle
    import shutil

    output_dir = tmp_path / "run"
    shutil.copytree(straight, output_dir)
    checkpoint = output_dir / "checkpoints" / "checkpoint-2"
    states = checkpoint / "random_states_0.pkl"
    states.write_bytes(pickle.dumps({"random_state": Path("not-a-state")}))  # not tensors or arrays
    refit_manifest(checkpoint)
    with pytest.raises(CheckpointError, match=r"random_states_0.pkl cannot be read safely .*damaged or tampered"):
        main(RUN + ["--output_dir", str(output_dir), "--resume_from_checkpoint", str(checkpoint)])


@pytest.mark.parametrize("variable, kind", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_resuming_where_accelerate_would_unpickle_the_checkpoint_is_refused(monkeypatch, variable, kind):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from cdb_tokenizer.tools.checkpoints import refuse_pickled_states

    refuse_pickled_states(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))  # DDP reads weights only
    monkeypatch.setenv(variable, "true")
    with pytest.raises(CheckpointError, match=f"resuming under {kind} is not supported: .* read with pickle"):
        refuse_pickled_states(SimpleNamespace(distributed_type=DistributedType.NO))
    monkeypatch.delenv(variable)
    with pytest.raises(CheckpointError, match=f"resuming under {kind}"):
        refuse_pickled_states(SimpleNamespace(distributed_type=getattr(DistributedType, variable.split("_")[-1])))


def test_a_run_killed_after_its_final_checkpoint_saves_its_model_on_resume(straight, tmp_path, caplog):
    """Killed between the final checkpoint and the end of saving (no metrics.json, or an earlier run's), the resume
    said "nothing left to train" and the run never had a model; it now validates and saves the checkpoint's."""
    import shutil

    expected = load_file(straight / "model.safetensors")
    for case in ("no metrics", "an earlier run's metrics"):
        output_dir = tmp_path / case.replace(" ", "_")
        shutil.copytree(straight, output_dir)
        (output_dir / "model.safetensors").unlink()
        if case == "no metrics":
            (output_dir / "metrics.json").unlink()
        else:
            (output_dir / "metrics.json").write_text(json.dumps({"steps": 2, "psnr": 1.0}))
        caplog.clear()
        metrics = main(RUN + ["--output_dir", str(output_dir), "--resume_from_checkpoint", "latest"])
        assert "Nothing left to train" not in caplog.text and "before its model was saved" in caplog.text
        assert metrics["steps"] == 4 and json.loads((output_dir / "metrics.json").read_text())["steps"] == 4
        saved = load_file(output_dir / "model.safetensors")
        assert saved.keys() == expected.keys() and all(torch.equal(saved[key], expected[key]) for key in saved)


def test_a_refused_resume_sets_no_checkpoint_aside(tmp_path):
    # The later checkpoints were renamed abandoned-* before the EMA check refused the resume: `latest` then led back
    # to the earlier step.
    output_dir = tmp_path / "run"
    plain = [argument for argument in RUN if argument != "--use_ema"]
    main(plain + ["--output_dir", str(output_dir)])
    before = sorted(path.name for path in (output_dir / "checkpoints").iterdir())
    with pytest.raises(CheckpointError, match="has no EMA weight"):
        main(RUN + ["--max_train_steps", "6", "--output_dir", str(output_dir),
                    "--resume_from_checkpoint", str(output_dir / "checkpoints" / "checkpoint-2")])  # fmt: skip
    assert sorted(path.name for path in (output_dir / "checkpoints").iterdir()) == before


def test_a_resume_with_other_accumulation_steps_starts_whole_windows(straight, tmp_path, monkeypatch):
    """accelerate restored its micro-batch count: resumed with --gradient_accumulation_steps 3 from a run with 1, the
    first window ended after 1 micro-batch."""
    import shutil

    import cdb_tokenizer.tools.steps as steps

    output_dir = tmp_path / "run"
    shutil.copytree(straight, output_dir)
    calls, windows = [], []
    real_step, real_apply = steps.training_step, steps._apply_gradients

    def counted_step(*args, **kwargs):
        calls.append(1)
        return real_step(*args, **kwargs)

    def apply_gradients(*args, **kwargs):
        windows.append(len(calls) - sum(windows))
        return real_apply(*args, **kwargs)

    monkeypatch.setattr(steps, "_apply_gradients", apply_gradients)
    monkeypatch.setattr("training.train.training_step", counted_step)
    main(RUN + ["--output_dir", str(output_dir), "--max_train_steps", "4", "--gradient_accumulation_steps", "3",
                "--resume_from_checkpoint", str(output_dir / "checkpoints" / "checkpoint-2")])  # fmt: skip
    assert windows == [3, 3]


def test_a_schedule_resumed_on_another_number_of_processes_goes_on_from_its_step():
    """accelerate steps a scheduler once per process per step: saved by 2 processes at step 4 and resumed by 1, the
    cosine schedule went on from step 8 (past its end, rising again)."""
    import types

    from transformers import get_scheduler

    from cdb_tokenizer.tools.checkpoints import reposition_schedules

    def schedule(processes: int):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=2 * processes, num_training_steps=8 * processes)
        return optimizer, scheduler

    for saved, now in ((2, 1), (1, 2), (2, 2)):
        optimizer, scheduler = schedule(saved)
        for _ in range(4 * saved):  # four steps, each stepping the schedule once per process
            optimizer.step()
            scheduler.step()
        resumed_optimizer, resumed = schedule(now)
        resumed_optimizer.load_state_dict(optimizer.state_dict())
        resumed.load_state_dict(scheduler.state_dict())
        reposition_schedules([("model", resumed_optimizer, types.SimpleNamespace(scheduler=resumed))], saved, now)
        reference_optimizer, reference = schedule(now)
        for _ in range(4 * now):  # an uninterrupted run on `now` processes
            reference_optimizer.step()
            reference.step()
        assert resumed.last_epoch == reference.last_epoch == 4 * now
        assert resumed.get_last_lr() == reference.get_last_lr() == [group["lr"] for group in resumed_optimizer.param_groups]


def test_a_resume_of_another_shape_or_a_tampered_state_is_one_line_naming_it(straight, tmp_path):
    import shutil

    output_dir = tmp_path / "run"
    shutil.copytree(straight, output_dir)
    # torch's first line is only a heading ("Error(s) in loading state_dict for CDBVQModel:"): the tensor is named.
    with pytest.raises(CheckpointError, match=r"CDBVQModel: size mismatch for quant_conv\.weight: .*torch.Size\(\[4, 16, 1, 1\]\)\. The checkpoint"):
        main(RUN + ["--output_dir", str(output_dir), "--max_train_steps", "6", "--codebook_dim", "4",
                    "--resume_from_checkpoint", "latest"])  # fmt: skip
    # A training_state.json whose settings are not objects (it is JSON, so editable) was a TypeError traceback.
    checkpoint = output_dir / "checkpoints" / "checkpoint-4"
    state = json.loads((checkpoint / "training_state.json").read_text())
    text = json.dumps({**state, "objective": "x" * len(json.dumps(state["objective"]))}, indent=2) + "\n"
    size = (checkpoint / "training_state.json").stat().st_size  # kept, so that only the digest tells the edit
    (checkpoint / "training_state.json").write_text(text[:size] + " " * (size - len(text[:size])))
    with pytest.raises(CheckpointError, match="training_state.json is not the file that was written"):
        main(RUN + ["--output_dir", str(output_dir), "--max_train_steps", "6", "--resume_from_checkpoint", str(checkpoint)])
    refit_manifest(checkpoint)  # as someone who edits the file would: the state's own check is then what stops it
    with pytest.raises(CheckpointError, match="'objective' is not a JSON object"):
        main(RUN + ["--output_dir", str(output_dir), "--max_train_steps", "6", "--resume_from_checkpoint", "latest"])


@pytest.mark.parametrize(
    "field, value", [("skipped_image_ids", [[1]]), ("skipped_image_ids", 5), ("nonfinite_steps", "x"), ("nonfinite_in_a_row", -5)]
)
def test_a_tampered_count_in_the_training_state_is_one_line_naming_it(straight, tmp_path, field, value):
    # [[1]] and 5 were tracebacks (unhashable list, int not iterable), "x" a bare "invalid literal for int()", and
    # a negative count was taken as it was.
    import shutil

    output_dir = tmp_path / "run"
    shutil.copytree(straight, output_dir)
    checkpoint = output_dir / "checkpoints" / "checkpoint-4"
    state = json.loads((checkpoint / "training_state.json").read_text())
    (checkpoint / "training_state.json").write_text(json.dumps({**state, field: value}))
    refit_manifest(checkpoint)
    with pytest.raises(CheckpointError, match=rf"training state's '{field}' .*damaged or tampered with"):
        main(RUN + ["--output_dir", str(output_dir), "--max_train_steps", "6", "--resume_from_checkpoint", "latest"])


def test_a_pickled_optimiser_state_is_refused_without_torch_s_advice_to_unpickle_it(straight, tmp_path):
    # torch's error suggests weights_only=False ("will likely succeed"), which would run the file's code; the CLI's
    # model loading held that advice back, the resume passed it on.
    import shutil

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    output_dir = tmp_path / "run"
    shutil.copytree(straight, output_dir)
    checkpoint = output_dir / "checkpoints" / "checkpoint-4"
    torch.save({"state": {}, "param_groups": [], "x": Payload()}, checkpoint / "optimizer.bin")
    refit_manifest(checkpoint)
    with pytest.raises(CheckpointError, match="a pickled object, posix.system.*never unpickled") as error:
        main(RUN + ["--output_dir", str(output_dir), "--max_train_steps", "6", "--resume_from_checkpoint", "latest"])
    assert "weights_only" not in str(error.value) and not (tmp_path / "ran").exists()


def test_a_checkpoint_linked_in_from_another_disk_is_rotated_as_a_link(straight, tmp_path):
    # Rotation renamed the link, then shutil.rmtree refused it ("Cannot call rmtree on a symbolic link"): the run
    # failed after its new checkpoint and never saved its final model.
    import shutil

    output_dir = tmp_path / "run"
    shutil.copytree(straight, output_dir)
    elsewhere = tmp_path / "other_disk" / "checkpoint-2"
    elsewhere.parent.mkdir()
    shutil.move(output_dir / "checkpoints" / "checkpoint-2", elsewhere)
    (output_dir / "checkpoints" / "checkpoint-2").symlink_to(elsewhere)
    main(RUN + ["--output_dir", str(output_dir), "--max_train_steps", "5", "--resume_from_checkpoint", "latest"])
    assert sorted(path.name for path in (output_dir / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-4", "checkpoint-5"]
    assert (elsewhere / MANIFEST).is_file()  # the link went, never the folder it pointed at
    assert json.loads((output_dir / "metrics.json").read_text())["steps"] == 5  # the final model was saved


@pytest.mark.parametrize("step", [-3, 2, 10**12, "4", True])
def test_a_manifest_whose_step_is_not_its_folders_is_refused(straight, tmp_path, step):
    # The manifest's step was trusted: at -3 or 2 the run resumed there with step-4 weights and set aside the very
    # checkpoint it resumed from as abandoned; at 10**12 it had "nothing left to train" and recorded that step.
    import shutil

    output_dir = tmp_path / "run"
    shutil.copytree(straight, output_dir)
    manifest = output_dir / "checkpoints" / "checkpoint-4" / MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "step": step}))
    with pytest.raises(CheckpointError, match=r"the manifest of .*checkpoint-4 is damaged: its step .* is not the folder's 4"):
        main(RUN + ["--output_dir", str(output_dir), "--max_train_steps", "6", "--resume_from_checkpoint", "latest"])
    assert sorted(path.name for path in (output_dir / "checkpoints").iterdir()) == sorted(
        path.name for path in (straight / "checkpoints").iterdir()
    )


def test_a_rotation_cut_short_leaves_no_broken_checkpoint(tmp_path, monkeypatch, fresh_accelerator_state):
    from accelerate import Accelerator

    import cdb_tokenizer.tools.checkpoints as checkpoints

    accelerator = Accelerator(cpu=True)
    checkpoints.save_checkpoint(accelerator, tmp_path, 1, total_limit=1)
    real_rmtree = checkpoints.shutil.rmtree

    def killed_while_deleting(path, *args, **kwargs):  # the run dies after removing one file of the old checkpoint
        next(Path(path).rglob("*.pkl")).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.shutil, "rmtree", killed_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(accelerator, tmp_path, 2, total_limit=1)
    monkeypatch.setattr(checkpoints.shutil, "rmtree", real_rmtree)
    complete, incomplete = complete_checkpoints(tmp_path)
    assert [p.name for p in complete] == ["checkpoint-2"]
    assert [(p.name, why) for p, why in incomplete] == [("checkpoint-1.old.tmp", "its deletion never finished")]  # not a broken "checkpoint-1"
    checkpoints.save_checkpoint(accelerator, tmp_path, 3, total_limit=1)  # the next rotation removes the remains
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-3"]


@SEVERAL_PROCESSES
def test_sigterm_ends_the_step_writes_its_checkpoint_and_stops(tmp_path):
    """A cluster's preemption (SIGTERM) killed the run and lost everything since the last checkpoint."""
    output_dir = tmp_path / "run"
    argv = TINY + ["--report_to", "none", "--max_train_steps", "500", "--checkpointing_steps", "1000",
                   "--output_dir", str(output_dir)]  # fmt: skip
    script = f"import sys; sys.path.insert(0, {str(REPO)!r})\nfrom training.train import main\nmain({argv!r})\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 150
        while not ((output_dir / "logs" / "train_log.jsonl").is_file() and len(steps_logged(output_dir)) >= 2):
            assert child.poll() is None, child.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the run never logged two steps"
            time.sleep(0.05)
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
    assert child.returncode == 1
    stopped_at = int(re.search(r"training stopped: SIGTERM at step (\d+)", stderr).group(1))
    complete, _ = complete_checkpoints(output_dir)
    assert [p.name for p in complete] == [f"checkpoint-{stopped_at}"] and stopped_at < 500
    assert steps_logged(output_dir) == list(range(1, stopped_at + 1))
    main(TINY + ["--report_to", "none", "--max_train_steps", str(stopped_at + 1), "--checkpointing_steps", "1000",
                 "--output_dir", str(output_dir), "--resume_from_checkpoint", "latest"])  # fmt: skip
    assert steps_logged(output_dir) == list(range(1, stopped_at + 2))


def test_a_sigterm_in_the_last_step_lets_the_run_save_its_model(tmp_path, monkeypatch, caplog):
    import training.train as train_script

    real_step = train_script.training_step

    def step(parts, pixel_values, step, *args, **kwargs):
        if step == 1:  # the second and last step
            os.kill(os.getpid(), signal.SIGTERM)  # noted by the loop's handler, not the default (which would end pytest)
        return real_step(parts, pixel_values, step, *args, **kwargs)

    monkeypatch.setattr(train_script, "training_step", step)
    output_dir = tmp_path / "run"
    metrics = main(TINY + ["--report_to", "none", "--max_train_steps", "2", "--output_dir", str(output_dir)])
    assert metrics["steps"] == 2 and (output_dir / "model.safetensors").is_file()
    assert "A SIGTERM came during the last step" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is given back


def test_a_checkpoint_that_cannot_be_written_is_one_line_naming_the_free_space_and_keeps_the_last(
    tmp_path, monkeypatch, fresh_accelerator_state
):
    """A full disk made torch fail with "[enforce fail at inline_container.cc:672] . unexpected pos", a traceback that
    did not say the disk was full."""
    from accelerate import Accelerator

    import cdb_tokenizer.tools.checkpoints as checkpoints

    accelerator = Accelerator(cpu=True)
    checkpoints.save_checkpoint(accelerator, tmp_path, 1, total_limit=1)
    for error in (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1035456 vs 1035348"),
                  OSError(28, "No space left on device")):  # fmt: skip
        def full_disk(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(accelerator, "save_state", full_disk)
        with pytest.raises(checkpoints.CheckpointWriteError, match=r"could not write .*checkpoint-2 \(.*(unexpected pos|No space left on device).*; [0-9.]+ MiB free on its disk\); the complete checkpoints there are untouched.*--resume_from_checkpoint latest"):
            checkpoints.save_checkpoint(accelerator, tmp_path, 2, total_limit=1)
        complete, incomplete = complete_checkpoints(tmp_path)
        assert [p.name for p in complete] == ["checkpoint-1"]
        # Its half-written files are gone: they kept the disk full for the resume the message advises.
        assert incomplete == [] and not (tmp_path / "checkpoints" / "checkpoint-2.tmp").exists()
    # Not every RuntimeError is the disk's: a process that died is not told to make room.
    def peer_died(*args, **kwargs):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")

    monkeypatch.setattr(accelerator, "save_state", peer_died)
    with pytest.raises(RuntimeError, match="Connection closed by peer") as raised:
        checkpoints.save_checkpoint(accelerator, tmp_path, 2, total_limit=1)
    assert not isinstance(raised.value, checkpoints.CheckpointWriteError)


def test_an_output_folder_that_cannot_be_created_or_written_is_refused_before_any_work(tmp_path, monkeypatch):
    """A read-only --output_dir was a traceback, found only after the data and the k-means had been loaded."""
    import training.train as train

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"--output_dir .*a-file/run cannot be created: "):
        main(RUN + ["--output_dir", str(blocker / "run")])
    real_access = os.access
    read_only = tmp_path / "read-only"
    monkeypatch.setattr(train.os, "access", lambda path, mode: False if Path(path) == read_only else real_access(path, mode))
    monkeypatch.setattr(train, "initialize_codebook", lambda *args, **kwargs: pytest.fail("the data was loaded"))
    with pytest.raises(ValueError, match=r"--output_dir .*read-only cannot be written to \(a read-only file system"):
        main(RUN + ["--output_dir", str(read_only)])


def test_a_resume_with_another_schedule_goes_on_at_its_rate_and_says_so(tmp_path, caplog):
    """Resumed with another --max_train_steps, the rate fell from 1e-3 to 3e-5 in one step without a word (and this
    run's schedule took over only one step after the resume)."""
    from transformers import get_scheduler

    output_dir = tmp_path / "run"
    flags = ["--output_dir", str(output_dir), "--lr_warmup_steps", "0", "--lr_scheduler", "cosine"]
    main(RUN + flags)  # 4 steps
    caplog.clear()
    main(RUN + flags + ["--resume_from_checkpoint", str(output_dir / "checkpoints" / "checkpoint-2")])
    assert "Resumed from" in caplog.text and "Resuming with" not in caplog.text  # the same schedule: nothing to say
    caplog.clear()
    main(RUN + flags + ["--max_train_steps", "12", "--resume_from_checkpoint", str(output_dir / "checkpoints" / "checkpoint-2")])
    found = re.search(r"Resuming with max_train_steps 4 -> 12: the learning-rate schedule is laid out anew for them, "
                      r"and goes on from step 2 at rate ([0-9.e-]+)\.", caplog.text)  # fmt: skip
    assert found, caplog.text
    # The 12-step cosine at step 2 (the 4-step one's rate there was half the peak), and the schedule goes on from it.
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=parse_args(RUN + flags).learning_rate)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=12)
    rates = [schedule.get_last_lr()[0]]
    for _ in range(3):
        optimizer.step()
        schedule.step()
        rates.append(schedule.get_last_lr()[0])
    assert float(found.group(1)) == pytest.approx(rates[2], rel=1e-2)
    logged = [json.loads(line) for line in (output_dir / "logs" / "train_log.jsonl").read_text().splitlines()]
    # Step 3 trains at the rate the warning names (the log used to show the next step's).
    assert [row["train/learning_rate"] for row in logged if row["step"] == 3] == [pytest.approx(rates[2])]


def test_a_hidden_file_of_the_system_does_not_send_latest_back(tmp_path):
    # Opening a checkpoint folder in macOS's Finder writes .DS_Store: `latest` skipped the newest checkpoint for it
    # (and trained its steps again), and naming it was refused as "changed after it was written".
    import torch
    from accelerate import Accelerator

    from cdb_tokenizer.tools import checkpoints, runs

    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))
    for step in (1, 2):
        checkpoints.save_checkpoint(accelerator, tmp_path, step, 3)
    newest = tmp_path / "checkpoints" / "checkpoint-2"
    (newest / ".DS_Store").write_bytes(b"Bud1")
    assert runs.find_checkpoint("latest", tmp_path) == newest
    assert runs.find_checkpoint(str(newest), tmp_path) == newest
    (newest / "random_states_1.pkl").write_bytes((newest / "random_states_0.pkl").read_bytes())
    with pytest.raises(CheckpointError, match=r"does not list \(random_states_1.pkl\)"):
        checkpoints.verify_checkpoint(newest)


def test_latest_with_every_checkpoint_changed_says_so(tmp_path):
    # It warned "Skipping the checkpoint checkpoint-2", then failed on checkpoint-2 itself, advising to "resume from
    # another checkpoint" when `latest` had none left to offer.
    import shutil

    import torch
    from accelerate import Accelerator

    from cdb_tokenizer.tools import checkpoints, runs

    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))
    for step in (1, 2):
        folder = checkpoints.save_checkpoint(accelerator, tmp_path, step, 3)
        shutil.copy(folder / "random_states_0.pkl", folder / "random_states_1.pkl")
    with pytest.raises(CheckpointError, match=r"latest: every complete checkpoint in .* was changed after it was "
                                              r"written \(checkpoint-2: .*random_states_1.pkl.*; checkpoint-1: .*\)\. "
                                              r"Restore .* --overwrite_output_dir to start over") as refusal:  # fmt: skip
        runs.find_checkpoint("latest", tmp_path)
    assert "another checkpoint" not in str(refusal.value)  # there is none left
