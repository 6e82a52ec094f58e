"""The review server over HTTP (no browser): privacy of everything it serves and writes, who may post judgements,
resuming, skipping, flagging, reference mode, and the answers an item gets being the same after a restart."""
from __future__ import annotations

import io
import json
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest

from mmdomain.review_answers import Answers
from mmdomain.review_app import bind, create_app, serving_in_thread
from mmdomain.review_session import judgement_line
from mmdomain.review_store import ReviewError

from .conftest import write_tar
from .domain_tasks import ct_slice, write_dicom
from .review_fixtures import IDENTIFYING, PATIENT, WINDOW, review_session, write_review_run

pytest.importorskip("fastapi", reason="the review page needs the serve extra: pip install 'mmdomain[serve]'")


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory, tiny_llm_dir):
    root = tmp_path_factory.mktemp("review")
    return write_review_run(root, tiny_llm_dir, n=4)


def _get(url: str, headers: dict | None = None) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {})) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def _post(url: str, body: dict, token: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"X-Review-Token": token} if token else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _token(page: bytes) -> str:
    return page.decode().split('data-token="', 1)[1].split('"', 1)[0]


def test_no_patient_attribute_reaches_the_page_the_api_the_media_or_the_judgements(tmp_path, tiny_llm_dir, reviewed):
    """Shards written by another tool hold the DICOM as it came from the scanner; still nothing of its header is
    served, and the copy beside the judgements is stripped by the recipe's make-shards rule."""
    from pydicom import dcmread

    checkpoint, _, _ = reviewed
    hu = ct_slice(np.random.default_rng(7), 2)
    write_dicom(tmp_path / "raw.dcm", hu, monochrome1=False, intercept=-1024.0, slope=1.0, patient=PATIENT)
    raw = (tmp_path / "raw.dcm").read_bytes()
    assert all(secret in raw for secret in IDENTIFYING)
    sample = {"conversations": [{"role": "user", "content": "<image> where is the finding ?"}, {"role": "assistant", "content": "lower left"}]}
    write_tar(tmp_path / "foreign-000000.tar", [("scan1.json", json.dumps(sample).encode()), ("scan1.0.dcm", raw)])
    out = tmp_path / "judgements.jsonl"
    session = review_session(checkpoint, str(tmp_path / "foreign-*.tar"), out)
    try:
        with serving_in_thread(create_app(session)) as url:
            served = []
            status, page, headers = _get(url)
            assert status == 200 and "default-src 'none'" in headers["content-security-policy"]
            assert b"http://" not in page and b"https://" not in page  # every asset is inline: the page works offline
            served.append(page)
            status, state, _ = _get(url + "api/state")
            served.append(state)
            item = json.loads(state)["item"]
            for view in item["views"]:
                status, png, headers = _get(url + view["png"])
                assert status == 200 and headers["content-type"] == "image/png"
                served.append(png)
            status, answer = _post(url + "api/judge", {"item": item["id"], "decision": "1"}, _token(page))
            assert status == 200
    finally:
        session.close()
    for blob in served + [out.read_bytes()]:
        assert not any(secret in blob for secret in IDENTIFYING)
    (line,) = [json.loads(raw_line) for raw_line in out.read_text().splitlines()]
    copy = dcmread(tmp_path / "judgements.media" / line["media"][0])
    assert "PatientName" not in copy and "PatientID" not in copy and "StudyDate" not in copy
    assert copy.pixel_array.tolist() == dcmread(tmp_path / "raw.dcm").pixel_array.tolist()
    assert not any(secret in (tmp_path / "judgements.media" / line["media"][0]).read_bytes() for secret in IDENTIFYING)
    # The line's media paths and prompt are what make-shards reads (here as a plain question-answer sample).
    from mmdomain.domains import build_domain
    from mmdomain.shards import make_shards

    plain = tmp_path / "as_sample.jsonl"
    plain.write_text(json.dumps({"media": line["media"], "question": line["prompt"], "answer": line["chosen"]}) + "\n")
    assert make_shards(plain, tmp_path / "judgements.media", tmp_path / "again", prefix="pairs",
                       domain=build_domain("medical", {"window": WINDOW}, raw=True))["total"] == 1


