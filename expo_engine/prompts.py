"""The prompts of `expo search`, read as users have them.

`load_prompts(path)` reads:

- a text file (`.txt` or any other extension): one prompt a line; blank lines are skipped, a UTF-8 byte-order mark
  and CRLF line ends are not part of the prompt. A text file whose first non-blank line starts with `{` is JSONL;
- `.jsonl` / `.ndjson`: one JSON object a line (blank lines skipped);
- `.json`: a list of objects (or of strings: one prompt each), an object holding one list of them (`{"data": [...]}`;
  with several, they are the splits: `split` picks), or JSON Lines under a `.json` name (as `Dataset.to_json` writes);
- `.parquet`, `.csv`, `.tsv` (a header row, then one row a prompt);
- a folder written by `datasets`' `save_to_disk` (a Dataset, or a DatasetDict: `split` picks, by default `train` or
  the only split), or any other folder of data files that `datasets.load_dataset(folder)` reads;
- `org/name[@revision]`, a dataset in the Hugging Face cache, never downloaded: the prepared copy that
  `datasets.load_dataset("org/name")` left in HF_DATASETS_CACHE, else the repo's files that huggingface_hub left in
  HF_HUB_CACHE (`hf download --repo-type dataset org/name`). A revision reads the latter only.

Each row gives one prompt, from `field` or else from the first of FIELDS that the row holds: a string is a plain
prompt; a chat list (`[{"role", "content"}, ...]` as TRL and UltraFeedback store it, or ShareGPT's
`[{"from", "value"}, ...]` with human/gpt read as user/assistant) gives the turns before its last assistant turn
(all of them when a user turn follows it, as in TRL's conversational `prompt`), whose last user turn is the prompt's
text; the turns are {"role", "content"} dicts. `instruction` (Alpaca, AlpacaEval) gets a non-empty `input` of the same
row appended after a blank line, as Alpaca's own prompt template does. A `chosen` that is a plain string (a whole
conversation, as some preference sets store it) is not a prompt, and is not picked unless named.

Reading parquet needs pyarrow; folders and Hub datasets need `datasets` (both in the `search` extra).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import OptionError

FIELDS = ("prompt", "instruction", "messages", "conversations", "chosen")  # tried in this order, row by row
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
                  "bard": "assistant"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHOWN = 5  # bad rows named in an error


@dataclass(frozen=True)
class Prompt:
    text: str  # the prompt, or a chat prompt's last user turn (what --reward-fn and --reward-cmd get)
    messages: list | None  # the turns of a chat prompt, those before its last assistant turn; None for plain text
    row: int | None = field(default=None, compare=False)  # where it was read: a file's line (from 1), else an index


@dataclass
class _Table:
    """Rows read lazily: `fetch(columns, indexes)` gives those rows (all when None) with those columns only."""

    columns: list[str]
    count: int
    fetch: Callable[[list[str], list[int] | None], list[dict]]
    unit: str = "row"  # how errors name a row: "line" (numbers are file lines, from 1) or "row" (indexes, from 0)
    numbers: list[int] | None = None  # the file line of each row, for unit "line"
    fault: str = "hold no prompt"  # what errors say of rows without a prompt


def load_prompts(path: str, *, field: str | None = None, split: str | None = None, limit: int | None = None,
                 seed: int = 42) -> list[Prompt]:
    """Read the prompts of `path` (a file, a dataset folder or a cached Hub dataset id; see the module docstring).

    `field` names the column to read (else FIELDS are tried per row), `split` the split of a dataset with several,
    `limit` keeps a sample of that many rows (random.Random(seed), then in file order; all rows when the set is not
    larger). Only the sampled rows must hold a prompt. Every problem is one OptionError line that says what to do.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise OptionError(f"--limit {limit}: give a whole number of prompts, 1 or more")
    label = f"--prompts {path}"
    source = _open(path, split, label)
    if isinstance(source, list):  # plain text, one prompt a line
        if field is not None:
            raise OptionError(f"{label}: read as a text file of one prompt a line, which has no field "
                              f"`{field}`; drop --prompt-field, or give a .jsonl, .json, .csv or .parquet file")
        if not source:
            raise OptionError(f"{label}: holds no prompt")
        return [source[i] for i in _sample(len(source), limit, seed)]
    if source.count == 0:
        raise OptionError(f"{label}: holds no prompt")
    if field is not None and field not in source.columns:
        raise OptionError(f"{label}: has no field `{field}` (its fields: {_names(source.columns)}); "
                          "pass --prompt-field with one of them")
    tried = [field] if field is not None else [f for f in FIELDS if f in source.columns]
    if not tried:
        raise _missing_field(label, source.columns)
    wanted = tried + (["input"] if "instruction" in tried and "input" in source.columns else [])
    picked = _sample(source.count, limit, seed)
    rows = source.fetch(wanted, None if len(picked) == source.count else picked)
    prompts, bad, why = [], [], ""
    for i, row in zip(picked, rows, strict=True):
        name = None if row is None else field if field is not None else _first_present(row)
        if row is None:  # a JSONL line that is not a JSON object
            got = "not a JSON object"
        elif name is None:
            got = f"none of {_names(tried)} is set"
        else:
            got = _to_prompt(row, name)
            if isinstance(got, Prompt):
                prompts.append(dataclasses.replace(got, row=source.numbers[i] if source.numbers is not None else i))
                continue
        bad.append(source.numbers[i] if source.numbers is not None else i)
        why = why or f"{'line' if source.unit == 'line' else 'index'} {bad[0]}: {got}"
    if bad and not prompts and field is None and not any(_first_present(row) for row in rows if row is not None):
        raise _missing_field(label, source.columns)
    if bad:
        where = ", ".join(map(str, bad[:_SHOWN])) + (f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else "")
        unit = "line(s)" if source.unit == "line" else "row(s) at index"
        raise OptionError(f"{label}: {unit} {where} {source.fault} ({why}); fix or drop them, or pass "
                          "--prompt-field to read another field")
    return prompts


