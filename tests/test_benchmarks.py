"""The benchmark scripts' own plumbing: report names, refused flags, counted restarts, no error-only reports."""

import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_config

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def load():
    """Import a benchmark script as its own process would (they import `common.py` from their folder)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module


def test_command_line_pastes_back_as_it_ran(load, monkeypatch):
    common = load("common")
    argv = [str(BENCHMARKS / "quality.py"), "--set", 'code_roles={"a": [0, 8]}', "--output", "my report.md"]
    monkeypatch.setattr(sys, "argv", argv)
    assert shlex.split(common.command_line()) == ["python", "benchmarks/quality.py", *argv[1:]]
    # Reports are committed: a local path outside the repository keeps only its last part.
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / "speed.py"), "--output", "/home/alice/out/speed.md"])
    assert shlex.split(common.command_line()) == ["python", "benchmarks/speed.py", "--output", "speed.md"]
    # One inside the repository keeps its path from the root: it was cut to "quality.md" too.
    inside = str(BENCHMARKS / "results" / "ablation" / "quality.md")
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / "speed.py"), "--output", inside])
    assert shlex.split(common.command_line())[-1] == "benchmarks/results/ablation/quality.md"


def test_write_report_replaces_the_file_whole(load, tmp_path):
    path = load("common").write_report(str(tmp_path / "report.md"), "# new\n")  # an absolute name goes where it says
    assert path.read_text() == "# new\n" and [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_require_names_the_package_and_the_flag_that_skips_it(load):
    with pytest.raises(SystemExit, match="needs `no_such_package_here`.*pass --no-such to skip it"):
        load("common").require("no_such_package_here", "the part", "pass --no-such to skip it")


def test_quality_refuses_assignment_overrides_and_names_reports_by_seed_and_rules(load):
    quality = load("quality")
    with pytest.raises(SystemExit):
        quality.parse_args(["--set", "assignment=cdb", "--rules", "nearest"])
    assert quality.parse_args(["--seed", "3", "--rules", "nearest"]).output == "quality_nearest_seed3.md"
    three = quality.parse_args(["--seed", "3", "--rules", "cdb", "nearest", "sinkhorn"])
    assert three.output == "quality_cdb_nearest_sinkhorn_seed3.md"
    assert quality.parse_args(["--output", "mine.md", "--rules", "cdb"]).output == "mine.md"


def test_quality_overrides_take_json_and_python_constants(load):
    # `--set l2_normalize_codes=True` reached the config as the string 'True' and was refused there.
    quality = load("quality")
    pairs = ["l2_normalize_codes=True", "use_mid_attention=false", "ema_decay=None", "balance_weight=0.5",
             "channel_multipliers=[1, 2]", "assignment=text"]  # fmt: skip
    overrides = quality.parse_overrides(pairs)
    assert list(overrides.values()) == [True, False, None, 0.5, [1, 2], "text"]


def test_benchmark_flags_that_would_measure_something_else_are_refused(load, capsys):
    # An unknown --set field trained the default model under a report that listed the field as applied; step_time.py
    # timed the CPU under a command that said --device cuda; --steps 0 trained nothing, then divided by zero.
    quality, step_time = load("quality"), load("step_time")
    with pytest.raises(SystemExit, match="nosuchfield: not a CDBVQConfig field"):
        quality.parse_args(["--set", "nosuchfield=1"])
    for argv in (["--steps", "0"], ["--device", "cuda:0"] if not torch.cuda.is_available() else ["--steps", "-1"]):
        with pytest.raises(SystemExit):
            quality.parse_args(argv)
    with pytest.raises(SystemExit):
        step_time.parse_args(["--device", "meta"])
    assert "step_time.py times the CPU" in capsys.readouterr().err


@pytest.mark.parametrize("script, argv, message", [
    # Each ended in a traceback (torch.stack of nothing, statistics' empty median, a ZeroDivisionError), after work.
    ("quality", ["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    ("quality", ["--eval-batch-size", "0"], "argument --eval-batch-size: must be at least 1, got 0"),
    ("quality", ["--resolution", "30"], "resolution (30) must be divisible by the downsampling factor"),
    ("quality", ["--rules", "nearest", "nearest"], "--rules names nearest more than once"),  # trained twice, one row
    ("roles", ["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    # Parsed only when the restoration run came, after the roles run had trained for minutes.
    ("roles", ["--train-degradation", "bogus:1"], "unknown degradation 'bogus'"),
    ("step_time", ["--rounds", "0"], "argument --rounds: must be at least 1, got 0"),
    ("speed", ["--rounds", "0"], "argument --rounds: must be at least 1, got 0"),
    ("bench_quantizer", ["--num-latents", "0"], "argument --num-latents: must be at least 1, got 0"),  # a report of 0
])  # fmt: skip
def test_benchmark_counts_and_specs_are_checked_before_any_work(load, capsys, script, argv, message):
    with pytest.raises(SystemExit):
        load(script).parse_args(argv)
    assert message in capsys.readouterr().err


def test_roles_writes_its_role_map_only_with_its_report(load, tmp_path, monkeypatch):
    # The figure was saved as soon as the roles run ended: a run that failed later replaced it under the old report.
    roles = load("roles")

    def failing_report(name, text):
        raise OSError("disk full")

    monkeypatch.setattr(roles, "write_report", failing_report)
    with pytest.raises(OSError, match="disk full"):
        roles.main(["--runs", "roles", "--steps", "1", "--codebook-size", "96", "--output", str(tmp_path / "r.md")])
    assert not list(tmp_path.iterdir())


def test_vqtorch_adapter_counts_the_codes_the_library_replaces(load):
    pytest.importorskip("vector_quantize_pytorch")
    quality = load("quality")
    torch.manual_seed(0)
    adapter = quality.VectorQuantizeAdapter(tiny_config(), threshold_ema_dead_code=2.0).train()
    adapter(torch.randn(40, 8))  # k-means init, then the codes fewer than 2 latents chose are dead
    assert adapter.restart_dead_codes(None) > 0  # replaced in that forward already; the count starts again
    counts = []
    for _ in range(3):
        latents = torch.randn(40, 8) * 0.01
        adapter(latents)
        # A replaced code is one of the batch's latents (the EMA moves the others to averages).
        replaced = int((adapter.vq.codebook[:, None] == latents[None]).all(-1).any(-1).sum())
        counts.append((adapter.restart_dead_codes(None), replaced))
    assert all(reported == replaced for reported, replaced in counts) and counts[0][0] > 0, counts
    adapter(torch.randn(40, 8))
    adapter.restore(adapter.snapshot())  # a step undone: so are its replacements
    assert adapter.restart_dead_codes(None) == 0


def test_quantizer_report_is_named_after_the_parts_run(load):
    bench = load("bench_quantizer")
    assert bench.parse_args([]).output == "quantizer.md"
    assert bench.parse_args(["--skip-assignment"]).output == "quantizer_encode.md"
    assert bench.parse_args(["--skip-encode"]).output == "quantizer_assignment.md"
    with pytest.raises(SystemExit):
        bench.parse_args(["--skip-assignment", "--skip-encode"])


def test_timing_reports_give_the_spread_over_rounds(load, tmp_path):
    # step_time.py, cuda_training.py and speed.py reported medians alone: a claim without its spread.
    common = load("common")
    assert common.with_range([1.0, 1.3, 0.9], 2, "x") == "1.00x [0.90-1.30]"
    load("step_time").main(["--rules", "nearest", "cdb", "--rounds", "3", "--warmup", "1", "--codebook-size", "64",
                            "--resolution", "32", "--batch-size", "2", "--output", str(tmp_path / "steps.md")])  # fmt: skip
    rows = {line.split(" | ")[0]: line.split(" | ")[1:] for line in (tmp_path / "steps.md").read_text().splitlines()
            if line.startswith(("| nearest", "| cdb"))}  # fmt: skip
    assert rows["| nearest"][1] == "1.00x [1.00-1.00] |"  # the reference, to itself
    seconds, ratio = re.fullmatch(r"(\S+) \[(\S+)-(\S+)\]", rows["| cdb"][0]), re.fullmatch(r"(\S+)x \[(\S+)-(\S+)\] \|", rows["| cdb"][1])
    assert seconds and ratio
    assert float(seconds[2]) <= float(seconds[1]) <= float(seconds[3]) and float(ratio[2]) <= float(ratio[1]) <= float(ratio[3])


def test_the_gpu_smoke_dry_run_records_its_command_and_date(tmp_path):
    # gpu_smoke.json carried neither: its numbers could not be traced to a run.
    environment = {**os.environ, "STEPS": "2", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(BENCHMARKS / "gpu_smoke.sh"), "--cpu", str(tmp_path / "smoke")],
                            env=environment, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "smoke" / "gpu_smoke.json").read_text())
    expected = "STEPS=2 BATCH=2 THROUGHPUT_BATCH=4 THROUGHPUT_ITERS=2 bash benchmarks/gpu_smoke.sh --cpu smoke"
    assert report["command"] == expected  # the local path cut to its last part, as in every report
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", report["date"])
    assert report["train_steps"] == 2 and report["encode_images_per_second"] > 0
    assert report["lpips_weight"] in (0.0, 1.0)  # chosen by whether its weights are cached: recorded


def test_speed_writes_no_report_when_its_run_fails(load, monkeypatch, tmp_path):
    speed = load("speed")
    monkeypatch.setattr(speed, "run_worker", lambda script, case, *rest, **options: {**case, "error": "boom"})
    output = tmp_path / "speed.md"
    with pytest.raises(SystemExit, match="no report written: boom"):
        speed.main(["--no-diffusers", "--skip-memory", "--rules", "nearest", "--output", str(output)])
    assert not output.exists()


def test_semantic_reuses_only_a_tokenizer_trained_with_this_runs_flags(load, tmp_path):
    from cdb_tokenizer.tools.train_args import parse_args as parse_train_args

    semantic = load("semantic")
    args = semantic.parse_args(["--output_dir", str(tmp_path), "--max_train_steps", "3"])
    (tmp_path / "labels.txt").write_text("a\nb\n")
    (tmp_path / "images").mkdir()
    teacher = (tmp_path / "t.json", tmp_path / "t.safetensors")
    command = semantic.train_command(args, "nearest", tmp_path / "images", *teacher, tmp_path / "labels.txt")
    model_dir = tmp_path / "tokenizers" / "nearest"
    assert not semantic.reusable(command)  # nothing there: train it
    model_dir.mkdir(parents=True)
    (model_dir / "model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit, match="no training_config.json"):
        semantic.reusable(command)
    saved = json.loads(json.dumps(vars(parse_train_args(command[2:])), default=str))  # as train.py writes it
    (model_dir / "training_config.json").write_text(json.dumps({**saved, "model_config": {"codebook_size": 1024}}))
    assert semantic.reusable(command)
    (model_dir / "training_config.json").write_text(json.dumps({**saved, "seed": 7}))
    with pytest.raises(SystemExit, match="seed: trained with 7, this run 0"):
        semantic.reusable(command)


def test_every_quality_rule_trains_and_is_evaluated(load):
    # The model's inference checks once read `quantizer.router`, which the vqtorch adapter lacked: the default
    # benchmark trained the other rules, then died on vqtorch without a report.
    pytest.importorskip("vector_quantize_pytorch")
    quality = load("quality")
    args = quality.parse_args(["--steps", "1", "--batch-size", "2", "--resolution", "32", "--codebook-size", "64",
                               "--codebook-dim", "8", "--latent-dim", "16", "--eval-batch-size", "8"])  # fmt: skip
    backbone = quality.reference_backbone(args)
    train_photos = quality.photo_tensors("skimage")[:2]
    held_out = quality.grid_crops(quality.photo_tensors("sklearn"), args.resolution)[:8]
    results = {}
    for rule in quality.RULES:
        result = results[rule] = quality.train_and_evaluate(args, rule, backbone, train_photos, held_out)
        assert result["rule"] == rule and result["psnr"] > 0 and 0 < result["utilization"] <= 1, rule
    # Targets are the router's: a report of the baselines alone has no "Targets:" heading (it had an empty one).
    text = quality.report(args, results, "plot.png", 8, 0.1, "load")
    assert "Targets:\n- `cdb` uses" in text
    # The training columns average the last 50 steps, or all of a shorter run's (they were labelled "last 50").
    assert "train L1+L2 (last 1)" in text and "last 50" not in text
    baselines = {rule: result for rule, result in results.items() if rule != "cdb"}
    assert "Targets:" not in quality.report(args, baselines, "plot.png", 8, 0.1, "load")


def test_the_psnr_target_is_judged_only_against_every_baseline(load):
    quality = load("quality")
    row = {"utilization": 0.9, "perplexity": 300.0}
    results = {"cdb": {**row, "psnr": 20.5}, "nearest": {**row, "psnr": 20.0}}
    assert quality.targets(results, 0.98)[-1].endswith("-> no verdict: vqtorch not in this run")
    results["vqtorch"] = {**row, "psnr": 20.3}
    assert quality.targets(results, 0.98)[-1].endswith("(+0.20 dB) -> MISSED")
    results["vqtorch"]["psnr"] = 20.1
    assert quality.targets(results, 0.98)[-1].endswith("(+0.40 dB) -> met")
