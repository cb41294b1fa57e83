"""expo_engine.prompts: every format, written by the library that writes it for users; field detection; chat
extraction; seeded samples; one-line errors."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import shutil

import pytest

from expo_engine.errors import OptionError
from expo_engine.prompts import Prompt, load_prompts

CHAT = [  # system + user + assistant + user + assistant: the prompt is the first four turns, its text the 2nd user's
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Blue."},
]
CHAT_PROMPT = Prompt("Another?", CHAT[:4])


def write(path, text: str, mode="w"):
    with open(path, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
        f.write(text)
    return str(path)


def one_line_error(match: str, *args, **kwargs) -> str:
    with pytest.raises(OptionError, match=match) as e:
        load_prompts(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# Text and JSONL: today's behaviour


def test_text_file_one_prompt_a_line(tmp_path):
    path = write(tmp_path / "p.txt", "\ufeffWrite a haiku.\r\n\r\n  \r\nExplain DNS.\r\nlast, no newline")
    assert load_prompts(path) == [Prompt("Write a haiku.", None), Prompt("Explain DNS.", None),
                                  Prompt("last, no newline", None)]
    # any other extension is text too; a first line that is a JSON object makes it JSONL, as before
    assert load_prompts(write(tmp_path / "p.prompts", "a\nb\n")) == [Prompt("a", None), Prompt("b", None)]
    assert load_prompts(write(tmp_path / "q.txt", '{"prompt": "x"}\n')) == [Prompt("x", None)]


def test_jsonl_prompt_and_messages_per_line(tmp_path):
    lines = [json.dumps({"prompt": "Hello"}), "", json.dumps({"messages": CHAT}),
             json.dumps({"messages": CHAT[:2]})]
    path = write(tmp_path / "p.jsonl", "\ufeff" + "\r\n".join(lines) + "\r\n")
    assert load_prompts(path) == [Prompt("Hello", None), CHAT_PROMPT, Prompt("Name a colour.", CHAT[:2])]


def test_jsonl_bad_lines_are_named_by_their_line_in_the_file(tmp_path):
    path = write(tmp_path / "p.jsonl", '{"prompt": "ok"}\n\nnot json\n[1, 2]\n{"prompt": "ok"}\n')
    message = one_line_error(r"line\(s\) 3, 4 are not JSON objects holding a prompt \(line 3: not a JSON object\)",
                             path)
    assert message.startswith(f"--prompts {path}: ")
    path = write(tmp_path / "q.jsonl", '{"prompt": "ok"}\n{"prompt": 5}\n\n{"prompt": ""}\nnot json\n')
    one_line_error(r"line\(s\) 2, 4, 5 are not JSON objects holding a prompt \(line 2: `prompt` is int, not a string "
                   r"or a chat list\); fix or drop them", path)
    one_line_error(r"no line is a JSON object; JSONL holds one object a line", write(tmp_path / "r.jsonl", "a\n"))


# ---------------------------------------------------------------------------------------------------------------
# Chat lists


def test_chat_takes_the_turns_before_the_last_assistant_turn(tmp_path):
    path = write(tmp_path / "p.jsonl", json.dumps({"messages": CHAT}) + "\n")
    (p,) = load_prompts(path)
    assert p == CHAT_PROMPT and p.messages[-1] == {"role": "user", "content": "Another?"}
    # ending with a user turn (no response yet): all turns
    path = write(tmp_path / "r.jsonl", "\n".join(json.dumps({"messages": m}) for m in (CHAT[:4], CHAT[:2])) + "\n")
    assert load_prompts(path) == [CHAT_PROMPT, Prompt("Name a colour.", CHAT[:2])]
    # no user turn before the last assistant turn: an error naming the row
    path = write(tmp_path / "q.jsonl", "\n".join(json.dumps({"messages": m}) for m in (
        CHAT[:2], [CHAT[0], CHAT[2]])) + "\n")
    one_line_error(r"line\(s\) 2 are not JSON objects holding a prompt \(line 2: `messages` has no user turn "
                   r"before its last assistant", path)


def test_sharegpt_conversations_map_human_and_gpt(tmp_path):
    turns = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Name a colour."},
             {"from": "gpt", "value": "Red."}, {"from": "human", "value": "Another?"},
             {"from": "gpt", "value": "Blue."}]
    path = write(tmp_path / "sharegpt.json", json.dumps([{"id": "x", "conversations": turns}]))
    assert load_prompts(path) == [CHAT_PROMPT]


def test_trl_preference_parquet_takes_its_prompt_turns(tmp_path):
    """TRL's conversational preference format: `prompt` a chat list, `chosen`/`rejected` the completions."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"prompt": CHAT[:4], "chosen": [CHAT[4]], "rejected": [{"role": "assistant", "content": "Green."}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "trl.parquet")
    assert load_prompts(str(tmp_path / "trl.parquet")) == [CHAT_PROMPT]