def _sample(count: int, limit: int | None, seed: int) -> list[int]:
    if limit is None or limit >= count:
        return list(range(count))
    return sorted(random.Random(seed).sample(range(count), limit))


def _names(columns) -> str:
    return ", ".join(f"`{c}`" for c in columns) if columns else "none"


def _missing_field(label: str, columns: list[str]) -> OptionError:
    note = ("; its `chosen` holds plain strings (whole conversations), not chat turns" if "chosen" in columns
            else "")
    return OptionError(f"{label}: no prompt field found (its fields: {_names(columns)}; tried: {_names(FIELDS)}"
                       f"{note}); pass --prompt-field naming the one that holds the prompts")


def _first_present(row: dict) -> str | None:
    for name in FIELDS:
        value = row.get(name)
        if value is not None and not (name == "chosen" and not isinstance(value, list)):
            return name
    return None


def _to_prompt(row: dict, name: str) -> Prompt | str:
    """The row's prompt from field `name`, or why there is none."""
    value = row.get(name)
    if isinstance(value, str):
        if not value.strip():
            return f"`{name}` is empty"
        extra = row.get("input") if name == "instruction" else None
        if isinstance(extra, str) and extra.strip():
            value = f"{value}\n\n{extra}"
        return Prompt(value, None)
    if isinstance(value, list):
        return _chat(value, name)
    return f"`{name}` is {'missing' if value is None else type(value).__name__}, not a string or a chat list"


def _chat(turns: list, name: str) -> Prompt | str:
    messages = []
    for k, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            return f"`{name}` turn {k} is not an object"
        role, content = turn.get("role"), turn.get("content")
        if role is None and turn.get("from") is not None:  # ShareGPT
            role = SHAREGPT_ROLES.get(turn["from"], turn["from"])
        if content is None:
            content = turn.get("value")
        if not isinstance(role, str) or not isinstance(content, str):
            return f"`{name}` turn {k} lacks a string role and content ({{\"role\", \"content\"}} or ShareGPT's " \
                   "{\"from\", \"value\"})"
        messages.append({"role": role, "content": content})
    # A conversation ends with its response: the prompt is what precedes the last assistant turn. A list ending with
    # a user turn after it (TRL's conversational `prompt`, a multi-turn prompt) awaits its response: it is whole.
    assistant = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if assistant and not any(m["role"] == "user" for m in messages[assistant[-1]:]):
        messages = messages[:assistant[-1]]
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users:
        return f"`{name}` has no user turn" + (" before its last assistant turn" if assistant else "")
    if not users[-1].strip():
        return f"`{name}`'s last user turn is empty"
    return Prompt(users[-1], messages)


# ---------------------------------------------------------------------------------------------------------------
# Readers: a text file gives its prompts, every other source a _Table


def _open(path: str, split: str | None, label: str) -> list[Prompt] | _Table:
    local = os.path.expanduser(path)
    if os.path.isdir(local):
        return _dataset_table(_open_folder(local, label), split, label)
    if not os.path.exists(local):
        repo_id, _, revision = path.partition("@")
        if _REPO_ID.match(repo_id) and not path.startswith((".", "/", "~")):
            return _dataset_table(_open_hub(repo_id, revision or None, label), split, label)
        raise OptionError(f"{label}: no such file or folder")
    suffix = os.path.splitext(local)[1].lower()
    if split is not None and suffix != ".json":
        raise OptionError(f"{label}: --split {split} applies to a dataset folder, a Hub dataset or a .json object "
                          "of lists; this file has no splits: drop --split")
    if suffix == ".parquet":
        return _parquet(local, label)
    if suffix in (".csv", ".tsv"):
        return _csv(local, label, "\t" if suffix == ".tsv" else ",")
    if suffix == ".json":
        return _json(local, split, label)
    lines = _text_lines(local, label)
    if not lines:
        raise OptionError(f"{label}: holds no prompt")
    if not (suffix in (".jsonl", ".ndjson") or lines[0][1].lstrip().startswith("{")):
        return [Prompt(line, None, number) for number, line in lines]
    return _json_lines(lines, label)


