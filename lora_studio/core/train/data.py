"""Training data from local files: read, recognised by shape, rendered and tokenised as the model will see it.

Files: JSONL (or a JSON array), CSV, Parquet, and a folder written by ``datasets.save_to_disk``. Shapes, by
their columns:

* ``messages``: a chat (``[{"role", "content"}, ...]``); the loss is on the last assistant turn;
* ``prompt`` / ``completion``;
* ``instruction`` (+ ``input``) / ``output`` (also ``response`` or ``answer``);
* ``text``: plain text; the loss is on all of it.

A model with a chat template sees every shape but ``text`` as a chat (the user's turn, then the assistant's),
exactly as the window renders a prompt when it generates; a model without one sees prompt + completion as
plain text ending in the end-of-sequence token. Tokenisation follows TRL's ``SFTTrainer`` (the chat template
applied to the prompt with the generation prompt, then to the whole conversation; the completion starts where
the two diverge), so a dataset handed to the trainer already tokenised trains exactly as TRL would train it.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lora_studio.core.errors import UserError
from lora_studio.core.generation.chat_template import apply_chat_template
from lora_studio.core.io.paths import inside, regular_file
from lora_studio.core.tasks import CancelToken, Progress, Report, no_report
from lora_studio.core.train.settings import TrainSettings

if TYPE_CHECKING:
    from types import ModuleType

Shape = Literal["messages", "prompt_completion", "instruction", "text"]
SHAPES_ACCEPTED = (
    "messages (a list of {role, content}); prompt + completion; instruction (+ input) + output/response/answer; text"
)
OUTPUT_COLUMNS = ("output", "response", "answer")
SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
MAX_FILE_BYTES = 4 * 1024**3  # a training file this big is not meant for a desktop run
MAX_ROW_CHARS = 1_000_000  # about 250k tokens: far above any max_length, far below what hangs the tokeniser


@dataclass(frozen=True)
class Example:
    """One row as the trainer sees it: token ids and which of them carry the loss."""

    input_ids: list[int]
    completion_mask: list[int]  # 1: the loss is computed on this token
    source_row: int  # 1-based row number in its file


@dataclass
class PreparedData:
    """The training and validation examples, and what a user should know about them."""

    train: list[Example]
    val: list[Example]
    shape: Shape
    columns: tuple[str, ...]
    train_file: Path
    val_file: Path | None
    rows_too_long: int = 0  # rows cut at max_length
    max_length: int = 0
    warnings: list[str] = field(default_factory=list)
    # how a prompt and its answer became one text: "chat_template" (the tokenizer's), or "plain": joined as written,
    # TRL's convention for a base without a chat template, so the adapter is prompted with the bare prompt
    text_format: str = "chat_template"

    def summary(self) -> str:
        val = f", {len(self.val)} validation" if self.val else ", no validation"
        return f"{len(self.train)} training rows{val} ({self.shape.replace('_', ' + ')})"


# -- reading ---------------------------------------------------------------------------------------------------------


def read_rows(path: Path) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    """The rows of a local data file or ``save_to_disk`` folder, and its columns."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{path} does not exist", "pick a JSONL, CSV or Parquet file, or a save_to_disk folder")
    regular_file(path, "data file")  # a pipe or a device (a link to /dev/zero) would block or never end
    if path.is_dir():
        rows, names = _read_saved_dataset(path)
        _check_row_sizes(rows, path)
        return rows, names
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UserError(
            f"{path.name}: unknown data file type {path.suffix or '(none)'}",
            "use .jsonl, .json, .csv or .parquet, or a folder written by datasets.save_to_disk",
        )
    if path.stat().st_size > MAX_FILE_BYTES:
        raise UserError(f"{path.name} is larger than {MAX_FILE_BYTES // 1024**3} GiB", "use a smaller file")
    if kind == "json":
        rows = _read_json_rows(path)
    else:
        if kind == "csv":
            _check_utf8(path)
        rows = _read_with_datasets(path, kind)
    _check_row_sizes(rows, path)
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return rows, tuple(columns)