# ---------------------------------------------------------------------------------------------------------------
# JSON, CSV, Parquet


def test_json_list_object_of_lists_and_json_lines(tmp_path):
    assert load_prompts(write(tmp_path / "a.json", json.dumps([{"prompt": "a"}, {"prompt": "b"}]))) == [
        Prompt("a", None), Prompt("b", None)]
    assert load_prompts(write(tmp_path / "b.json", json.dumps({"data": [{"prompt": "a"}]}))) == [Prompt("a", None)]
    assert load_prompts(write(tmp_path / "c.json", json.dumps(["x", "y"]))) == [Prompt("x", None), Prompt("y", None)]
    splits = write(tmp_path / "d.json", json.dumps({"train": [{"prompt": "t"}], "test": [{"prompt": "e"}]}))
    assert load_prompts(splits) == [Prompt("t", None)]
    assert load_prompts(splits, split="test") == [Prompt("e", None)]
    one_line_error(r"no split `dev` \(its splits: `train`, `test`\); pass --split", splits, split="dev")


def test_json_written_by_datasets_to_json_is_json_lines(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = str(tmp_path / "p.json")
    datasets.Dataset.from_list([{"prompt": "a"}, {"prompt": "b"}]).to_json(path)
    assert load_prompts(path) == [Prompt("a", None), Prompt("b", None)]


def test_alpaca_instruction_gets_its_input_after_a_blank_line(tmp_path):
    path = str(tmp_path / "alpaca.csv")
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "input", "output"])
        w.writerow(["Translate to French.", "Good morning", "Bonjour"])
        w.writerow(["Write a poem\nabout rain.", "", "..."])  # a quoted newline: one row over two lines
        w.writerow(["List three primes.", "  ", "2, 3, 5"])
    assert load_prompts(path) == [Prompt("Translate to French.\n\nGood morning", None),
                                  Prompt("Write a poem\nabout rain.", None), Prompt("List three primes.", None)]
    # AlpacaEval (no input column), in .tsv
    tsv = str(tmp_path / "eval.tsv")
    with open(tsv, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter="\t").writerows([["dataset", "instruction"], ["helpful_base", "What is 2+2?"]])
    assert load_prompts(tsv) == [Prompt("What is 2+2?", None)]


def test_csv_bad_rows_are_named_by_their_line(tmp_path):
    path = str(tmp_path / "p.csv")
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["prompt"], ["a"], [""], ["b\nc"], [""]])
    one_line_error(r"line\(s\) 3, 6 hold no prompt \(line 3: `prompt` is empty\)", path)


