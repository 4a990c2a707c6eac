"""Push a finished run to the Hugging Face Hub: the model with its card, and task adapters.

    python scripts/push_to_hub.py outputs/text_domains --repo-id user/dtgma-text-domains              # the model
    python scripts/push_to_hub.py outputs/text_domains --repo-id user/dtgma-text-domains --all-tasks  # + every task
    python scripts/push_to_hub.py outputs/text_domains --repo-id user/dtgma-tasks --task topic --no-model

Reads RUN_DIR/model (the final model, as scripts/text_domains.py and scripts/vision_splits.py write it) and
RUN_DIR/results.json (the metrics for the card). The model, its card and the chosen tasks go up in one commit; with
--no-model each task is its own commit to its folder <task>/, and nothing else in the repository changes. Afterwards:

    AutoModel.from_pretrained("user/dtgma-text-domains", trust_remote_code=True)
    model.load_task("user/dtgma-tasks", task="topic")

Needs a token with write access (`hf auth login`, HF_TOKEN, or --token). Nothing in RUN_DIR is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hf_dtgma import DTGMAModel
from hf_dtgma.files import read_json
from hf_dtgma.hub import push_model, push_task, render_model_card


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished run's --output-dir (holds model/ and results.json)")
    parser.add_argument("--repo-id", required=True, help="namespace/name of the Hub repository (created if needed)")
    tasks = parser.add_mutually_exclusive_group()
    tasks.add_argument("--task", action="append", default=[], help="push this task's adapter (repeat for several)")
    tasks.add_argument("--all-tasks", action="store_true", help="push every task's adapter")
    parser.add_argument("--no-model", action="store_true", help="push only the task adapters")
    parser.add_argument(
        "--private", action="store_true", help="create the repository as private (an existing public one is refused)"
    )
    parser.add_argument("--token", default=None, help="Hub token with write access (default: the logged-in one)")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    model_dir = args.run_dir / "model"
    if not (model_dir / "config.json").is_file():
        parser.error(f"{model_dir} holds no saved model: pass the --output-dir of a finished run.")
    model = DTGMAModel.from_pretrained(model_dir)
    tasks = model.tasks if args.all_tasks else args.task
    unknown = [task for task in tasks if task not in model.tasks]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; the run's tasks are {model.tasks}.")
    if args.no_model and not tasks:
        parser.error("--no-model pushes task adapters only: add --task NAME or --all-tasks.")
    private = args.private or None  # None: an existing repository keeps its visibility

    try:
        if args.no_model:
            for task in tasks:
                print(f"Pushing task {task} to {args.repo_id}/{task}/ ...")
                commit = push_task(model, task, args.repo_id, private=private, token=args.token)
                print(f"  {commit.commit_url}")
        else:
            results_path = args.run_dir / "results.json"
            results = None
            if results_path.exists():
                results = read_json(results_path, "re-run the training, or push with --no-model")
            else:
                print(f"Note: no {results_path}: the model card will have no results section.", file=sys.stderr)
            card = render_model_card(model, results, repo_id=args.repo_id, adapters=tasks)
            print(f"Pushing the model ({len(model.tasks)} tasks), its card and the adapters {tasks} to {args.repo_id}")
            commit = push_model(model, args.repo_id, card=card, tasks=tasks, private=private, token=args.token)
            print(f"  {commit.commit_url}")
    except (OSError, ValueError) as error:
        parser.exit(1, f"error: {error}\n")
    print(f"Done: {commit.repo_url}")


if __name__ == "__main__":
    main()