def _check_row_sizes(rows: list[dict[str, Any]], path: Path) -> None:
    """A row of more than MAX_ROW_CHARS characters is refused before anything tokenises it: training cuts it at
    max_length tokens anyway, and tokenising tens of megabytes of one row takes gigabytes and minutes."""
    for number, row in enumerate(rows, 1):
        size = _characters(row)
        if _surrogate(row):  # JSON's \ud800 escapes: text no tokenizer (or UTF-8) can hold
            raise UserError(
                f"{path.name}, row {number}: a lone UTF-16 surrogate (such as \\ud800) in its text",
                "fix the text: it is not valid Unicode",
            )
        if size > MAX_ROW_CHARS:
            raise UserError(
                f"{path.name}, row {number}: {size:,} characters of text; at most {MAX_ROW_CHARS:,} per row",
                "split the row into examples of a training length (rows are cut at max_length tokens anyway)",
            )


_SURROGATE = re.compile("[\ud800-\udfff]")


def _surrogate(value: Any, depth: int = 0) -> bool:
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if depth > 8:
        return False
    if isinstance(value, dict):
        return any(_surrogate(v, depth + 1) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_surrogate(v, depth + 1) for v in value)
    return False


def _characters(value: Any, depth: int = 0) -> int:
    if isinstance(value, str):
        return len(value)
    if depth > 8:  # the shapes read here nest two levels (messages: a list of dicts)
        return 0
    if isinstance(value, dict):
        return sum(_characters(v, depth + 1) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_characters(v, depth + 1) for v in value)
    return 0


def _check_utf8(path: Path) -> None:
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(
                    f"{path.name}, line {number}: not UTF-8 text (byte {exc.start + 1})",
                    "save the file as UTF-8",
                ) from exc