def test_only_the_served_page_may_post_and_only_for_the_item_it_shows(tmp_path, reviewed):
    checkpoint, shards, _ = reviewed
    out = tmp_path / "j.jsonl"
    session = review_session(checkpoint, shards, out)
    try:
        with serving_in_thread(create_app(session)) as url:
            token = _token(_get(url)[1])
            item = json.loads(_get(url + "api/state")[1])["item"]
            assert _post(url + "api/judge", {"item": item["id"], "decision": "1"}, None)[0] == 403
            assert _post(url + "api/judge", {"item": item["id"], "decision": "1"}, "guessed")[0] == 403
            status, refused = _post(url + "api/judge", {"item": "3", "decision": "1"}, token)
            assert status == 409 and "no longer the one to judge" in refused["error"]
            assert _post(url + "api/judge", {"item": item["id"], "decision": "best"}, token)[0] == 422
            # Another site's page resolving its own name to 127.0.0.1 (DNS rebinding) is turned away by the Host check.
            assert _get(url + "api/state", {"Host": "attacker.example"})[0] == 400
            assert out.read_text() == ""
            assert _post(url + "api/judge", {"item": item["id"], "decision": "flag", "note": "motion artefact"}, token)[0] == 200
            status, again = _post(url + "api/judge", {"item": item["id"], "decision": "1"}, token)  # a double press
            assert status == 409 and again["state"]["progress"]["judged"] == 1
    finally:
        session.close()
    (line,) = [json.loads(raw) for raw in out.read_text().splitlines()]
    assert line["flagged"] is True and line["note"] == "motion artefact" and "chosen" not in line


def test_a_restarted_review_resumes_shows_the_same_answers_and_brings_skipped_items_back(tmp_path, reviewed):
    checkpoint, shards, _ = reviewed
    out = tmp_path / "j.jsonl"
    first = review_session(checkpoint, shards, out)
    try:
        state = first.state()
        assert state["progress"]["judged"] == 0 and state["progress"]["total"] == 4 and state["item"]["number"] == 1
        shown_first = state["item"]["answers"]
        first.judge_item(state["item"]["id"], "2")
        skipped = first.state()["item"]
        first.skip(skipped["id"])
        third = first.state()["item"]
        assert third["number"] == 3 and first.progress()["skipped"] == 1
        shown_third = third["answers"]
    finally:
        first.close()
    second = review_session(checkpoint, shards, out)
    try:
        state = second.state()
        assert state["progress"]["judged"] == 1 and state["item"]["number"] == 2  # the skipped item is back
        assert state["item"]["answers"] == skipped["answers"]  # answers are seeded by item: the same after a restart
        second.skip(state["item"]["id"])
        assert second.state()["item"]["answers"] == shown_third
    finally:
        second.close()
    (line,) = [json.loads(raw) for raw in out.read_text().splitlines()]
    assert (line["chosen"], line["rejected"]) == (shown_first[1], shown_first[0])


def test_reference_mode_sets_the_models_answer_against_the_samples_own(tmp_path, reviewed):
    checkpoint, shards, _ = reviewed
    session = review_session(checkpoint, shards, tmp_path / "j.jsonl", mode="reference", limit=2)
    try:
        assert session.progress()["total"] == 2
        current = session.current()
        assert sorted(current.answers.sources) == ["model", "reference"]
        reference_side = current.answers.sources.index("reference")
        assert current.answers.texts[reference_side] == current.item.reference
        line = session.judge_item(current.id, str(reference_side + 1))
        assert line["chosen"] == current.item.reference and line["chosen_source"] == "reference"
        assert line["rejected_source"] == "model" and line["mode"] == "reference"
        session.judge_item(session.current().id, "flag")
        assert session.state()["done"] is True and session.progress()["judged"] == 2
    finally:
        session.close()


def test_a_judgement_that_teaches_nothing_is_refused(tmp_path, reviewed):
    checkpoint, shards, _ = reviewed
    session = review_session(checkpoint, shards, tmp_path / "j.jsonl", limit=1)
    try:
        current = session.current()
        current.answers = Answers(("lower left", "lower left"), ("sample", "sample"))
        assert current.answers.same
        with pytest.raises(ReviewError, match="same text"):
            judgement_line(current, "1", edited=None, note=None, judge="t", run="r", mode="pair")
        with pytest.raises(ReviewError, match="empty"):
            judgement_line(current, "1", edited="  ", note=None, judge="t", run="r", mode="pair")
        line = judgement_line(current, "1", edited=" upper right ", note=None, judge="t", run="r", mode="pair")
        assert (line["chosen"], line["rejected"], line["edited_from"]) == ("upper right", "lower left", "lower left")
    finally:
        session.close()


def test_a_port_in_use_is_one_line_naming_it_and_the_fix():
    taken = bind(0)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(ReviewError, match=f"cannot listen on 127.0.0.1:{port}.*--port 0"):
            bind(port)
    finally:
        taken.close()
    assert isinstance(taken, socket.socket)


