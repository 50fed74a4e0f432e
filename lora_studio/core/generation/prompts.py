"""Prompt lists for a comparison: a .txt file (one prompt per line) or .jsonl (a "prompt" field per line)."""

from __future__ import annotations

import json
from pathlib import Path

from lora_studio.core.errors import UserError

MAX_PROMPTS = 1000


def load_prompts(path: str | Path) -> list[str]:
    """The prompts in ``path``; blank lines are skipped. Raises UserError naming the bad line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(
            f"{path} does not exist" if not path.exists() else f"{path} is not a file", "give a .txt or .jsonl file"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path.name} is not UTF-8 text (byte {exc.start})", "save it as UTF-8") from exc
    except OSError as exc:
        raise UserError(f"cannot read {path.name}: {exc.strerror or exc}", "check the file's permissions") from exc
    prompts: list[str] = []
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if jsonl:
            try:
                item = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:  # nested thousands deep: Python's parser recurses
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deep"
                raise UserError(
                    f"{path.name} line {number} is not JSON: {reason}", 'write one {"prompt": "..."} object per line'
                ) from exc
            prompt = item.get("prompt") if isinstance(item, dict) else None
            if not isinstance(prompt, str) or not prompt.strip():
                raise UserError(
                    f'{path.name} line {number} has no "prompt" text', 'write one {"prompt": "..."} object per line'
                )
        else:
            prompt = line
        prompts.append(prompt)
        if len(prompts) > MAX_PROMPTS:
            raise UserError(f"{path.name} has more than {MAX_PROMPTS} prompts", "split it into smaller files")
    if not prompts:
        raise UserError(f"{path.name} has no prompts", "write one prompt per line")
    return prompts
