"""Publish a trained cdb-vq tokenizer to the Hugging Face Hub, with its model card.

    python training/publish.py outputs/cdb-vq --hub_model_id your-org/cdb-vq [--private] [--revision v1]

Stages the weights, config, remote code, image processor, figures and a rendered `README.md` model card from the
output folder of `training/train.py` (checkpoints/ and logs/ stay behind), then uploads them. The token comes from
`--token`, else `HF_TOKEN` or `hf auth login`. `--dry_run --staging_dir DIR` stages only, to look at the card first.
This is the function `train.py --push_to_hub` calls: `cdb_tokenizer.tools.publishing.push_to_hub`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from huggingface_hub.errors import HfHubHTTPError

from cdb_tokenizer.tools.messages import OneLineErrorParser, first_line
from cdb_tokenizer.tools.publishing import DEFAULT_LICENSE, push_to_hub, stage_folder


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrorParser(description="Publish a trained cdb-vq tokenizer to the Hugging Face Hub.")
    parser.add_argument(
        "output_dir", help="output folder of training/train.py (save_pretrained files, metrics.json, ...)"
    )
    parser.add_argument("--hub_model_id", required=True, help="Hub repository, e.g. your-org/cdb-vq")
    parser.add_argument(
        "--private", action="store_true",
        help="create the repository as private (an existing public one is refused, not changed); without it, a new "
        "one takes the owner's default visibility",
    )  # fmt: skip
    parser.add_argument("--revision", default=None, help="branch to upload to (created if needed; default: main)")
    parser.add_argument("--commit_message", default=None, help="commit message of the upload")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the `hf auth login` token)")
    parser.add_argument(
        "--license", default=DEFAULT_LICENSE, help=f"license in the model card (default: {DEFAULT_LICENSE})"
    )
    parser.add_argument("--staging_dir", default=None, help="stage into this (empty) folder and keep it")
    parser.add_argument("--dry_run", action="store_true", help="stage into --staging_dir only; upload nothing")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.dry_run:
            if not args.staging_dir:
                raise ValueError("--dry_run needs --staging_dir to stage into.")
            folder = stage_folder(
                args.output_dir, args.staging_dir, args.hub_model_id, license=args.license, revision=args.revision
            )  # the card the upload would show, snippets of the branch included
            print(f"staged {args.hub_model_id} in {folder} (nothing uploaded)")
            return 0
        commit = push_to_hub(
            args.output_dir,
            args.hub_model_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            token=args.token,
            staging_dir=args.staging_dir,
            license=args.license,
        )
    except HfHubHTTPError as error:  # the Hub refused (401, 403, 5xx): an OSError, but no mistake in the folder
        print(f"publish: error: the upload failed: {first_line(error)}", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError) as error:  # bad folder, bad id, no token
        print(f"publish: error: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001 - network transport errors have no common base class to name
        print(f"publish: error: the upload failed: {type(error).__name__}: {first_line(error)}", file=sys.stderr)
        return 1
    print(f"published {args.hub_model_id}: {getattr(commit, 'commit_url', commit)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
