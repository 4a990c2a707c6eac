"""The README's Python examples run as written, and the shapes their comments state hold.

A bare expression whose line comment starts with a shape, such as ``out.logits   # (3, 2, 3)``, is checked against the
shape of its value. Only Hub ids are replaced, by tiny local models saved from code (no download here).
"""

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest
import torch

from conftest import run_without_hf_dtgma, tiny_qwen

README = Path(__file__).resolve().parents[1] / "README.md"
SHAPE_COMMENT = re.compile(r"#\s*\((\d+(?:,\s*\d+)*)\)")


def python_block(first_line: str) -> str:
    """The README's ```python block that starts with `first_line`."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if b.startswith(first_line)]
    assert len(blocks) == 1, f"expected one README python block starting with {first_line!r}, found {len(blocks)}"
    return blocks[0]


def run_block(code: str, namespace: dict) -> int:
    """Execute `code` statement by statement in `namespace`; a bare expression commented with a shape must evaluate
    to a tensor of that shape. Returns how many shapes were checked."""
    comments = {
        token.start[0]: token.string
        for token in tokenize.generate_tokens(io.StringIO(code).readline)
        if token.type == tokenize.COMMENT
    }
    checked = 0
    for statement in ast.parse(code).body:
        shape = SHAPE_COMMENT.match(comments.get(statement.end_lineno, ""))
        if isinstance(statement, ast.Expr) and shape:
            value = eval(compile(ast.Expression(statement.value), "README.md", "eval"), namespace)
            expected = tuple(int(size) for size in shape[1].split(","))
            assert tuple(value.shape) == expected, f"{ast.unparse(statement)}: {tuple(value.shape)}, README: {expected}"
            checked += 1
        else:
            exec(compile(ast.Module([statement], type_ignores=[]), "README.md", "exec"), namespace)
    return checked


def test_quick_start_runs_and_its_folders_load_where_hf_dtgma_is_not_installed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    assert run_block(python_block("import torch\nfrom hf_dtgma import"), namespace) == 2
    model, out = namespace["model"], namespace["out"]
    assert model.tasks == ["sentiment", "topic"] and torch.isinf(out.logits[:, 0, 2]).all()  # sentiment has 2 labels
    assert not any(p.requires_grad for p in model.task_adapters[0].parameters()) and model.config.tasks[0]["frozen"]
    assert {p.name for p in (tmp_path / "adapters" / "topic").iterdir()} >= {
        "adapter_model.safetensors", "adapter_config.json"
    }

    loading = python_block("from transformers import AutoModel\n\nmodel = AutoModel.from_pretrained(\"my-dtgma\"")
    run_without_hf_dtgma(
        loading + "assert model.tasks == ['sentiment', 'topic', 'topic_v2'], model.tasks\n"
        "import torch\nx = torch.randn(2, 4, 384)\n"
        "assert torch.equal(model(inputs_embeds=x, task_ids='topic').logits,"
        " model(inputs_embeds=x, task_ids='topic_v2').logits)\n",
        tmp_path,
    )


@pytest.fixture
def local_qwen(tmp_path) -> str:
    """A tiny random Qwen2 and its tokenizer saved as a local folder, standing in for `Qwen/Qwen2.5-1.5B`."""
    model, tokenizer = tiny_qwen()
    model.save_pretrained(tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")
    return str(tmp_path / "qwen")


def test_raw_input_and_image_examples_run_with_the_shapes_they_state(local_qwen, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the quick start saves folders
    namespace: dict = {}
    run_block(python_block("import torch\nfrom hf_dtgma import"), namespace)  # the names these blocks use
    raw = python_block("from hf_dtgma.backbones import TextBackbone, PatchEmbedder")
    assert "Qwen/Qwen2.5-1.5B" in raw
    run_block(raw.replace("Qwen/Qwen2.5-1.5B", local_qwen), namespace)
    tokens, mask = namespace["images"](torch.randn(2, 1, 28, 28))
    assert tokens.shape == (2, 16, 64) and mask.shape == (2, 16)  # what the PatchEmbedder line's comment states
    assert namespace["model"].attached_backbone is namespace["backbone"]

    assert run_block(python_block("model = DTGMAModel(DTGMAConfig(image_size=28"), namespace) == 1
