#!/usr/bin/env bash
# GPU smoke test of cdb-vq training: a short bf16 training of a 256x256 tokenizer (CDBVQConfig defaults: f16,
# 16,384 codes, the cdb router) on CUDA through training/train.py, then the encode/decode throughput of the result.
#
# Usage:
#   bash benchmarks/gpu_smoke.sh [OUTPUT_DIR]          # on a CUDA machine (default STEPS=200; 150 took ~1 min on one H200)
#   bash benchmarks/gpu_smoke.sh --cpu [OUTPUT_DIR]    # dry check of the same script on a CPU: tiny and short
#
# Environment: STEPS (training steps), BATCH (images per step), THROUGHPUT_BATCH, THROUGHPUT_ITERS.
# Runs offline: trains on the photos that ship with scikit-image, with a tiny open_clip teacher built from a config
# (no weights to download) so the semantic path runs on the GPU too; LPIPS is off unless its weights are cached.
# Writes OUTPUT_DIR/gpu_smoke.json (with the command that reproduces it and the date, besides the usual training
# outputs); OUTPUT_DIR defaults to $OUT or outputs/gpu-smoke.
set -euo pipefail

ARGUMENTS=("$@")  # as given, for the report's command line
MODE=cuda
if [[ "${1:-}" == "--cpu" ]]; then
    MODE=cpu
    shift
fi
OUTPUT_DIR="${1:-${OUT:-outputs}/gpu-smoke}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUTPUT_DIR"

if [[ "$MODE" == cuda ]]; then
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run with --cpu for a dry check')"
    STEPS="${STEPS:-200}"; BATCH="${BATCH:-8}"
    MODEL_FLAGS=(--model_preset base --mixed_precision bf16)
    THROUGHPUT_BATCH="${THROUGHPUT_BATCH:-32}"; THROUGHPUT_ITERS="${THROUGHPUT_ITERS:-20}"
else
    STEPS="${STEPS:-4}"; BATCH="${BATCH:-2}"
    MODEL_FLAGS=(--model_preset tiny --resolution 32 --base_channels 16 --codebook_size 64 --mixed_precision no)
    THROUGHPUT_BATCH="${THROUGHPUT_BATCH:-4}"; THROUGHPUT_ITERS="${THROUGHPUT_ITERS:-2}"
fi

python - "$OUTPUT_DIR/tiny_clip.json" <<'EOF'
import sys
from cdb_tokenizer.tools.teacher import save_clip_config
save_clip_config(sys.argv[1])
EOF

LPIPS_WEIGHT=0
if python -c "import os, sys; from cdb_tokenizer.tools.losses import lpips_backbone_file; sys.exit(0 if os.path.isfile(lpips_backbone_file('vgg')[0]) else 1)"; then
    LPIPS_WEIGHT=1.0
fi

echo "== training: $MODE, $STEPS steps of $BATCH images, LPIPS weight $LPIPS_WEIGHT"
START=$(date +%s)
python "$REPO/training/train.py" "${MODEL_FLAGS[@]}" \
    --output_dir "$OUTPUT_DIR/run" --max_train_steps "$STEPS" --train_batch_size "$BATCH" \
    --lr_warmup_steps $((STEPS / 10)) --validation_steps "$STEPS" --checkpointing_steps "$STEPS" \
    --disc_start $((STEPS / 2)) --dead_code_restart_steps $((STEPS / 4 > 0 ? STEPS / 4 : 1)) --use_ema \
    --clip_model "$OUTPUT_DIR/tiny_clip.json" --clip_pretrained none --prototypes kmeans:16 \
    --prototype_kmeans_batches 4 --lpips_weight "$LPIPS_WEIGHT" --num_validation_images 16 --report_to tensorboard
TRAIN_SECONDS=$(( $(date +%s) - START ))

echo "== throughput"
python - "$REPO" "$OUTPUT_DIR" "$MODE" "$THROUGHPUT_BATCH" "$THROUGHPUT_ITERS" "$STEPS" "$BATCH" "$TRAIN_SECONDS" \
    "$LPIPS_WEIGHT" "${ARGUMENTS[@]+"${ARGUMENTS[@]}"}" <<'EOF'
import datetime, json, sys, time
from pathlib import Path

import torch

from cdb_tokenizer import CDBVQModel

repo, output_dir, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
batch, iterations, steps, train_batch, train_seconds = (int(value) for value in sys.argv[4:9])
lpips_weight = float(sys.argv[9])
sys.path.insert(0, str(repo / "benchmarks"))
from common import command_line  # noqa: E402

# The command that reproduces this report, as every benchmark report gives it (the settings the environment gave
# included); the LPIPS weight follows from whether its weights are cached, so the report records it.
settings = f"STEPS={steps} BATCH={train_batch} THROUGHPUT_BATCH={batch} THROUGHPUT_ITERS={iterations}"
command = f"{settings} {command_line(sys.argv[10:], script=repo / 'benchmarks' / 'gpu_smoke.sh', interpreter='bash')}"
device = torch.device("cuda" if mode == "cuda" else "cpu")
dtype = torch.bfloat16 if mode == "cuda" else torch.float32
model = CDBVQModel.from_pretrained(output_dir / "run").to(device=device, dtype=dtype).eval()
size = model.config.resolution
pixel_values = torch.rand(batch, 3, size, size, device=device, dtype=dtype) * 2 - 1


def timed(function):
    function()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iterations):
        result = function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iterations, result


with torch.inference_mode():
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    encode_seconds, tokens = timed(lambda: model.get_image_tokens(pixel_values))
    decode_seconds, _ = timed(lambda: model.decode_image_tokens(tokens))
metrics = json.loads((output_dir / "run" / "metrics.json").read_text())
report = {
    "command": command,
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    "torch": torch.__version__,
    "precision": str(dtype).replace("torch.", ""),
    "resolution": size,
    "codebook_size": model.config.codebook_size,
    "tokens_per_image": tokens.shape[1],
    "train_steps": steps,
    "lpips_weight": lpips_weight,
    "train_batch_size": train_batch,
    "train_script_seconds": train_seconds,
    "train_wall_time_seconds": metrics["wall_time_seconds"],
    "encode_images_per_second": round(batch / encode_seconds, 1),
    "decode_images_per_second": round(batch / decode_seconds, 1),
    "inference_peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
    "validation": {key: metrics[key] for key in ("psnr", "ssim", "utilization", "perplexity") if key in metrics},
}
(output_dir / "gpu_smoke.json").write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps(report, indent=2))
EOF