def test_media_are_served_for_the_item_on_the_page_only(tmp_path, reviewed):
    checkpoint, shards, _ = reviewed
    session = review_session(checkpoint, shards, tmp_path / "j.jsonl")
    try:
        with serving_in_thread(create_app(session)) as url:
            assert _get(url + "api/state")[0] == 200
            assert _get(url + "media/3/0.png")[0] == 404  # not the current item
            assert _get(url + "media/0/7.png")[0] == 404
            status, png, _ = _get(url + "media/0/0.png")
            assert status == 200 and png.startswith(b"\x89PNG")
            assert _get(url + "media/0/0.wav")[0] == 404  # an image has no sound
    finally:
        session.close()
    assert io.BytesIO(png).read(4) == b"\x89PNG"


@pytest.mark.slow
def test_the_command_survives_a_kill_and_continues_where_the_file_ends(tmp_path, reviewed):
    """`mmdomain review` as a user runs it: two judgements, then SIGKILL (no chance to flush anything): both lines are
    in the file, whole; a second server on the same file is refused meanwhile; started again, it continues at 2 / 4."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    checkpoint, shards, _ = reviewed
    out = tmp_path / "judgements.jsonl"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "mmdomain.cli", "review", str(checkpoint), "--data", shards, "--out", str(out), "--port", "0",
               "--judge", "alice", "--max-new-tokens", "4"]

    def start() -> tuple[subprocess.Popen, str]:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = process.stdout.readline()
        assert line.startswith("review page: http://127.0.0.1:"), (line, process.stderr.read() if process.poll() is not None else "")
        return process, line.split()[2]

    process, url = start()
    try:
        token = _token(_get(url)[1])
        for decision in ("1", "flag"):
            item = json.loads(_get(url + "api/state")[1])["item"]
            assert _post(url + "api/judge", {"item": item["id"], "decision": decision}, token)[0] == 200
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and "another `mmdomain review` is writing to" in second.stderr
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    lines = [json.loads(raw) for raw in out.read_text().splitlines()]
    assert [line["decision"] for line in lines] == ["1", "flag"] and {line["judge"] for line in lines} == {"alice"}
    process, url = start()
    try:
        state = json.loads(_get(url + "api/state")[1])
        assert state["progress"]["judged"] == 2 and state["item"]["number"] == 3
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0 and "2 / 4 judged in" in stderr and "make-shards --jsonl" in stderr


def test_an_audio_run_gets_a_player_and_a_spectrogram_and_its_clip_is_copied_for_make_shards(tmp_path, tiny_llm_dir):
    import soundfile as sf

    from mmdomain.builder import build_model, save_pretrained
    from mmdomain.domains import build_domain
    from mmdomain.shards import make_shards
    from mmdomain.spec import ModelSpec

    media = tmp_path / "media"
    media.mkdir()
    t = np.arange(16000) / 16000
    sf.write(media / "beat.wav", 0.4 * np.sin(2 * np.pi * 300 * t), 16000)
    (media / "items.jsonl").write_text(json.dumps({"id": "s1", "media": ["beat.wav"], "question": "<audio> where is the finding ?",
                                                   "answer": "left"}) + "\n")
    spec = ModelSpec.model_validate({"encoder": {"name": "tiny-audio", "options": {"clip_seconds": 1.0}},
                                     "connector": {"name": "frame_stack", "options": {"k": 8}}, "llm": {"path": tiny_llm_dir},
                                     "domain": {"name": "audio"}, "media_token": "<audio>", "max_length": 256})
    make_shards(media / "items.jsonl", media, tmp_path / "shards", prefix="heldout", domain=build_domain("audio", {}, raw=True),
                media_token="<audio>")
    checkpoint = save_pretrained(*build_model(spec), tmp_path / "run")
    session = review_session(checkpoint, str(tmp_path / "shards" / "heldout-*.tar"), tmp_path / "j.jsonl")
    try:
        with serving_in_thread(create_app(session)) as url:
            item = json.loads(_get(url + "api/state")[1])["item"]
            assert item["turns"] == [{"role": "user", "text": "[audio 1] where is the finding ?"}]
            (view,) = item["views"]
            assert view["kind"] == "audio" and view["label"] == "audio 1"
            status, wav, headers = _get(url + view["wav"])
            assert status == 200 and headers["content-type"] == "audio/wav"
            heard, rate = sf.read(io.BytesIO(wav))
            assert rate == 16000 and len(heard) == 16000
            assert _get(url + view["png"])[1].startswith(b"\x89PNG")
            token = _token(_get(url)[1])
            assert _post(url + "api/judge", {"item": item["id"], "decision": "2"}, token)[0] == 200
    finally:
        session.close()
    (line,) = [json.loads(raw) for raw in (tmp_path / "j.jsonl").read_text().splitlines()]
    assert line["prompt"] == "<audio> where is the finding ?" and line["media"][0].endswith(".0.wav")
    assert sf.info(tmp_path / "j.media" / line["media"][0]).frames == 16000
