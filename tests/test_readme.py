"""The README, executed: every command it shows runs as a subprocess, in order, against tiny real-architecture
stand-ins of the models it downloads, and must exit 0 and leave what the README says it leaves.

README.md is parsed when the tests are collected, so a changed README changes the test. What is taken:
- every line of every ```bash block (`\\` continuations joined, `#` comments dropped, `R=...` assignments kept for
  the following `$R`);
- backticked inline `mmdomain ...` spans that are complete commands (`a|b|c` alternatives become one command each;
  a span with `...` is a fragment and is left out: `mmdomain --debug ...`);
- the ```yaml block of "Domain data" (the mixed-media `model:` fragment), which is merged into the stage-1 recipe and
  made shards of, validated and trained (those three commands are the harness's: the README shows only the YAML).

How each line maps to what runs, and every deviation from the README's literal text:
- `huggingface-cli download REPO --local-dir DIR` builds the stand-in of REPO (tests/readme_standins.py) at DIR.
- `pip install ...` is skipped: the test runs inside the installed package. `pytest` is skipped: this test is part
  of that suite, and running it from itself would recurse.
- `mmdomain demo` and `mmdomain demo --shuffle-images` are skipped: tests/test_demo.py runs the `demo` command (through
  `cli.main`) to its >= 0.95 accuracy and the shuffled-images control to chance; each takes a minute on 2 cores.
- Absolute model paths (`/models/...`, `/data/...`) are moved under a temporary root, in commands and in the copied
  recipes alike: `recipes/` is copied into the working directory and its `/models/` paths rewritten there, which is
  what a user does after downloading elsewhere (simpler and closer than `model.*.path=` overrides on every command,
  and it leaves the commands as written). `/data/qwen` (the override example's other LLM location) is a symlink to
  the Qwen stand-in.
- `RECIPE` placeholders: in the remote-sensing `data stats` command, the 6-band recipe (the one with band `stats`);
  elsewhere a copy of the stage-1 recipe, one per README paragraph or block, each with its own `output_dir` under
  `runs/readme/` (the README's RECIPE is the reader's own recipe; the shipped align recipe itself would collide
  with `runs/cxr/align`, which the walk has already trained).
- Step counts: `optim.max_steps=N` becomes `optim.max_steps=min(N, 2)` (200 and 3000 steps are for real data; two
  steps of 8 accumulated micro-batches show that the command works, and still continue a 1-step run). The shipped
  recipes' `epochs` make every other run 1 step on this data: batch 32 x grad_accum 8 over 16 samples is 1 batch
  per epoch, ceil(epochs / 8) steps. No other override is added (data.num_workers stays as the recipes set it).
- The mixed-media fragment names /models/whisper-small, which only recipes/audio's header downloads: the harness
  builds that stand-in before the fragment's commands.
- `data stats` needs remote-sensing shards the README never makes; the harness makes them with `make-shards --recipe`
  (the README's way) and, if that fails, with `--domain remote_sensing`, so both are reported.
- Subprocesses get PYTHONPATH with this checkout first (the code under test) and HF_HUB_OFFLINE=1 (a stray hub
  call fails at once instead of waiting on a network the tests do not have).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from .readme_standins import STANDINS, build_whisper, write_ct_data, write_cxr_data, write_mixed_data

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_STEPS = 2  # optim.max_steps=N in a README command runs min(N, MAX_STEPS) steps (see the module docstring)
SKIPPED = {
    "pip": "installing is the environment's job: this test runs inside the installed package",
    "pytest": "this test is part of that suite; running the suite from inside it would recurse",
    "mmdomain demo": "covered by tests/test_demo.py (the `demo` command through cli.main, and the shuffled-images control); "
                     "each demo takes about a minute on 2 CPU cores",
}
PHI = [b"Doe^Jane", b"Secretname", b"CXR-0", b"SYN-"]  # patient attributes the synthetic DICOMs carry


# -- reading the README --------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One thing the README shows: a command line, a variable assignment or the mixed-media YAML fragment."""

    index: int
    section: str
    context: str  # which block or paragraph it came from: RECIPE placeholders are one recipe per context
    text: str  # as written in the README
    yaml: str | None = None

    @property
    def id(self) -> str:
        if self.yaml is not None:
            return f"{self.index:02d}-mixed-media-yaml"
        assignment = re.fullmatch(r"(\w+)=\S*", self.text)
        if assignment:
            return f"{self.index:02d}-set-{assignment.group(1)}"
        words = []
        for w in shlex.split(self.text, comments=True):
            w = Path(w.rstrip("/")).name or w
            if w not in ("mmdomain", "huggingface-cli", *words) and not w.startswith("-"):
                words.append(w)
        return f"{self.index:02d}-" + "-".join(words[:3])[:60]