def test_parquet_written_by_pandas_and_pyarrow(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = str(tmp_path / "p.parquet")
    pd.DataFrame({"id": [1, 2], "prompt": ["a", "b"]}).to_parquet(path)
    assert load_prompts(path) == [Prompt("a", None), Prompt("b", None)]
    # UltraFeedback-binarized's columns: `prompt` is tried before `chosen` and `messages`
    table = pq.read_table(path).append_column("messages", [[CHAT, CHAT]]).append_column("chosen", [[CHAT, CHAT]])
    pq.write_table(table, path, row_group_size=1)
    assert load_prompts(path) == [Prompt("a", None), Prompt("b", None)]
    assert load_prompts(path, field="messages") == [CHAT_PROMPT, CHAT_PROMPT]
    bad = str(tmp_path / "n.parquet")
    pd.DataFrame({"prompt": ["a", None, "b", ""]}).to_parquet(bad)
    one_line_error(r"row\(s\) at index 1, 3 hold no prompt \(index 1: none of `prompt` is set\)", bad)


# ---------------------------------------------------------------------------------------------------------------
# Field detection


def test_field_detection_order_and_explicit_field(tmp_path):
    rows = [{"instruction": "i", "prompt": "p", "question": "q"}]
    path = write(tmp_path / "p.jsonl", json.dumps(rows[0]) + "\n")
    assert load_prompts(path) == [Prompt("p", None)]
    assert load_prompts(path, field="question") == [Prompt("q", None)]
    message = one_line_error(r"has no field `text` \(its fields: `instruction`, `prompt`, `question`\); pass "
                             r"--prompt-field", path, field="text")
    assert message.startswith(f"--prompts {path}: ")


def test_chosen_chat_lists_are_prompts_plain_strings_are_not(tmp_path):
    path = write(tmp_path / "uf.jsonl", json.dumps({"chosen": CHAT, "rejected": CHAT}) + "\n")
    assert load_prompts(path) == [CHAT_PROMPT]
    hh = "\n\nHuman: Hi\n\nAssistant: Hello"
    path = write(tmp_path / "hh.jsonl", json.dumps({"chosen": hh, "rejected": hh}) + "\n")
    one_line_error(r"no prompt field found \(its fields: `chosen`, `rejected`; tried: `prompt`, `instruction`, "
                   r"`messages`, `conversations`, `chosen`; its `chosen` holds plain strings .*\); pass --prompt-field",
                   path)
    path = write(tmp_path / "hh2.jsonl", json.dumps({"prompt": "Hi", "chosen": hh}) + "\n")
    assert load_prompts(path) == [Prompt("Hi", None)]


def test_missing_field_names_columns_tried_fields_and_the_flag(tmp_path):
    path = str(tmp_path / "p.csv")
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["question", "answer"], ["q", "a"]])
    one_line_error(r"no prompt field found \(its fields: `question`, `answer`; tried: `prompt`, `instruction`, "
                   r"`messages`, `conversations`, `chosen`\); pass --prompt-field naming", path)


# ---------------------------------------------------------------------------------------------------------------
# --limit


def test_limit_is_a_seeded_sample_in_file_order(tmp_path):
    path = write(tmp_path / "p.jsonl", "".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(50)))
    every = [p.text for p in load_prompts(path)]
    picked = [p.text for p in load_prompts(path, limit=10)]
    assert picked == [f"p{i}" for i in _sample(50, 10, 42)] == load_prompts_texts(path, limit=10)  # documented, stable
    assert picked == sorted(picked, key=every.index) and picked != every[:10]  # file order, not the first ten
    assert picked != load_prompts_texts(path, limit=10, seed=7)
    assert load_prompts_texts(path, limit=50) == every and load_prompts_texts(path, limit=999) == every
    text = write(tmp_path / "p.txt", "".join(f"t{i}\n" for i in range(50)))
    assert load_prompts_texts(text, limit=10) == [t.replace("p", "t") for t in picked]  # same rows, any format
    for bad in (0, -1, 2.5, True):
        one_line_error(r"--limit .*: give a whole number of prompts, 1 or more", path, limit=bad)


def test_limit_samples_parquet_and_datasets_rows_alike(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"prompt": f"p{i}", "id": i} for i in range(50)])
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    want = [f"p{i}" for i in _sample(50, 10, 3)]
    assert load_prompts_texts(str(tmp_path / "p.parquet"), limit=10, seed=3) == want
    assert load_prompts_texts(str(tmp_path / "saved"), limit=10, seed=3) == want