def _text_lines(path: str, label: str) -> list[tuple[int, str]]:
    """(line number, line) of the non-blank lines."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a UTF-8 byte-order mark is not part of line 1
            lines = [line.rstrip("\r\n") for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise OptionError(f"{label}: cannot read it as UTF-8 text ({e})") from None
    return [(k, line) for k, line in enumerate(lines, 1) if line.strip()]


def _rows_table(rows: list[dict | None], unit: str = "row", numbers: list[int] | None = None) -> _Table:
    columns = list(dict.fromkeys(key for row in rows if row is not None for key in row))
    return _Table(columns, len(rows),
                  lambda wanted, picked: [rows[i] for i in picked] if picked is not None else rows, unit, numbers)


def _json_lines(lines: list[tuple[int, str]], label: str) -> _Table:
    """One row a line; a line that is not a JSON object is a None row, reported with the rows that hold no prompt."""
    rows = []
    for _, line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        rows.append(rec if isinstance(rec, dict) else None)
    if all(row is None for row in rows):
        raise OptionError(f"{label}: no line is a JSON object; JSONL holds one object a line, with a string "
                          "`prompt` or a `messages` list of {\"role\", \"content\"} turns")
    table = _rows_table(rows, "line", [k for k, _ in lines])
    table.fault = "are not JSON objects holding a prompt"
    return table


def _json(path: str, split: str | None, label: str) -> list[Prompt] | _Table:
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise OptionError(f"{label}: cannot read it as UTF-8 text ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        lines = [(k, line) for k, line in enumerate(text.splitlines(), 1) if line.strip()]
        if len(lines) > 1 and all(_is_object(line) for _, line in lines):  # JSON Lines named .json
            if split is not None:
                raise OptionError(f"{label}: --split {split}: this file (JSON Lines) has no splits: "
                                  "drop --split") from None
            return _rows_table([json.loads(line) for _, line in lines], "line", [k for k, _ in lines])
        raise OptionError(f"{label}: is not JSON ({e.msg} at line {e.lineno}, column {e.colno}); a .json file "
                          "holds a list of objects, an object holding one such list, or one object a line") from None
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if not lists:
            raise OptionError(f"{label}: is one JSON object with no list of records in it; give a list of objects "
                              "(pandas: to_json(orient='records')) or JSON Lines")
        key = lists[0] if len(lists) == 1 and split is None else _pick_split(lists, split, label)
        data = data[key]
    elif split is not None:
        raise OptionError(f"{label}: --split {split}: this file is one list, with no splits: drop --split")
    if not isinstance(data, list):
        raise OptionError(f"{label}: holds a JSON {type(data).__name__}, not a list of objects")
    if data and all(isinstance(item, str) for item in data):
        return [Prompt(item, None) for item in data if item.strip()]  # blank ones skipped, as in a text file
    bad = [i for i, item in enumerate(data) if not isinstance(item, dict)]
    if bad:
        raise OptionError(f"{label}: items at index {', '.join(map(str, bad[:_SHOWN]))}"
                          f"{f' and {len(bad) - _SHOWN} more' if len(bad) > _SHOWN else ''} are not JSON objects")
    return _rows_table(data)


def _is_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _csv(path: str, label: str, delimiter: str) -> _Table:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            # a .tsv is tab-separated fields as they are: no quote handling (a prompt may begin with a quote)
            reader = csv.DictReader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else
                                    csv.QUOTE_MINIMAL)
            rows, numbers = [], []
            for row in reader:
                rows.append(row)
                numbers.append(reader.line_num)
            columns = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError) as e:
        raise OptionError(f"{label}: cannot read it as UTF-8 text ({e})") from None
    except csv.Error as e:
        raise OptionError(f"{label}: is not CSV ({e})") from None
    table = _rows_table(rows, "line", numbers)
    table.columns = [c for c in columns if c]
    return table


def _parquet(path: str, label: str) -> _Table:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise OptionError(f"{label}: reading Parquet needs pyarrow: pip install pyarrow "
                          "(or expo-engine[search])") from None
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise OptionError(f"{label}: is not a Parquet file ({e})") from None

    def fetch(wanted: list[str], picked: list[int] | None) -> list[dict]:
        table = pf.read(columns=wanted)
        return (table.take(picked) if picked is not None else table).to_pylist()

    return _Table(list(pf.schema_arrow.names), pf.metadata.num_rows, fetch)


# ---------------------------------------------------------------------------------------------------------------
# datasets: save_to_disk folders, folders of data files, the Hugging Face cache


def _datasets(label: str):
    try:
        import datasets
    except ImportError:
        raise OptionError(f"{label}: reading a dataset folder or a Hub dataset needs the `datasets` package: "
                          "pip install datasets (or expo-engine[search])") from None
    return datasets


def _open_folder(folder: str, label: str):
    datasets = _datasets(label)
    if os.path.isfile(os.path.join(folder, "dataset_dict.json")) or os.path.isfile(os.path.join(folder, "state.json")):
        try:
            return datasets.load_from_disk(folder)
        except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
            raise OptionError(f"{label}: a save_to_disk folder that datasets cannot load ({_line(e)})") from None
    try:
        return datasets.load_dataset(folder)
    except (FileNotFoundError, datasets.exceptions.DatasetsError) as e:
        raise OptionError(f"{label}: a folder with no dataset in it: neither written by save_to_disk nor holding "
                          f"data files that datasets can read ({_line(e)})") from None
    except ValueError as e:  # several configurations, or files it cannot parse
        raise OptionError(f"{label}: datasets cannot load this folder ({_line(e)}); give one of its files") from None


def _open_hub(repo_id: str, revision: str | None, label: str):
    datasets = _datasets(label)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if revision is None:
        # What load_dataset(repo_id) prepared: datasets' own cache layout, ORG___NAME/CONFIG/VERSION/HASH/, read
        # by the builder load_dataset itself falls back on offline (never the network).
        from datasets.naming import camelcase_to_snakecase
        from datasets.packaged_modules.cache.cache import Cache

        org, name = repo_id.split("/")
        prepared = os.path.join(str(datasets.config.HF_DATASETS_CACHE), f"{org}___{camelcase_to_snakecase(name)}")
        if glob.glob(os.path.join(glob.escape(prepared), "*", "*", "*", "dataset_info.json")):
            try:
                builder = Cache(repo_id=repo_id, dataset_name=name, version="auto", hash="auto")
                builder.download_and_prepare()
                return builder.as_dataset()
            except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
                raise OptionError(f"{label}: cannot read its copy in the datasets cache {prepared} ({_line(e)}); "
                                  "give a file or a save_to_disk folder of the configuration you want") from None
    try:
        folder = snapshot_download(repo_id, repo_type="dataset", revision=revision, local_files_only=True)
    except LocalEntryNotFoundError as e:
        folder = getattr(e, "snapshot_path", None)  # huggingface_hub >= 1: cached, but not every file of the repo
    except (OSError, ValueError):
        folder = None
    if not folder or not os.path.isdir(folder):
        label_id = f"{repo_id}@{revision}" if revision else repo_id
        raise OptionError(
            f"{label}: no such file or folder, and no dataset {label_id} in the Hugging Face cache (prepared in "
            f"{datasets.config.HF_DATASETS_CACHE}, or files in {constants.HF_HUB_CACHE}); prompts are never "
            f"downloaded: load it once with datasets.load_dataset('{repo_id}') or `hf download --repo-type "
            f"dataset {repo_id}`, or give a file")
    return _open_folder(str(folder), label)


def _dataset_table(data, split: str | None, label: str) -> _Table:
    """A datasets Dataset, or the split of a DatasetDict, as a _Table."""
    if hasattr(data, "keys"):  # DatasetDict
        data = data[_pick_split(list(data.keys()), split, label)]
    elif split is not None and str(data.split or "") != split:
        raise OptionError(f"{label}: holds one dataset{f' (split {data.split})' if data.split else ''}, "
                          f"not a DatasetDict with a split `{split}`: drop --split")

    def fetch(wanted: list[str], picked: list[int] | None) -> list[dict]:
        part = data.select_columns(wanted)
        return (part.select(picked) if picked is not None else part).to_list()

    return _Table(list(data.column_names), len(data), fetch)


def _pick_split(splits: list[str], split: str | None, label: str) -> str:
    if split is not None:
        if split in splits:
            return split
        raise OptionError(f"{label}: no split `{split}` (its splits: {_names(splits)}); pass --split with one of them")
    if "train" in splits:
        return "train"
    if len(splits) == 1:
        return splits[0]
    raise OptionError(f"{label}: holds several splits ({_names(splits)}) and none is `train`; pass --split "
                      "with one of them")


def _line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