def _read_json_rows(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{path.name}, line {line}: not UTF-8 text", "save the file as UTF-8") from exc
    stripped = text.lstrip()
    if stripped.startswith("["):  # one JSON array of rows
        try:
            rows = json.loads(text)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested thousands deep
            raise UserError(
                f"{path.name}: not valid JSON ({exc if isinstance(exc, ValueError) else 'nested too deep'})",
                "one JSON array of objects, or JSON Lines",
            ) from exc
        numbered = list(enumerate(rows, 1))
    else:
        numbered = []
        for number, text_line in enumerate(text.splitlines(), 1):
            if not text_line.strip():
                continue
            try:
                numbered.append((number, json.loads(text_line)))
            except (ValueError, RecursionError) as exc:
                raise UserError(
                    f"{path.name}, line {number}: not valid JSON "
                    f"({exc if isinstance(exc, ValueError) else 'nested too deep'})",
                    "one JSON object per line",
                ) from exc
    for number, row in numbered:
        if not isinstance(row, dict):
            raise UserError(f"{path.name}, row {number}: a {type(row).__name__}, not an object", "one object per row")
    return [row for _, row in numbered]


def _datasets_quietly() -> ModuleType:
    import datasets

    datasets.disable_progress_bars()
    # its own error lines (a corrupt Parquet file's schema) would print beside the one line LoRA Studio gives
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    return datasets


def _read_with_datasets(path: Path, kind: str) -> list[dict[str, Any]]:
    datasets = _datasets_quietly()
    # the library caches what it reads; the cache goes in a temporary folder, not the user's home
    with tempfile.TemporaryDirectory(prefix="lora-studio-data-") as cache:
        try:
            loader = datasets.Dataset.from_csv if kind == "csv" else datasets.Dataset.from_parquet
            table = loader(str(path), keep_in_memory=True, cache_dir=cache)
        except Exception as exc:
            raise UserError(f"{path.name}: cannot read it as {kind.upper()} ({_first_line(exc)})", "") from exc
        return table.to_list()


def _read_saved_dataset(path: Path) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    datasets = _datasets_quietly()
    if not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        raise UserError(
            f"{path} is a folder but not one written by datasets.save_to_disk",
            "pick a data file, or the folder that holds dataset_info.json",
        )
    _check_saved_files(path)
    try:
        loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
    except Exception as exc:
        raise UserError(f"{path.name}: cannot read the saved dataset ({_first_line(exc)})", "") from exc
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else next(iter(loaded))
        loaded = loaded[split]
    return loaded.to_list(), tuple(loaded.column_names)


def _check_saved_files(folder: Path) -> None:
    """Every file a ``save_to_disk`` folder names (state.json's arrow files, a DatasetDict's split folders) lies inside
    it once links are followed and is a regular file: datasets would read ``../x.arrow``, an absolute path or a link
    out of the folder, and block on a pipe."""
    splits = [folder]
    dict_file = folder / "dataset_dict.json"
    if dict_file.is_file():
        names = _small_json(regular_file(inside(folder, "dataset_dict.json", "split list"), "split list"), folder)
        split_names = names.get("splits") if isinstance(names, dict) else None
        if not isinstance(split_names, list) or not all(isinstance(n, str) for n in split_names):
            raise UserError(f"{folder.name}/dataset_dict.json lists no splits", "save the dataset again")
        splits = [inside(folder, name, "split folder") for name in split_names]
    for split in splits:
        for listed in ("dataset_info.json", "state.json"):
            if (split / listed).exists():
                regular_file(inside(split, listed, "dataset file"), "dataset file")
        state = _small_json(split / "state.json", folder) if (split / "state.json").exists() else {}
        files = state.get("_data_files") if isinstance(state, dict) else None
        for entry in files if isinstance(files, list) else []:
            filename = entry.get("filename") if isinstance(entry, dict) else None
            if not isinstance(filename, str) or not filename:
                raise UserError(f"{split.name}/state.json names a data file without a name", "save the dataset again")
            regular_file(inside(split, filename, "arrow file"), "arrow file")


def _small_json(path: Path, folder: Path) -> Any:
    """A small JSON file of a saved dataset (its lists and state), read with a size bound."""
    if path.stat().st_size > 16 * 1024**2:
        raise UserError(f"{folder.name}: {path.name} is too large for a dataset's state", "save the dataset again")
    try:
        return json.loads(path.read_text("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise UserError(f"{folder.name}: {path.name} is not valid JSON", "save the dataset again") from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


# -- shapes ----------------------------------------------------------------------------------------------------------


def detect_shape(columns: tuple[str, ...], where: str) -> Shape:
    names = set(columns)
    if "messages" in names:
        return "messages"
    if {"prompt", "completion"} <= names:
        return "prompt_completion"
    if "instruction" in names and names & set(OUTPUT_COLUMNS):
        return "instruction"
    if "text" in names:
        return "text"
    found = ", ".join(columns) if columns else "none"
    raise UserError(f"{where}: columns {found} match no dataset shape", f"accepted: {SHAPES_ACCEPTED}")


Conversation = tuple[list[dict[str, str]], list[dict[str, str]]]  # (prompt turns, completion turns)


def row_as_conversation(row: dict[str, Any], shape: Shape, where: str) -> Conversation | str:
    """A prompt/completion pair of chat turns, or plain text for ``text`` rows."""
    if shape == "text":
        return _text(row.get("text"), where, "text")
    if shape == "messages":
        return _split_chat(row.get("messages"), where)
    if shape == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):  # TRL's conversational prompt-completion
            return _turns(prompt, where), _turns(completion, where)
        return [_turn("user", _text(prompt, where, "prompt"))], [
            _turn("assistant", _text(completion, where, "completion"))
        ]
    instruction = _text(row.get("instruction"), where, "instruction")
    extra = row.get("input")
    if isinstance(extra, str) and extra.strip():
        instruction = f"{instruction}\n\n{extra}"
    output_column = next((c for c in OUTPUT_COLUMNS if row.get(c) is not None), OUTPUT_COLUMNS[0])
    return [_turn("user", instruction)], [_turn("assistant", _text(row.get(output_column), where, output_column))]


def _turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _text(value: Any, where: str, column: str) -> str:
    if not isinstance(value, str):
        kind = "empty" if value is None else f"a {type(value).__name__}"
        raise UserError(f"{where}: {column!r} is {kind}, not text", "every row needs text in that column")
    if not value.strip():
        raise UserError(f"{where}: {column!r} is empty", "remove the row or fill it in")
    return value


def _turns(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise UserError(
            f"{where}: 'messages' is not a list of turns", 'write [{"role": "user", "content": "..."}, ...]'
        )
    turns = []
    for n, turn in enumerate(value, 1):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise UserError(f"{where}: turn {n} needs a 'role' and a text 'content'", "")
        turns.append(_turn(turn["role"], turn["content"]))
    return turns


def _split_chat(value: Any, where: str) -> Conversation:
    turns = _turns(value, where)
    last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    if last is None:
        raise UserError(f"{where}: the chat has no assistant turn", "each chat needs an answer to learn from")
    if last == 0:
        raise UserError(f"{where}: the chat starts with the assistant's answer", "put the user's turn before it")
    return turns[:last], [turns[last]]  # turns after the last answer carry nothing to learn


# -- tokenising ------------------------------------------------------------------------------------------------------


def encode(tokenizer: Any, item: Conversation | str, *, completion_only: bool, source_row: int) -> Example:
    """Token ids and loss mask for one row, the way TRL's SFTTrainer tokenises it."""
    if isinstance(item, str):  # language modelling: all of it, ending in EOS
        eos = tokenizer.eos_token or ""
        text = item if item.endswith(eos) else item + eos
        ids = list(tokenizer(text=text)["input_ids"])
        return Example(ids, [1] * len(ids), source_row)
    prompt, completion = item
    if getattr(tokenizer, "chat_template", None):
        prompt_ids = list(
            apply_chat_template(tokenizer, prompt, tokenize=True, return_dict=True, add_generation_prompt=True)[
                "input_ids"
            ]
        )
        ids = list(apply_chat_template(tokenizer, prompt + completion, tokenize=True, return_dict=True)["input_ids"])
    else:  # no chat template: TRL's convention, prompt and completion joined as written (and the prompt is the
        # bare prompt at generation); turns of a multi-turn prompt are separated by a blank line
        eos = tokenizer.eos_token or ""
        prompt_text = "\n\n".join(t["content"] for t in prompt)
        answer = "\n\n".join(t["content"] for t in completion)
        answer = answer if answer.endswith(eos) else answer + eos
        prompt_ids = list(tokenizer(text=prompt_text)["input_ids"])
        ids = list(tokenizer(text=prompt_text + answer)["input_ids"])
    start = 0
    while start < min(len(prompt_ids), len(ids)) and prompt_ids[start] == ids[start]:
        start += 1
    mask = [0] * start + [1] * (len(ids) - start) if completion_only else [1] * len(ids)
    return Example(ids, mask, source_row)


def _encode_rows(
    rows: list[dict[str, Any]],
    shape: Shape,
    tokenizer: Any,
    name: str,
    *,
    completion_only: bool,
    cancel: CancelToken,
    report: Report,
) -> list[Example]:
    out = []
    for n, row in enumerate(rows, 1):
        if n % 64 == 0 or n == 1:  # the stage is said from the first row, with its count
            cancel.raise_if_cancelled()
            report(Progress(n, len(rows), f"preparing data: row {n}/{len(rows)}", "rows"))
        out.append(
            encode(
                tokenizer,
                row_as_conversation(row, shape, f"{name}, row {n}"),
                completion_only=completion_only,
                source_row=n,
            )
        )
    return out


def prepare(
    train_file: Path,
    tokenizer: Any,
    *,
    val_file: Path | None = None,
    val_fraction: float = 0.1,
    max_length: int = 512,
    completion_only: bool = True,
    seed: int = 42,
    cancel: CancelToken | None = None,
    report: Report = no_report,
) -> PreparedData:
    """Read, check and tokenise the training (and validation) data."""
    cancel = cancel or CancelToken()
    train_file = Path(train_file).expanduser()
    rows, columns = read_rows(train_file)
    if not rows:
        raise UserError(f"{train_file.name} has no rows", "a training set needs at least a few examples")
    shape = detect_shape(columns, train_file.name)
    train = _encode_rows(
        rows, shape, tokenizer, train_file.name, completion_only=completion_only, cancel=cancel, report=report
    )
    warnings: list[str] = []
    val: list[Example] = []
    if val_file is not None:
        val_file = Path(val_file).expanduser()
        val_rows, val_columns = read_rows(val_file)
        if not val_rows:
            raise UserError(f"{val_file.name} has no rows", "give a validation file with rows, or none")
        val = _encode_rows(
            val_rows,
            detect_shape(val_columns, val_file.name),
            tokenizer,
            val_file.name,
            completion_only=completion_only,
            cancel=cancel,
            report=report,
        )
        shared = {tuple(e.input_ids) for e in train} & {tuple(e.input_ids) for e in val}
        if shared:
            warnings.append(
                f"{len(shared)} validation row(s) also appear in the training data: the validation loss will look "
                "better than it is"
            )
    elif val_fraction > 0 and len(train) >= 2:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        held = max(1, round(len(train) * val_fraction))
        held_out = set(order[:held])
        val = [e for i, e in enumerate(train) if i in held_out]
        train = [e for i, e in enumerate(train) if i not in held_out]
    without_loss = [e.source_row for e in train if not any(e.completion_mask[:max_length])]
    if len(without_loss) == len(train):
        raise UserError(
            f"no training row has an answer within the first {max_length} tokens",
            "raise max length, or shorten the prompts",
        )
    if without_loss:
        warnings.append(
            f"{len(without_loss)} row(s) have no answer within {max_length} tokens and teach nothing "
            f"(first: row {without_loss[0]})"
        )
    too_long = sum(len(e.input_ids) > max_length for e in train + val)
    if too_long:
        longest = max(len(e.input_ids) for e in train + val)
        warnings.append(
            f"{too_long} row(s) are longer than {max_length} tokens (longest {longest}) and are cut at the end"
        )
    text_format = "chat_template" if getattr(tokenizer, "chat_template", None) or shape == "text" else "plain"
    return PreparedData(train, val, shape, columns, train_file, val_file, too_long, max_length, warnings, text_format)


def prepare_as_set(
    settings: TrainSettings,
    train_file: Path,
    tokenizer: Any,
    val_file: Path | None = None,
    *,
    cancel: CancelToken | None = None,
    report: Report = no_report,
) -> PreparedData:
    """:func:`prepare` with the data settings of a run (hold-out share, max length, loss mask, seed)."""
    return prepare(
        train_file,
        tokenizer,
        val_file=val_file,
        val_fraction=settings.val_fraction,
        max_length=settings.max_length,
        completion_only=settings.completion_only,
        seed=settings.seed,
        cancel=cancel,
        report=report,
    )


# -- preview ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreviewRow:
    """One row as the model sees it, in runs of text that do or do not carry the loss."""

    row: int
    pieces: tuple[tuple[str, bool], ...]  # (text, carries the loss)
    tokens: int
    truncated: bool


def preview(examples: list[Example], tokenizer: Any, *, max_length: int, rows: int = 5) -> list[PreviewRow]:
    out = []
    for example in examples[:rows]:
        ids, mask = example.input_ids[:max_length], example.completion_mask[:max_length]
        pieces: list[tuple[str, bool]] = []
        start = 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or mask[i] != mask[start]:
                pieces.append((tokenizer.decode(ids[start:i]), bool(mask[start])))
                start = i
        out.append(PreviewRow(example.source_row, tuple(pieces), len(ids), len(example.input_ids) > max_length))
    return out


def as_trainer_dataset(examples: list[Example]) -> Any:
    """A ``datasets.Dataset`` already tokenised: TRL builds the labels from ``completion_mask`` and truncates."""
    datasets = _datasets_quietly()
    return datasets.Dataset.from_dict(
        {"input_ids": [e.input_ids for e in examples], "completion_mask": [e.completion_mask for e in examples]}
    )