def _logical_lines(block: list[str]) -> list[str]:
    lines, pending = [], ""
    for raw in block:
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append(pending + raw)
        pending = ""
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def read_readme(text: str) -> list[Step]:
    steps: list[Step] = []
    section, paragraph, fence, block = "", 0, None, []
    for number, line in enumerate(text.splitlines(), 1):
        if fence is not None:
            if line.startswith("```"):
                context = f"{section} / block at line {fence[1]}"
                if fence[0] == "bash":
                    steps += [Step(0, section, context, cmd.strip()) for cmd in _logical_lines(block)]
                elif fence[0] == "yaml" and section.startswith("Domain data"):
                    steps.append(Step(0, section, context, "(mixed-media model fragment)", yaml="\n".join(block)))
                fence, block = None, []
            else:
                block.append(line)
            continue
        if line.startswith("```"):
            fence, block = (line[3:].strip(), number), []
            continue
        if line.startswith("#"):
            section, paragraph = line.lstrip("#").strip(), paragraph + 1
            continue
        if not line.strip():
            paragraph += 1
            continue
        for span in re.findall(r"`(mmdomain [^`]*)`", line):
            if "..." in span:
                continue  # a fragment (`mmdomain --debug ...`), not a command
            alternatives = re.search(r"\b(\w+(?:\|\w+)+)\b", span)
            spans = [span.replace(alternatives.group(1), a) for a in alternatives.group(1).split("|")] if alternatives else [span]
            steps += [Step(0, section, f"{section} / paragraph {paragraph}", s) for s in spans]
    for i, step in enumerate(steps):
        step.index = i
    return steps


STEPS = read_readme(README.read_text())


def test_the_readme_is_read():
    """The parser finds what the README is known to show; if this fails, the README changed shape, not mmdomain."""
    texts = [s.text for s in STEPS]
    assert any(t.startswith("huggingface-cli download") for t in texts)
    assert sum(t.startswith("mmdomain make-shards") for t in texts) >= 4
    assert any(t.startswith("mmdomain cache-features") for t in texts)
    assert any("optim.max_steps=200" in t for t in texts)
    assert any(s.yaml for s in STEPS)
    assert {"mmdomain ls encoders", "mmdomain ls connectors", "mmdomain ls recipes"} <= set(texts)


# -- the workspace and the walk ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    label: str

    def problem(self) -> str:
        tail = "\n".join(self.stderr.strip().splitlines()[-15:])
        if self.returncode == -1:
            return f"`{self.label}` failed in the harness (not an mmdomain command): {tail}"
        return f"`{self.label}` exited {self.returncode}\n  ran: {shlex.join(self.argv)}\n  stderr (last lines):\n{tail}"


