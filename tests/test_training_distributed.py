"""Two processes (gloo on the CPU, launched with torchrun) train and end with identical weights and codebooks."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import json

import torch
from conftest import SEVERAL_PROCESSES, image_folder
from safetensors.torch import load_file

from cdb_tokenizer.tools.teacher import save_clip_config

pytestmark = SEVERAL_PROCESSES

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = ["--resolution", "32", "--base_channels", "16", "--channel_multipliers", "1", "2", "2", "--num_res_blocks", "1", "--norm_num_groups", "8", "--latent_dim", "16", "--codebook_size", "64", "--codebook_dim", "8", "--semantic_dim", "32", "--num_prototypes", "8", "--router_dim", "8"]

# Each process trains through train.py's own code path, then writes the state of its copy of the model.
WORKER = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {repo!r})
    from safetensors.torch import save_file
    from training.train import parse_args, train

    model, metrics = train(parse_args(sys.argv[2:]))
    state = {{name: value.contiguous() for name, value in model.state_dict().items()}}
    save_file(state, os.path.join(sys.argv[1], "rank" + os.environ["RANK"] + ".safetensors"))
    """
)


def run_two_processes(worker, tmp_path, steps: int, *flags: str) -> subprocess.CompletedProcess:
    """train.py's code path in two torchrun processes (gloo on the CPU) on the tiny model, with `flags` added."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(worker), str(tmp_path), *TINY_MODEL, "--output_dir", str(tmp_path / "run"), "--max_train_steps", str(steps),
        "--train_batch_size", "2", "--num_validation_images", "2", "--report_to", "none", *flags,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=150, check=False)


def run_worker_script(tmp_path, name: str, source: str, *arguments: str) -> subprocess.CompletedProcess:
    """`source` (formatted with the repository's path) as `name` in two torchrun processes (gloo on the CPU)."""
    worker = tmp_path / name
    worker.write_text(source.format(repo=str(REPO)))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(worker), *arguments]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_end_with_identical_weights_and_codebooks(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(repo=str(REPO)))
    clip_config = save_clip_config(tmp_path / "tiny_clip.json")
    result = run_two_processes(
        worker, tmp_path, 3, "--clip_model", str(clip_config),
        "--clip_pretrained", "none", "--prototypes", "kmeans:8", "--prototype_kmeans_batches", "2",
        "--disc_weight", "0.5", "--disc_start", "1", "--disc_base_channels", "8", "--disc_num_layers", "2",
        "--dead_code_restart_steps", "1", "--dead_code_threshold", "0.9", "--usage_decay", "0.3", "--use_ema",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert first.keys() == second.keys()
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert different == []
    assert bool(first["quantizer.initialized"])
    assert "2 process(es)" in result.stderr and (tmp_path / "run" / "metrics.json").is_file()


def test_a_checkpoint_keeps_the_unreadable_images_every_process_met(tmp_path):
    # Each process meets only its own batches' unreadable images; the checkpoint (written by the main process) used
    # to keep the main process's alone, so a resumed run counted fewer than the run had met.
    # Each broken file sorts after a readable one: only the process that draws that position meets it.
    image_folder(tmp_path / "data", {"train": 8, "validation": 2}, broken={"train": [f"{index}b.png" for index in range(4)]})
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(repo=str(REPO)))
    result = run_two_processes(
        worker, tmp_path, 3, "--clip_model", "none", "--disc_weight", "0", "--lpips_weight", "0",
        "--train_data_dir", str(tmp_path / "data"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    saved = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-3" / "training_state.json").read_text())
    assert metrics["skipped_images"] == 4  # 12 images, 3 steps of 2 x 2: every one met (one epoch)
    assert len(set(saved["skipped_image_ids"])) == 4  # the distinct unreadable images of both processes
    # The log counted the main process's alone until a checkpoint shared them (3 at the last step, against 4).
    logged = [json.loads(line) for line in (tmp_path / "run" / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [row["train/skipped_images"] for row in logged if "train/skipped_images" in row][-1] == 4
    # What the launcher decided is recorded beside the flags.
    config = json.loads((tmp_path / "run" / "training_config.json").read_text())
    assert (config["num_processes"], config["global_batch_size"], config["mixed_precision"]) == (2, 4, "no")


def test_a_teacher_missing_on_one_process_stops_every_process_instead_of_hanging(tmp_path):
    # Each process loads the teacher itself: one without it (its download failed) used to skip the prototypes'
    # barrier and hang the others, or, without prototypes, train without the semantic losses and no warning.
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(repo=str(REPO)).replace(
        "from training.train import parse_args, train",
        "import training.train as script\n"
        "from training.train import parse_args, train\n"
        "load = script.load_clip_teacher\n"
        "script.load_clip_teacher = lambda *a, **k: None if os.environ['RANK'] == '1' else load(*a, **k)",
    ))  # fmt: skip
    clip_config = save_clip_config(tmp_path / "tiny_clip.json")
    result = run_two_processes(
        worker, tmp_path, 1, "--clip_model", str(clip_config), "--clip_pretrained", "none", "--prototypes", "kmeans:8",
        "--prototype_kmeans_batches", "1", "--disc_weight", "0", "--lpips_weight", "0",
    )  # fmt: skip
    assert result.returncode != 0
    assert "the CLIP teacher" in result.stderr and "not on process(es) [1]" in result.stderr, result.stderr[-3000:]


TERMINATION_WORKER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from cdb_tokenizer.tools.runs import multi_process_without_accelerator, TerminationRequest
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=multi_process_without_accelerator())
    with TerminationRequest(accelerator) as termination:
        before = termination.requested()
        if accelerator.process_index == 1:  # the signal reaches one process first
            os.kill(os.getpid(), signal.SIGTERM)
        after = termination.requested()
    with open(os.path.join(sys.argv[1], f"rank{{accelerator.process_index}}.txt"), "w") as answer:
        answer.write(f"{{before}} {{after}}")  # a file each: the two processes' stdout lines can interleave
    accelerator.wait_for_everyone()  # neither process leaves while the other still talks to it (gloo aborts then)
    accelerator.end_training()
    """
)


def test_a_sigterm_on_one_process_stops_every_process(tmp_path):
    """Each process may get the preemption signal at another moment: all must agree to stop, or one would wait
    forever in the next step's collectives."""
    result = run_worker_script(tmp_path, "termination.py", TERMINATION_WORKER, str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)] == ["False True", "False True"]


CHECKPOINT_CHOICE_WORKER = textwrap.dedent(
    """
    import os, signal, sys, time
    sys.path.insert(0, {repo!r})
    from accelerate import Accelerator
    import cdb_tokenizer.tools.runs as runs

    accelerator = Accelerator(cpu=runs.multi_process_without_accelerator())
    if accelerator.process_index == 1:  # a stale view of the shared folder: no complete checkpoint seen here
        runs.complete_checkpoints = lambda output_dir: ([], [])
    found = runs.find_checkpoint("latest", sys.argv[1], accelerator)
    with open(sys.argv[1] + f"-rank{{accelerator.process_index}}.txt", "w") as answer:  # a file each: no interleaving
        answer.write(found.name if found else "None")
    if accelerator.is_main_process:  # an unexpected error on the main process (a damaged file, NFS's ESTALE)
        def broken(output_dir):
            raise OSError("Stale file handle")
        runs.complete_checkpoints = broken
    try:
        runs.find_checkpoint("latest", sys.argv[1], accelerator)
    except Exception as error:  # every process stops with it, instead of waiting in the broadcast
        with open(sys.argv[1] + f"-error{{accelerator.process_index}}.txt", "w") as answer:
            answer.write(f"{{type(error).__name__}}: {{error}}")
    # A SIGTERM on the main process while it decides (hashing a checkpoint): the others waited in the broadcast.
    from cdb_tokenizer.tools.messages import Terminated, sigterm_as_interruption
    if accelerator.is_main_process:
        def interrupted(output_dir):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        runs.complete_checkpoints = interrupted
    try:
        with sigterm_as_interruption():
            runs.find_checkpoint("latest", sys.argv[1], accelerator)
    except Terminated:
        with open(sys.argv[1] + f"-terminated{{accelerator.process_index}}.txt", "w") as answer:
            answer.write("terminated")
    accelerator.wait_for_everyone()  # neither process leaves while the other still talks to it (gloo aborts then)
    accelerator.end_training()
    """
)


def test_every_process_resumes_from_the_checkpoint_the_main_process_chose(tmp_path, fresh_accelerator_state):
    from accelerate import Accelerator

    from cdb_tokenizer.tools.checkpoints import save_checkpoint

    save_checkpoint(Accelerator(cpu=True), tmp_path / "run", 3, total_limit=None)
    result = run_worker_script(tmp_path, "choice.py", CHECKPOINT_CHOICE_WORKER, str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [(tmp_path / f"run-rank{rank}.txt").read_text() for rank in (0, 1)] == ["checkpoint-3", "checkpoint-3"]
    assert [(tmp_path / f"run-error{rank}.txt").read_text() for rank in (0, 1)] == ["CheckpointError: OSError: Stale file handle"] * 2
    assert [(tmp_path / f"run-terminated{rank}.txt").read_text() for rank in (0, 1)] == ["terminated"] * 2


PEER_STOPPED_WORKER = textwrap.dedent(
    """
    import os, signal, sys, time
    sys.path.insert(0, {repo!r})
    from accelerate import Accelerator
    from cdb_tokenizer.tools.runs import multi_process_without_accelerator
    from cdb_tokenizer.tools.messages import run_script

    def main():
        accelerator = Accelerator(cpu=multi_process_without_accelerator())
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:  # SIGTERM on the main process alone, outside the training loop
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        accelerator.wait_for_everyone()  # the other process waits here for the one that stopped

    run_script(main, ValueError)
    """
)


def test_a_process_whose_peer_stopped_outside_the_loop_says_so_in_one_line(tmp_path):
    # A SIGTERM reaching one process outside the loop (setup, choosing the checkpoint, the final save) stops it with
    # `terminated`; the other, waiting in a gloo collective, got "Connection closed by peer" and a 40-line traceback.
    # Two plain processes, not torchrun: its agent SIGTERMs the survivor as soon as one process ends, and on a loaded
    # machine that came before the survivor saw the closed connection this test is about.
    worker = tmp_path / "peer.py"
    worker.write_text(PEER_STOPPED_WORKER.format(repo=str(REPO)))
    port = str(free_port())
    processes = []
    try:
        for rank in ("0", "1"):
            environment = {**os.environ, "RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}  # fmt: skip
            processes.append(subprocess.Popen([sys.executable, str(worker)], env=environment, stderr=subprocess.PIPE,
                                              stdout=subprocess.DEVNULL, text=True))  # fmt: skip
        (_, main_err), (_, other_err) = (process.communicate(timeout=120) for process in processes)
    finally:  # a hang must not leave the two processes behind on the test worker
        for process in processes:
            process.kill()
    assert processes[0].returncode == 143 and "peer.py: terminated" in main_err, main_err[-3000:]
    assert processes[1].returncode == 1, other_err[-3000:]
    assert "Traceback" not in other_err and "terminated" not in other_err, other_err[-3000:]
    assert "peer.py: error: another process of this run stopped" in other_err, other_err[-3000:]


LAST_STEP_WORKER = textwrap.dedent(
    """
    import logging, os, signal, sys
    sys.path.insert(0, {repo!r})
    from accelerate import Accelerator
    from cdb_tokenizer.tools.runs import multi_process_without_accelerator, TerminationRequest

    accelerator = Accelerator(cpu=multi_process_without_accelerator())
    logging.basicConfig()
    logging.getLogger().setLevel(logging.INFO if accelerator.is_main_process else logging.ERROR)  # as make_accelerator
    with TerminationRequest(accelerator) as termination:
        if accelerator.process_index == 1:  # in the last step, on a process other than the main one
            os.kill(os.getpid(), signal.SIGTERM)
        termination.warn_if_received("its model")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    """
)


def test_a_sigterm_of_the_last_step_on_another_process_is_said(tmp_path):
    # Only the process that got it warned, and only the main process logs warnings: the run went on without a word.
    result = run_worker_script(tmp_path, "last.py", LAST_STEP_WORKER)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("A SIGTERM came during the last step") == 1, result.stderr[-3000:]
