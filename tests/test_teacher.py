"""The teacher path against a real local HTTP server speaking the OpenAI chat completions API (the official openai
client talks to it), the answer cache's resume, report scrubbing end to end, and the local transformers teacher."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict

import pytest

pytest.importorskip("openai")

from mmdomain.report_scrub import Scrubber, load_allow_list
from mmdomain.teacher import ReplyRejected, StopRun, TextItem, parse_reply, run_teacher
from mmdomain.teacher_backends import OpenAITeacher, TransformersTeacher
from mmdomain.teacher_cache import TeacherCache

from .openai_standin import GOOD, ScriptedServer


@pytest.fixture
def serve():
    servers = []

    def start(script):
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _items(texts, tmp_path):
    return [TextItem(media=[f"img{i}.png"], text=t, group=f"p{i}", source_file=str(tmp_path / "table.csv"), row=i + 2)
            for i, t in enumerate(texts)]


def test_good_malformed_refusal_timeout_are_parsed_retried_rejected_and_counted(serve, tmp_path):
    def script(user, n):
        if "case good" in user:
            return json.dumps(GOOD)
        if "case fenced" in user:
            return "Here you are:\n```json\n" + json.dumps(GOOD) + "\n```"
        if "case malformed" in user:
            return '{"question": "Which side' if n == 0 else json.dumps(GOOD)  # truncated JSON, then fine on retry
        if "case refusal" in user:
            return "I can't help with medical images."
        if "case offschema" in user:
            return json.dumps({**GOOD, "answer": "both"})  # answer not among the choices
        if "case timeout" in user:
            return ("sleep", 2.0)
        raise AssertionError(user)

    server = serve(script)
    cases = ["good", "fenced", "malformed", "refusal", "offschema", "timeout"]
    teacher = OpenAITeacher(server.url, "served-model", timeout=0.5)
    result = run_teacher(_items([f"Chest film, case {c}, opacity left." for c in cases], tmp_path), teacher, kinds=["closed_qa"],
                         cache=TeacherCache(tmp_path / "cache.jsonl"), retries=1, backoff_s=0, concurrency=3)
    r = result.report
    assert r["accepted"] == 3 and [i.provenance["row"] for i in result.instructions] == [2, 3, 4]
    assert result.rejects == Counter({"refusal": 1, "schema": 1, "timeout": 1})
    assert r["attempt_failures"] == {"malformed_json": 1, "refusal": 2, "schema": 2, "timeout": 2}
    # one request for good/fenced, two (retry budget 1) for each of the other four; the report counts what was sent
    assert r["requests_sent"] == len(server.bodies) == 10 and r["retries"] == 4
    assert {u.split("case ")[1].split(",")[0]: n for u, n in server.per_prompt.items()} == {
        "good": 1, "fenced": 1, "malformed": 2, "refusal": 2, "offschema": 2, "timeout": 2}
    assert all("OpenAI/Python" in a for a in server.agents)  # the official client did the talking
    row = asdict(result.instructions[0])
    assert set(row) == {"media", "question", "answer", "choices", "answer_type", "conversations", "group", "provenance", "kind"}
    assert row["answer_type"] == "closed" and row["choices"].count(row["answer"]) == 1
    expected = {"teacher": "openai", "model": "served-model", "template": "closed_qa.v1", "seed": 0, "row": 2,
                "source_file": str(tmp_path / "table.csv")}
    assert {k: row["provenance"][k] for k in expected} == expected


def test_a_stopped_run_resumes_from_its_cache_without_repeating_a_request(serve, tmp_path):
    def script(user, n):
        return "I cannot do that." if "case 4" in user else json.dumps(GOOD)

    server = serve(script)
    teacher = OpenAITeacher(server.url, "m", timeout=5)
    items = _items([f"Film case {i}, opacity left." for i in range(8)], tmp_path)

    def stop_after_three(settled):
        if settled >= 3:
            raise StopRun

    with pytest.raises(StopRun):
        run_teacher(items, teacher, kinds=["closed_qa"], cache=TeacherCache(tmp_path / "c.jsonl"), retries=1, backoff_s=0,
                    concurrency=2, on_answer=stop_after_three)
    first = sum(server.per_prompt.values())
    assert 3 <= first < 8 + 1  # stopped early: not every item was asked
    # a kill mid-write leaves a partial line; it is ignored and that answer asked again
    with open(tmp_path / "c.jsonl", "a") as f:
        f.write('{"key": "abc", "rep')
    result = run_teacher(items, teacher, kinds=["closed_qa"], cache=TeacherCache(tmp_path / "c.jsonl"), retries=1, backoff_s=0,
                         concurrency=2)
    refusal = next(u for u in server.per_prompt if "case 4" in u)
    assert all(n == 1 for u, n in server.per_prompt.items() if u != refusal)  # no prompt asked twice
    assert server.per_prompt[refusal] == 2 and len(server.per_prompt) == 8  # the refusal's retry, never repeated after
    assert result.report["accepted"] == 7 and result.rejects == Counter({"refusal": 1})
    again = run_teacher(items, teacher, kinds=["closed_qa"], cache=TeacherCache(tmp_path / "c.jsonl"), retries=1, backoff_s=0)
    assert sum(server.per_prompt.values()) == 9 and again.report["from_cache"] == 8 and again.report["requests_sent"] == 0


def test_answers_copying_the_source_are_flagged_and_dropped_or_kept(serve, tmp_path):
    caption = "a large irregular mass in the upper lobe of the right lung with spiculated margins and no effusion seen"

    def script(user, n):
        copied = "There is " + caption  # 19 shared words
        return json.dumps({"question": "What is seen?", "answer": copied if "right lung" in user else "a mass"})

    server = serve(script)
    teacher = OpenAITeacher(server.url, "m")
    items = _items([caption, "short caption of a left lung nodule"], tmp_path)
    dropped = run_teacher(items, teacher, kinds=["open_qa"], cache=TeacherCache(tmp_path / "c.jsonl"), backoff_s=0)
    assert dropped.report["leaks"] == 1 and dropped.rejects == Counter({"leak": 1}) and len(dropped.instructions) == 1
    kept = run_teacher(items, teacher, kinds=["open_qa"], cache=TeacherCache(tmp_path / "c.jsonl"), drop_leaks=False)
    assert [i.provenance.get("leak") for i in kept.instructions] == [True, None]
    assert sum(server.per_prompt.values()) == 2  # the second run came from the cache


REPORTS = [
    ("Patient: Doe, Jane. MRN: 12345678. Exam date 2024-03-12. Referring physician: Dr. Gregory House. "
     "Known Parkinson disease. Mild cardiomegaly."),
    ("Name: Smith, John. Accession # A98765432. Study on 12 March 2024, callback 555-123-4567, john.smith@example.org. "
     "ID 3f2b1c9e-1a2b-4c3d-8e9f-0123456789ab. Patient Hodgkin lymphoma follow-up; no new nodes."),
]
PHI = ["Doe", "Jane", "12345678", "2024-03-12", "Gregory", "House", "Smith", "John", "A98765432", "12 March 2024",
       "555-123-4567", "example.org", "3f2b1c9e"]


def test_names_dates_and_ids_never_reach_the_teacher_or_any_file(serve, tmp_path, capsys):
    from mmdomain.cli import main

    def script(user, n):
        # echo the report back, as a careless teacher would: anything unscrubbed would land in the output
        text = user.split("---\n")[1].split("\n---")[0]
        return json.dumps({"description": text})

    server = serve(script)
    table = tmp_path / "reports.jsonl"
    table.write_text("".join(json.dumps({"media": f"scan{i}.dcm", "report": r, "patient": f"P{i}"}) + "\n"
                             for i, r in enumerate(REPORTS)))
    # Through the real command and writer: train/val/heldout.jsonl, report.json and the teacher's cache.
    assert main(["-q", "make-instructions", "reports", str(table), "--out", str(tmp_path / "out"), "--teacher", server.url,
                 "--model", "m", "--kinds", "describe", "--group-key", "patient", "--keep-leaks", "--phi-allow", "Hodgkin",
                 "--split", "0.5,0,0.5"]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["written"] == 2 and report["groups"]["train"] + report["groups"]["heldout"] == 2  # one patient per side
    scrubbed = report["teacher"]["scrubbed"]
    assert scrubbed["name"] >= 3 and scrubbed["date"] == 2 and scrubbed["id"] == 3 and scrubbed["phone"] == 1
    bodies = "\n".join(server.bodies)
    files = {p: p.read_text() for p in tmp_path.rglob("*") if p.is_file() and p != table}
    assert len(files) >= 3  # train.jsonl, report.json, the cache
    for secret in PHI:
        assert secret not in bodies, secret
        for path, text in files.items():
            assert secret not in text, (secret, path)
    assert "Parkinson disease" in bodies and "Hodgkin lymphoma" in bodies  # allow-listed eponyms survive
    assert "[NAME]" in bodies and "[DATE]" in bodies and "[ID]" in bodies


def test_scrubber_allow_list_keeps_eponyms_it_is_given():
    text = "Patient Bankhart lesion noted. Patient Jane Roe seen."
    assert Scrubber(allow=load_allow_list(defaults=False)).scrub(text)[0] == "Patient [NAME] lesion noted. Patient [NAME] seen."
    kept, counts = Scrubber(allow=load_allow_list(["Bankhart"])).scrub(text)
    assert kept == "Patient Bankhart lesion noted. Patient [NAME] seen." and counts == Counter({"name": 1})


@pytest.mark.parametrize("reply, reason", [
    ('{"question": "q", "choices": ["a", "a"], "answer": "a"}', "schema"),
    ('{"question": "q", "choices": ["a", "b"], "answer": "c"}', "schema"),
    ('{"question": "q", "choices": ["a", "b"]', "malformed_json"),
    ("", "refusal"),
    ('{"question": "q", "choices": ["I cannot tell", "b"], "answer": "I cannot tell"}', "refusal"),
])
def test_closed_replies_need_the_answer_among_distinct_choices(reply, reason):
    with pytest.raises(ReplyRejected) as err:
        parse_reply("closed_qa", reply)
    assert err.value.reason == reason


def test_a_local_transformers_teacher_never_downloads_and_its_garbage_is_rejected(tmp_path, monkeypatch):
    from mmdomain.tiny_models import (
        TINY_CHAT_MARKERS,
        TINY_CHAT_ROLES,
        TINY_CHAT_TEMPLATE,
        write_tiny_llm,
    )

    with pytest.raises(FileNotFoundError, match="never downloads"):
        TransformersTeacher("Qwen/Qwen2.5-0.5B-Instruct")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_tiny_llm(tmp_path / "tiny", ["lung", "mass", "left", "right", "film", *TINY_CHAT_MARKERS, *TINY_CHAT_ROLES],
                          chat_template=TINY_CHAT_TEMPLATE, eos_token="<|im_end|>")
    teacher = TransformersTeacher(str(path), max_new_tokens=8)
    result = run_teacher(_items(["lung mass left"], tmp_path), teacher, kinds=["closed_qa"],
                         cache=TeacherCache(tmp_path / "c.jsonl"), retries=2, backoff_s=0)
    assert result.instructions == [] and sum(result.rejects.values()) == 1
    assert set(result.rejects) <= {"malformed_json", "refusal"}
    assert result.report["requests_sent"] == 1  # greedy gives the same reply again: not retried


def test_every_kind_becomes_an_instruction_from_a_csv_table(serve, tmp_path):
    from mmdomain.teacher import TeacherInputError, read_text_table

    replies = {"describe": {"description": "A round opacity in the left lower zone."},
               "open_qa": {"question": "Where is the opacity?", "answer": "Left lower zone."},
               "closed_qa": GOOD,
               "multi_turn": {"turns": [{"question": "Any opacity?", "answer": "Yes."}, {"question": "Where?", "answer": "Left."}]}}

    def script(user, n):
        kind = next(k for k, marker in [("multi_turn", "conversation"), ("closed_qa", "multiple-choice"),
                                        ("open_qa", "one question"), ("describe", "description")] if marker in user)
        return json.dumps(replies[kind])

    server = serve(script)
    table = tmp_path / "captions.csv"
    table.write_text('media,caption,scene\n"a.png;b.png",Two views of a left opacity,s1\n')
    items = read_text_table(table, text_key="caption", group_key="scene")
    assert items[0].media == ["a.png", "b.png"] and items[0].group == "s1" and items[0].row == 2
    with pytest.raises(TeacherInputError, match="no column 'report'"):
        read_text_table(table, text_key="report")
    result = run_teacher(items, OpenAITeacher(server.url, "m"), kinds=["describe", "open_qa", "closed_qa", "multi_turn"],
                         cache=TeacherCache(tmp_path / "c.jsonl"), backoff_s=0)
    by_kind = {i.kind: asdict(i) for i in result.instructions}
    assert by_kind["describe"]["question"] == "Describe the image in detail." and by_kind["describe"]["answer_type"] == "open"
    assert by_kind["open_qa"]["answer"] == "Left lower zone." and by_kind["open_qa"]["choices"] is None
    assert by_kind["closed_qa"]["choices"] == ["left", "right"]
    assert [t["role"] for t in by_kind["multi_turn"]["conversations"]] == ["user", "assistant"] * 2
    assert all(i.media == ["a.png", "b.png"] and i.group == "s1" for i in result.instructions)


def _cli(table, out, url, *extra):
    from mmdomain.cli import main

    return main(["-q", "make-instructions", "captions", str(table), "--out", str(out), "--teacher", url, "--model", "m",
                 "--group-key", "patient", "--retries", "1", *extra])


def test_what_a_new_user_meets_is_refused_before_any_request_and_costs_nothing_twice(serve, tmp_path, capsys, monkeypatch):
    """Found by trying it: --out checked only after every request was paid for; identical reports asked once each; a
    dead endpoint retried row after row and then blamed the input; an outage wrote a partial set that a rerun refused;
    Excel's BOM, absolute media paths and empty group cells went through or crashed."""
    import mmdomain.teacher as teacher_module

    monkeypatch.setattr(teacher_module, "UNREACHABLE_AFTER", 2)
    reply = json.dumps({"description": "A frontal chest film.", "question": "Is the heart enlarged?", "answer": "no",
                        "choices": ["yes", "no"]})
    server = serve(lambda user, n: reply)
    rows = [{"media": f"cxr/{i}.png", "caption": "No acute cardiopulmonary process.", "patient": f"P{i}"} for i in range(6)]
    rows.append({"media": "cxr/9.png", "caption": "", "patient": "P9"})
    table = tmp_path / "captions.csv"
    table.write_text("\ufeffmedia,caption,patient\n" + "".join(f"{r['media']},{r['caption']},{r['patient']}\n" for r in rows),
                     encoding="utf-8")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("x")
    assert _cli(table, tmp_path / "full", server.url) == 2 and not server.bodies  # refused before any request
    assert "is not empty" in capsys.readouterr().err

    assert _cli(table, tmp_path / "out", server.url, "--kinds", "describe") == 0
    assert len(server.bodies) == 1  # six rows of the same text: one request, its answer shared
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["rejects"]["empty_text"] == 1 and report["written"] >= 1

    distinct = tmp_path / "distinct.csv"
    distinct.write_text("media,caption,patient\n" + "".join(f"cxr/{i}.png,Finding number {i}.,P{i}\n" for i in range(8)))
    down = serve(lambda user, n: ("sleep", 0))
    down.close()  # nothing listens there any more: connection refused
    assert _cli(distinct, tmp_path / "out2", down.url, "--kinds", "open_qa", "--concurrency", "1") == 2
    err = capsys.readouterr().err
    assert "failed 2 requests in a row" in err and "rerun the same command" in err and not (tmp_path / "out2").exists()
    # --out stayed empty, so the rerun with the teacher back is not refused (one refusal is counted, not fatal).
    flaky = serve(lambda user, n: reply if "number 1" not in user else "")
    assert _cli(distinct, tmp_path / "out2", flaky.url, "--kinds", "open_qa") == 0  # the rerun is not refused

    for content, message in [("media,caption,patient\n/abs/a.png,text,P1\n", "must be relative"),
                             ("media,caption,patient\ncxr/a.png,text,\n", "group column 'patient' is empty"),
                             ('media,caption,patient\n"[a.png",text,P1\n', "starts like a JSON list")]:
        (tmp_path / "bad.csv").write_text(content)
        assert _cli(tmp_path / "bad.csv", tmp_path / "out3", server.url) == 2
        err = capsys.readouterr().err
        assert message in err and "bad.csv:2" in err and "Traceback" not in err, err


def test_a_scrubbed_answer_that_no_longer_fits_its_schema_is_counted_not_fatal(serve, tmp_path):
    two_dates = json.dumps({"question": "When was the prior study?", "choices": ["2023-01-05", "2024-03-12"], "answer": "2024-03-12"})
    server = serve(lambda user, n: two_dates)
    items = _items(["Comparison with the prior study."], tmp_path)
    result = run_teacher(items, OpenAITeacher(server.url, "m", api_key_env="NO_SUCH_KEY_VAR"), kinds=["closed_qa"],
                         cache=TeacherCache(tmp_path / "cache.jsonl"), scrubber=Scrubber(allow=load_allow_list()), backoff_s=0)
    assert result.instructions == [] and result.rejects["scrubbed_invalid"] == 1