@dataclass
class Walk:
    """The README walked in a temporary working directory; each step runs once, earlier steps first."""

    work: Path
    fake_root: Path
    corpus: list[str]
    env: dict[str, str]
    variables: dict[str, str] = field(default_factory=dict)
    recipes: dict[str, str] = field(default_factory=dict)
    outcomes: dict[int, list[Outcome]] = field(default_factory=dict)
    done: int = 0

    # README text -> argv

    def reroot(self, token: str) -> str:
        for prefix in ("/models/", "/data/"):
            if prefix in token:
                head, _, tail = token.partition(prefix)
                return f"{head}{self.fake_root}{prefix}{tail}"
        return token

    def recipe_for(self, step: Step, argv: list[str]) -> str:
        if argv[:3] == ["mmdomain", "data", "stats"]:
            return "recipes/remote_sensing/instruct_vit-s16-6band_qwen2.5-0.5b.yaml"
        if step.context not in self.recipes:
            name = f"recipe-{len(self.recipes) + 1}"
            data = yaml.safe_load((self.work / "recipes/medical/align_siglip_qwen2.5-0.5b.yaml").read_text())
            data["output_dir"] = f"runs/readme/{name}"
            path = self.work / "recipes" / "readme" / f"{name}.yaml"
            path.parent.mkdir(exist_ok=True)
            path.write_text(f"# The README's RECIPE in: {step.context}\n" + yaml.safe_dump(data, sort_keys=False))
            self.recipes[step.context] = str(path.relative_to(self.work))
        return self.recipes[step.context]

    def argv(self, step: Step) -> list[str] | None:
        """The command the README line stands for, or None for an assignment (recorded for later lines)."""
        text = re.sub(r"\$\{?(\w+)\}?", lambda m: self.variables.get(m.group(1), m.group(0)), step.text)
        argv = shlex.split(text, comments=True)
        if len(argv) == 1 and re.fullmatch(r"\w+=.*", argv[0]):
            name, _, value = argv[0].partition("=")
            self.variables[name] = value
            return None
        argv = [self.reroot(a) for a in argv]
        if "RECIPE" in argv:
            recipe = self.recipe_for(step, argv)
            argv = [recipe if a == "RECIPE" else a for a in argv]
        return [re.sub(r"^optim\.max_steps=(\d+)$", lambda m: f"optim.max_steps={min(int(m.group(1)), MAX_STEPS)}", a) for a in argv]

    # running

    def mmdomain(self, argv: list[str], label: str) -> Outcome:
        exe = Path(sys.executable).with_name("mmdomain")
        full = [str(exe) if exe.exists() else shutil.which("mmdomain") or "mmdomain", *argv[1:]]
        proc = subprocess.run(full, cwd=self.work, env=self.env, capture_output=True, text=True, timeout=600)
        return Outcome(argv, proc.returncode, proc.stdout, proc.stderr, label)

    def run(self, step: Step) -> list[Outcome]:
        if step.yaml is not None:
            return self.mixed_media(step)
        argv = self.argv(step)
        if argv is None:
            return []
        if argv[0] == "huggingface-cli":
            repo, target = argv[argv.index("download") + 1], Path(argv[argv.index("--local-dir") + 1])
            assert repo in STANDINS, f"README downloads {repo}, which has no stand-in in tests/readme_standins.py; add one"
            STANDINS[repo](target, self.corpus)
            return []
        if argv[0] != "mmdomain":
            raise AssertionError(f"README line {step.text!r} ({step.context}) is a command the harness does not know; teach it")
        outcomes = []
        if argv[1:3] == ["data", "stats"]:
            outcomes += self.remote_sensing_shards(argv[3])
        if "--teacher" in argv:
            return [*outcomes, self.with_teacher(argv, step.text.split("  #")[0].strip())]
        return [*outcomes, self.mmdomain(argv, step.text.split("  #")[0].strip())]

    def with_teacher(self, argv: list[str], label: str) -> Outcome:
        """The README's teacher endpoint stood in for by a scripted OpenAI-compatible server on a free port: every reply
        is JSON that fits any task's schema, its question made distinct per prompt (the writer drops near-duplicates)."""
        from .openai_standin import ScriptedServer

        def reply(user: str, n: int) -> str:
            tag = sum(map(ord, user)) % 997
            return json.dumps({"description": f"A frontal chest radiograph, case {tag}.", "question": f"Is the heart enlarged, case {tag}?",
                               "answer": "no", "choices": ["yes", "no"],
                               "turns": [{"question": f"What view is case {tag}?", "answer": "frontal"},
                                         {"question": "Is the heart enlarged?", "answer": "no"}]})

        server = ScriptedServer(reply)
        try:
            argv = [server.url if a.startswith("http://127.0.0.1:8000") else a for a in argv]
            outcome = self.mmdomain(argv, label)
        finally:
            server.close()
        assert server.bodies, f"{label}: the teacher stand-in received no request"
        return outcome

    def remote_sensing_shards(self, recipe: str) -> list[Outcome]:
        """Shards for the 6-band recipe's data.train, made the README's way (--recipe), else with the domain's flags."""
        from .domain_tasks import write_multiband_task

        write_multiband_task(self.work / "s2", 8, 2)
        common = ["--jsonl", "s2/tif/train.jsonl", "--media", "s2/media", "--out", "shards/s2", "--prefix", "train"]
        by_recipe = self.mmdomain(["mmdomain", "make-shards", "--recipe", recipe, *common], "(harness) make-shards --recipe <6-band recipe>")
        if by_recipe.returncode == 0:
            return [by_recipe]
        bands = json.dumps({"mode": "bands", "bands": ["B02", "B03", "B04", "B08", "B11", "B12"]})
        fallback = self.mmdomain(["mmdomain", "make-shards", "--domain", "remote_sensing", "--domain-options", bands, *common],
                                 "(harness fallback) make-shards --domain remote_sensing")
        return [by_recipe, fallback]

    def mixed_media(self, step: Step) -> list[Outcome]:
        """The README's mixed-media `model:` fragment merged into the stage-1 recipe, then shards, validate, run."""
        build_whisper(self.fake_root / "models" / "whisper-small")  # as recipes/audio/*.yaml's header downloads it
        write_mixed_data(self.work)
        fragment = yaml.safe_load(self.reroot_text(step.yaml))
        data = yaml.safe_load((self.work / "recipes/medical/align_siglip_qwen2.5-0.5b.yaml").read_text())
        data["model"].update(fragment["model"])
        data["data"].update(train="shards/mixed/train-*.tar", eval="shards/mixed/train-*.tar")
        data["output_dir"] = "runs/mixed"
        (self.work / "recipes/readme").mkdir(exist_ok=True)
        (self.work / "recipes/readme/mixed.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        r = "recipes/readme/mixed.yaml"
        outcomes = [self.mmdomain(["mmdomain", "make-shards", "--recipe", r, "--jsonl", "mixed.jsonl", "--media", "mixed/",
                                   "--out", "shards/mixed", "--prefix", "train"], "(harness) make-shards, mixed media")]
        outcomes.append(self.mmdomain(["mmdomain", "validate", r], "(harness) validate, mixed media"))
        outcomes.append(self.mmdomain(["mmdomain", "run", r], "(harness) run, mixed media"))
        return outcomes

    def reroot_text(self, text: str) -> str:
        return re.sub(r"(?<![\w.])/(models|data)/", lambda m: f"{self.fake_root}/{m.group(1)}/", text)

    def through(self, index: int) -> list[Outcome]:
        """Run every step up to ``index`` that has not run yet; the outcomes of step ``index``."""
        while self.done <= index:
            step = STEPS[self.done]
            try:
                self.outcomes[self.done] = [] if _skip_reason(step) else self.run(step)
            except Exception as exc:  # noqa: BLE001 - a broken step is reported by its own test; later steps still run
                self.outcomes[self.done] = [Outcome([step.text], -1, "", f"{type(exc).__name__}: {exc}", f"(harness) {step.text}")]
            self.done += 1
        return self.outcomes[index]

    def earlier_failures(self, index: int) -> list[str]:
        return [o.label for i in range(index) for o in self.outcomes.get(i, []) if o.returncode != 0]


def _skip_reason(step: Step) -> str | None:
    for prefix, reason in SKIPPED.items():
        if step.text == prefix or step.text.startswith(prefix + " "):
            return reason
    return None


@pytest.fixture(scope="module")
def walk(tmp_path_factory) -> Walk:
    base = tmp_path_factory.mktemp("readme")
    work, fake_root = base / "work", base / "root"
    work.mkdir()
    (fake_root / "models").mkdir(parents=True)
    (fake_root / "data").mkdir()
    (fake_root / "data" / "qwen").symlink_to(fake_root / "models" / "Qwen2.5-0.5B-Instruct", target_is_directory=True)
    shutil.copytree(ROOT / "recipes", work / "recipes")
    for recipe in (work / "recipes").rglob("*.yaml"):
        recipe.write_text(re.sub(r"(?<![\w.])/models/", f"{fake_root}/models/", recipe.read_text()))
    corpus = write_cxr_data(work)
    write_ct_data(work)
    corpus += ["Is there a murmur? yes no", "user assistant system", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), "HF_HUB_OFFLINE": "1"}
    return Walk(work=work, fake_root=fake_root, corpus=corpus, env=env)


