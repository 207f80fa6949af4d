"""Prompt import: every format, and malformed files that must change nothing and say where and why."""

import json

import pytest
from conftest import SHARED_DATA
from sqlmodel import Session

from alignloop.cli import main
from alignloop.core import crud
from alignloop.core.prompts import ImportFileError, parse_prompt_file


def write(path, text: str | bytes):
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jsonl(*records) -> str:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n"


# --- formats -------------------------------------------------------------------------------------------------


def test_plain_and_chat_jsonl(tmp_path):
    f = write(
        tmp_path / "p.jsonl",
        jsonl(
            {"prompt": "  Hello there  ", "tags": "a, b", "split": "eval"},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
            {"prompt": [{"role": "user", "content": "conversational prompt"}]},
        ),
    )
    prompts = parse_prompt_file(f)
    assert prompts[0].messages == [{"role": "user", "content": "Hello there"}]
    assert (prompts[0].split, prompts[0].tags) == ("eval", ["a", "b"])
    assert [m["role"] for m in prompts[1].messages] == ["system", "user"]
    assert prompts[2].messages[0]["content"] == "conversational prompt"


def test_dolly_puts_context_into_the_user_turn(tmp_path):
    record = {
        "instruction": "Summarise this.",
        "context": "A long text.",
        "response": "Short.",
        "category": "summarization",
    }
    prompts = parse_prompt_file(write(tmp_path / "d.jsonl", jsonl(record)), fmt="dolly")
    assert prompts[0].messages == [{"role": "user", "content": "Summarise this.\n\nA long text."}]
    assert prompts[0].meta == {"category": "summarization"} and prompts[0].tags == ["summarization"]
    no_context = parse_prompt_file(write(tmp_path / "d2.jsonl", jsonl(record | {"context": ""})))
    assert no_context[0].messages[0]["content"] == "Summarise this."


def test_alpaca(tmp_path):
    f = write(tmp_path / "a.json", json.dumps([{"instruction": "Add", "input": "2 and 3", "output": "5"}]))
    assert parse_prompt_file(f)[0].messages[0]["content"] == "Add\n\n2 and 3"


def test_csv(tmp_path):
    f = write(tmp_path / "p.csv", 'prompt,split,tags\n"Hello, world",train,x\n"multi\nline",eval,\n')
    prompts = parse_prompt_file(f)
    assert [p.messages[0]["content"] for p in prompts] == ["Hello, world", "multi\nline"]
    assert prompts[1].split == "eval"
    dolly_csv = write(tmp_path / "d.csv", "instruction,context,category\nName a colour,,brainstorm\n")
    assert parse_prompt_file(dolly_csv)[0].meta == {"category": "brainstorm"}


def test_vicuna_bench_questions_import(tmp_path):
    prompts = parse_prompt_file(SHARED_DATA / "vicuna_bench_questions.jsonl")
    assert len(prompts) == 80
    assert prompts[0].meta["question_id"] == 1 and prompts[0].tags == [prompts[0].meta["category"]]


def test_mtbench_keeps_later_turns_in_meta(tmp_path):
    f = write(
        tmp_path / "q.jsonl", jsonl({"question_id": 81, "category": "writing", "turns": ["First?", "Then?"]})
    )
    (prompt,) = parse_prompt_file(f)
    assert prompt.messages == [{"role": "user", "content": "First?"}]
    assert prompt.meta["later_turns"] == ["Then?"]


def test_bom_and_blank_lines_are_fine(tmp_path):
    f = write(tmp_path / "p.jsonl", b'\xef\xbb\xbf{"prompt": "x"}\n\n   \n{"prompt": "y"}\n')
    assert len(parse_prompt_file(f)) == 2


# --- malformed input -----------------------------------------------------------------------------------------