def test_limit_reads_only_the_sampled_rows(tmp_path):
    rows = [{"prompt": f"p{i}"} for i in range(20)]
    rows[3] = {"prompt": ""}
    path = write(tmp_path / "p.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    one_line_error(r"line\(s\) 4 are not JSON objects holding a prompt", path)
    seed = next(s for s in range(100) if 3 not in random.Random(s).sample(range(20), 5))
    assert load_prompts_texts(path, limit=5, seed=seed) == [f"p{i}" for i in _sample(20, 5, seed)]
    seed = next(s for s in range(100) if 3 in random.Random(s).sample(range(20), 5))
    one_line_error(r"line\(s\) 4 are not JSON objects holding a prompt", path, limit=5, seed=seed)


def _sample(count, limit, seed):
    return sorted(random.Random(seed).sample(range(count), limit))


def load_prompts_texts(path, **kwargs) -> list[str]:
    return [p.text for p in load_prompts(path, **kwargs)]


# ---------------------------------------------------------------------------------------------------------------
# datasets: save_to_disk folders and the Hugging Face cache


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    one = datasets.Dataset.from_list([{"messages": CHAT}, {"messages": CHAT[:2]}])
    one.save_to_disk(str(tmp_path / "one"))
    assert load_prompts(str(tmp_path / "one")) == [CHAT_PROMPT, Prompt("Name a colour.", CHAT[:2])]
    one_line_error(r"holds one dataset, not a DatasetDict with a split `test`: drop --split", str(tmp_path / "one"),
                   split="test")
    train, test = (datasets.Dataset.from_list([{"prompt": t}]) for t in ("t", "e"))
    datasets.DatasetDict(train=train, test=test).save_to_disk(str(tmp_path / "dict"))
    assert load_prompts(str(tmp_path / "dict")) == [Prompt("t", None)]
    assert load_prompts(str(tmp_path / "dict"), split="test") == [Prompt("e", None)]
    one_line_error(r"no split `dev` \(its splits: `train`, `test`\); pass --split", str(tmp_path / "dict"),
                   split="dev")
    datasets.DatasetDict(eval=test).save_to_disk(str(tmp_path / "only"))
    assert load_prompts(str(tmp_path / "only")) == [Prompt("e", None)]  # the only split
    datasets.DatasetDict(train_prefs=train, test_prefs=test).save_to_disk(str(tmp_path / "uf"))
    one_line_error(r"holds several splits \(`train_prefs`, `test_prefs`\) and none is `train`; pass --split",
                   str(tmp_path / "uf"))
    assert load_prompts(str(tmp_path / "uf"), split="test_prefs") == [Prompt("e", None)]


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty Hugging Face caches (datasets' and the Hub's) for this test only."""
    datasets = pytest.importorskip("datasets")
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return datasets, str(tmp_path / "datasets-cache"), str(tmp_path / "hub")


def test_hub_dataset_prepared_by_load_dataset(caches, tmp_path):
    """What `load_dataset("org/tiny")` leaves in datasets' cache, written by datasets' own Json builder (the one a
    Hub load of JSON files runs) under the name and config a Hub load gives it."""
    datasets, cache, _ = caches
    from datasets.packaged_modules.json.json import Json

    files = {}
    for split, rows in (("train", [{"prompt": "t0"}, {"prompt": "t1"}]), ("test", [{"prompt": "e0"}])):
        files[split] = write(tmp_path / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    # A Hub load names its folder ORG___NAME/default/...; a local build (repo_id None) names it NAME, so build it
    # aside and move it: the layout load_dataset's offline fallback reads.
    Json(cache_dir=str(tmp_path / "build"), dataset_name="tiny", config_name="default", config_id="default",
         hash="0" * 16, data_files=files).download_and_prepare()
    os.makedirs(cache)
    shutil.move(str(tmp_path / "build" / "tiny"), os.path.join(cache, "org___tiny"))
    assert load_prompts("org/tiny") == [Prompt("t0", None), Prompt("t1", None)]
    assert load_prompts("org/tiny", split="test") == [Prompt("e0", None)]
    one_line_error(r"no split `dev` \(its splits: `train`, `test`\)", "org/tiny", split="dev")


def fake_hub_dataset(hub: str, repo: str, files: dict[str, bytes], commit: str) -> str:
    """huggingface_hub's cache layout for a dataset repo: datasets--ORG--NAME/{blobs/<sha256>, refs/main,
    snapshots/<commit>/<path>} with every snapshot file a relative link into blobs/."""
    repo_dir = os.path.join(hub, "datasets--" + repo.replace("/", "--"))
    snap = os.path.join(repo_dir, "snapshots", commit)
    os.makedirs(os.path.join(repo_dir, "blobs"))
    os.makedirs(os.path.join(repo_dir, "refs"))
    write(os.path.join(repo_dir, "refs", "main"), commit)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        write(os.path.join(repo_dir, "blobs", blob), data, "wb")
        link = os.path.join(snap, name)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(os.path.join(repo_dir, "blobs", blob), os.path.dirname(link)), link)
    return snap


def test_hub_dataset_files_in_the_hub_cache(caches, tmp_path):
    """What `hf download --repo-type dataset org/name` leaves: the repo's parquet files, split by their names."""
    datasets, _, hub = caches
    parts = {}
    for split, texts in (("train", ["a", "b"]), ("test", ["c"])):
        datasets.Dataset.from_list([{"instruction": t} for t in texts]).to_parquet(str(tmp_path / f"{split}.pq"))
        with open(tmp_path / f"{split}.pq", "rb") as f:
            parts[f"data/{split}-00000-of-00001.parquet"] = f.read()
    fake_hub_dataset(hub, "org/eval", parts, "e" * 40)
    assert load_prompts("org/eval") == [Prompt("a", None), Prompt("b", None)]
    assert load_prompts("org/eval", split="test") == [Prompt("c", None)]
    assert load_prompts("org/eval@main", split="test") == [Prompt("c", None)]
    assert load_prompts("org/eval@" + "e" * 40) == [Prompt("a", None), Prompt("b", None)]
    one_line_error(r"no split `dev` \(its splits: `train`, `test`\)", "org/eval", split="dev")