# -- what each command must leave behind -----------------------------------------------------------------------------


def _jsonl_count(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def _option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def check_make_shards(walk: Walk, out: Outcome) -> None:
    argv = out.argv
    shards, prefix = walk.work / _option(argv, "--out"), _option(argv, "--prefix") if "--prefix" in argv else "train"
    manifest = json.loads((shards / "manifest.json").read_text())
    expected = _jsonl_count(walk.work / _option(argv, "--jsonl"))
    entry = manifest[prefix]
    assert sum(s["samples"] for s in entry["shards"]) == expected, f"manifest {entry} for {expected} JSONL lines"
    tars = sorted(shards.glob(f"{prefix}-*.tar"))
    assert tars and {t.name for t in tars} == {s["name"] for s in entry["shards"]}
    for tar in tars:
        with tarfile.open(tar) as t:
            for member in t.getmembers():
                data = t.extractfile(member).read()
                leaked = [p for p in PHI if p in data]
                assert not leaked, f"{tar.name}:{member.name} holds patient attributes {leaked}"


def check_validate(walk: Walk, out: Outcome) -> None:
    assert "valid" in out.stderr, out.stderr
    resolved = yaml.safe_load(out.stdout)
    written = yaml.safe_load((walk.work / out.argv[2]).read_text())
    assert resolved["model"]["llm"]["path"] == written["model"]["llm"]["path"]
    assert {"eval", "optim", "data", "trainable"} <= set(resolved) and "batch_size" in resolved["eval"]  # defaults filled in


def run_dir_of(walk: Walk, argv: list[str]) -> Path:
    from mmdomain.recipe import load_recipe

    target = walk.work / argv[2]
    if target.is_dir():
        return target
    overrides = [a for a in argv[3:] if "=" in a and not a.startswith("-")]
    return walk.work / load_recipe(target, overrides).output_dir


def check_run(walk: Walk, out: Outcome) -> None:
    run = run_dir_of(walk, out.argv)
    result = json.loads((run / "result.json").read_text())
    assert (run / "recipe.yaml").is_file()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*(m for m in metrics if "loss" in m))
    assert {"step", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "skipped_samples"} <= logged, metrics[:3]
    assert any(m.get("event") == "checkpoint" for m in metrics), metrics
    step = result["steps"]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest.startswith("step-") and int(latest.removeprefix("step-")) == step, (latest, step)
    checkpoint = run / "checkpoints" / latest
    assert (checkpoint / "COMPLETE").is_file(), f"{checkpoint} has no COMPLETE marker"
    pickled = [p.name for p in checkpoint.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert not pickled, f"{checkpoint} holds pickle-format files {pickled}; a checkpoint is safetensors + JSON"
    for a in out.argv[3:]:
        if a.startswith("optim.max_steps="):
            assert step == int(a.partition("=")[2]), f"{a} but the run made {step} steps"
        if a.startswith("data.feature_cache="):
            assert "training from feature cache" in out.stderr
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    if recipe.get("init_from") and "--resume" not in out.argv:
        assert "init_from" in out.stderr, "the run does not say it started from init_from"
    if recipe["data"].get("eval"):
        assert any("eval" in m for m in metrics), "no evaluation in metrics.jsonl"
        assert result["eval"] and result["eval"]["samples"] > 0, result["eval"]


def check_eval(walk: Walk, out: Outcome) -> None:
    run = walk.work / out.argv[2]
    report = json.loads((run / "eval_report.json").read_text())
    assert report["closed"]["samples"] > 0 and report["closed"]["accuracy"] is not None, report
    assert report["open"]["samples"] > 0 and report["open"]["token_recall"] is not None and report["open"]["token_f1"] is not None
    # The run evaluated itself on the same shards with its recipe's eval settings at the end of training; `eval` on
    # the run directory must give the same predictions (it decodes and evaluates as the recipe says).
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    if sorted(Path(walk.work).glob(recipe["data"]["eval"])) == sorted(Path(walk.work).glob(_option(out.argv, "--data"))):
        own = [json.loads(line) for line in (run / "eval_predictions.jsonl").read_text().splitlines()]
        again = [json.loads(line) for line in (run / "eval_report.predictions.jsonl").read_text().splitlines()]
        differ = [(a["key"], a["prediction"][:40], b["prediction"][:40]) for a, b in zip(own, again) if a["prediction"] != b["prediction"]]
        assert len(own) == len(again) and not differ, (
            f"`mmdomain eval` disagrees with the run's own final evaluation (recipe eval: {recipe['eval']}) on "
            f"{len(differ)} of {len(own)} samples, e.g. {differ[:2]}")


def check_generate(walk: Walk, out: Outcome) -> None:
    lines = out.stdout.splitlines()
    assert lines and lines[-1].strip(), f"generate printed no answer: stdout {out.stdout!r}"


def check_cache_features(walk: Walk, out: Outcome) -> None:
    cache = walk.work / _option(out.argv, "--out")
    assert (cache / "feature_cache.json").is_file() and list(cache.glob("train-*.tar"))


def check_ls(walk: Walk, out: Outcome) -> None:
    expected = {"encoders": "hf", "connectors": "mlp", "recipes": "medical/align_siglip_qwen2.5-0.5b.yaml"}[out.argv[2]]
    assert expected in out.stdout, out.stdout


def check_tiny_llm(walk: Walk, out: Outcome) -> None:
    model = walk.work / _option(out.argv, "--out")
    assert (model / "config.json").is_file() and (model / "tokenizer.json").is_file(), sorted(p.name for p in model.iterdir())


def check_make_instructions(walk: Walk, out: Outcome) -> None:
    folder = walk.work / _option(out.argv, "--out")
    report = json.loads((folder / "report.json").read_text())
    if out.argv[2] in ("captions", "reports"):
        kinds = set(_option(out.argv, "--kinds").split(","))
        assert set(report["kinds"]) == kinds and report["teacher"], report  # every asked kind made, the teacher reported
        assert Path(str(folder) + ".teacher-cache.jsonl").is_file()  # answers kept for a rerun
    groups = {}
    for name in ("train", "val", "heldout"):
        records = [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]
        assert len(records) == report["samples"][name], (name, len(records), report["samples"])
        groups[name] = {r["group"] for r in records}
    assert records and not (groups["train"] & groups["heldout"]), groups  # the README's make-shards needs a held-out file


def check_data_stats(walk: Walk, out: Outcome) -> None:
    stats = json.loads((walk.work / _option(out.argv, "--out")).read_text())
    assert len(stats["mean"]) == len(stats["std"]) == 6, stats


CHECKS = {"make-shards": check_make_shards, "validate": check_validate, "run": check_run, "eval": check_eval,
          "generate": check_generate, "cache-features": check_cache_features, "ls": check_ls, "data": check_data_stats,
          "tiny-llm": check_tiny_llm, "make-instructions": check_make_instructions}


@pytest.mark.slow
@pytest.mark.parametrize("step", STEPS, ids=[s.id for s in STEPS])
def test_readme_step(walk: Walk, step: Step):
    reason = _skip_reason(step)
    if reason:
        pytest.skip(f"{step.text}: {reason}")
    outcomes = walk.through(step.index)
    problems = []
    for out in outcomes:
        if out.returncode != 0:
            problems.append(out.problem())
            continue
        check = CHECKS.get(out.argv[1])
        try:
            if check is not None:
                check(walk, out)
        except (AssertionError, OSError, KeyError) as exc:
            problems.append(f"`{out.label}` exited 0 but did not leave what the README says: {type(exc).__name__}: {exc}")
    if problems:
        earlier = walk.earlier_failures(step.index)
        note = f"\n(earlier README commands that failed, which this one may depend on: {earlier})" if earlier else ""
        pytest.fail(f"README ({step.context}): {step.text}\n" + "\n".join(problems) + note, pytrace=False)