MALFORMED = {
    "bad json": (jsonl({"prompt": "ok"}, '{"prompt": "unterminated'), 2, "invalid JSON"),
    "not an object": (jsonl({"prompt": "ok"}, "[1, 2]"), 2, "expected a JSON object"),
    "missing field": (jsonl({"prompt": "ok"}, {"text": "x"}), 2, "no prompt field"),
    "empty prompt": (jsonl({"prompt": "ok"}, {"prompt": "   "}), 2, "is empty"),
    "wrong type": (jsonl({"prompt": 42}), 1, "must be a string"),
    "bad role": (jsonl({"messages": [{"role": "wizard", "content": "x"}]}), 1, "has role 'wizard'"),
    "ends with assistant": (
        jsonl({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
        1,
        "last message must be from the user",
    ),
    "late system message": (
        jsonl(
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "system", "content": "b"},
                    {"role": "user", "content": "c"},
                ]
            }
        ),
        1,
        "system message may only come first",
    ),
    "empty messages": (jsonl({"messages": []}), 1, "non-empty list"),
    "bad split": (jsonl({"prompt": "x", "split": "test"}), 1, "split must be one of"),
    "bad tags": (jsonl({"prompt": "x", "tags": [1, 2]}), 1, "'tags' must be"),
    "too long": (jsonl({"prompt": "x" * 40_000}), 1, "longer than"),
    "mtbench empty turns": (jsonl({"question_id": 1, "turns": []}), 1, "'turns' must be"),
    "dolly missing instruction": (jsonl({"instruction": "", "context": "c"}), 1, "is empty"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_jsonl_reports_line_and_reason(tmp_path, case):
    content, line, reason = MALFORMED[case]
    f = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(ImportFileError) as info:
        parse_prompt_file(f)
    assert (line,) == (info.value.errors[0][0],)
    assert reason in info.value.errors[0][1]
    assert f"{f}:{line}:" in str(info.value) and "nothing imported" in str(info.value)


def test_wrong_encoding_names_the_line(tmp_path):
    f = write(tmp_path / "latin1.jsonl", '{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ImportFileError, match=r"latin1.jsonl:2: not valid UTF-8"):
        parse_prompt_file(f)


def test_binary_file_is_refused(tmp_path):
    f = write(tmp_path / "model.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(ImportFileError, match="binary content"):
        parse_prompt_file(f)


def test_empty_file_is_refused(tmp_path):
    with pytest.raises(ImportFileError, match="no prompts in file"):
        parse_prompt_file(write(tmp_path / "empty.jsonl", "\n\n"))


def test_csv_problems(tmp_path):
    with pytest.raises(ImportFileError, match="header needs a 'prompt'"):
        parse_prompt_file(write(tmp_path / "h.csv", "question,answer\nx,y\n"))
    with pytest.raises(ImportFileError, match=r"r.csv:3: more fields"):
        parse_prompt_file(write(tmp_path / "r.csv", "prompt,split\nok,train\nbad,train,extra\n"))
    with pytest.raises(ImportFileError, match=r"f.csv:2: fewer fields"):
        parse_prompt_file(write(tmp_path / "f.csv", "prompt,split\nlonely\n"))


def test_json_array_must_be_an_array(tmp_path):
    with pytest.raises(ImportFileError, match="must hold an array"):
        parse_prompt_file(write(tmp_path / "x.json", '{"prompt": "x"}'))


def test_every_bad_line_is_reported(tmp_path):
    f = write(tmp_path / "many.jsonl", jsonl({"prompt": ""}, {"prompt": "ok"}, "nope", {"prompt": 1}))
    with pytest.raises(ImportFileError) as info:
        parse_prompt_file(f)
    assert [line for line, _ in info.value.errors] == [1, 3, 4]


# --- through the CLI: all or nothing -------------------------------------------------------------------------


def test_cli_import_is_all_or_nothing(workspace, tmp_path, capsys):
    settings, engine, _ = workspace
    bad = write(tmp_path / "bad.jsonl", jsonl(*[{"prompt": f"p{i}"} for i in range(50)], {"prompt": ""}))
    assert main(["prompts", "import", str(bad), "--workspace", str(settings.workspace)]) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl:51: field 'prompt' is empty" in err and "Traceback" not in err
    with Session(engine) as s:
        assert crud.count_prompts(s) == 0

    good = write(tmp_path / "good.jsonl", jsonl(*[{"prompt": f"p{i}"} for i in range(50)], {"prompt": "p0"}))
    assert main(["prompts", "import", str(good), "--workspace", str(settings.workspace)]) == 0
    assert "imported 50 prompts" in capsys.readouterr().out
    assert main(["prompts", "import", str(good), "--workspace", str(settings.workspace)]) == 0
    assert "imported 0 prompts" in capsys.readouterr().out
    with Session(engine) as s:
        assert crud.count_prompts(s) == 50


def test_cli_missing_file(workspace, capsys):
    settings, _, _ = workspace
    assert main(["prompts", "import", "/nonexistent.jsonl", "--workspace", str(settings.workspace)]) == 1
    assert "no such file" in capsys.readouterr().err