def test_repo_id_not_in_the_cache(caches):
    message = one_line_error(r"no such file or folder, and no dataset org/absent in the Hugging Face cache .*"
                             r"load it once with datasets.load_dataset\('org/absent'\)", "org/absent")
    assert message.startswith("--prompts org/absent: ")
    one_line_error(r"--prompts \./absent\.jsonl: no such file or folder$", "./absent.jsonl")


def test_folder_without_a_dataset(caches, tmp_path):
    os.makedirs(tmp_path / "empty")
    one_line_error(r"a folder with no dataset in it: neither written by save_to_disk nor holding data files",
                   str(tmp_path / "empty"))


# ---------------------------------------------------------------------------------------------------------------
# Files that are not what their extension says; empty sets; options that do not apply


def test_files_that_are_not_what_their_extension_says(tmp_path):
    pytest.importorskip("pyarrow")
    path = write(tmp_path / "p.parquet", "prompt\nhello\n")
    one_line_error(rf"--prompts {path}: is not a Parquet file \(", path)
    path = write(tmp_path / "p.json", '[{"prompt": "a"},\n')
    one_line_error(rf"--prompts {path}: is not JSON \(.* at line 2, column 1\); a .json file holds", path)
    path = write(tmp_path / "q.json", '{"prompt": "a"}\n{"prompt": \n')  # broken JSON Lines are not JSON either
    one_line_error(rf"--prompts {path}: is not JSON", path)
    path = write(tmp_path / "c.json", json.dumps({"prompt": {"0": "a"}}))  # pandas' default orient
    one_line_error(r"is one JSON object with no list of records in it; give a list of objects", path)
    path = write(tmp_path / "p.csv", b"PAR1\x15\x04\x15\xff\xfe\x00", "wb")
    one_line_error(rf"--prompts {path}: cannot read it as UTF-8 text", path)
    path = write(tmp_path / "p.jsonl", b"\x89PNG\r\n\x1a\n\xff\xd8", "wb")
    one_line_error(rf"--prompts {path}: cannot read it as UTF-8 text", path)


def test_empty_sets(tmp_path):
    for name, text in (("p.jsonl", "\n \n"), ("p.txt", ""), ("p.json", "[]"), ("q.json", '{"data": []}'),
                       ("p.csv", "prompt\r\n"), ("r.json", '["", " "]')):
        one_line_error(r"holds no prompt$", write(tmp_path / name, text))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "e.parquet")
    one_line_error(r"holds no prompt$", str(tmp_path / "e.parquet"))


def test_options_that_do_not_apply(tmp_path):
    text = write(tmp_path / "p.txt", "a\n")
    one_line_error(r"read as a text file of one prompt a line, which has no field `prompt`; drop --prompt-field",
                   text, field="prompt")
    path = write(tmp_path / "p.jsonl", '{"prompt": "a"}\n')
    one_line_error(r"--split test applies to a dataset folder.*: drop --split", path, split="test")
    path = write(tmp_path / "p.json", '[{"prompt": "a"}]')
    one_line_error(r"--split test: this file is one list, with no splits: drop --split", path, split="test")


def test_a_tsv_keeps_quotes_as_written(tmp_path):
    """Tab-separated fields are taken as they are: a prompt that begins with a quote keeps it."""
    path = tmp_path / "q.tsv"
    path.write_text('prompt\tid\n"Quote" me on this\t1\nplain\t2\n')
    assert [p.text for p in load_prompts(str(path))] == ['"Quote" me on this', "plain"]


def test_prompts_know_their_rows(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a\n\nb\nc\n")
    assert [p.row for p in load_prompts(str(path))] == [1, 3, 4]
    assert [p.row for p in load_prompts(str(path), limit=2, seed=1)] == [p.row for p in load_prompts(
        str(path), limit=2, seed=1)]
