"""README's Python quick-start runs as written (with the adapter saved into a temporary folder)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def test_quick_start_runs(tmp_path):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert '"adapter/"' in code
    namespace: dict = {}
    exec(code.replace('"adapter/"', repr(str(tmp_path / "adapter"))), namespace)  # noqa: S102
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert type(namespace["model"].bert.encoder.layer[0].attention.self.query) is torch.nn.Linear
