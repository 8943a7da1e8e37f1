"""Issue 14 section 6: the GitHub workflow (`.ci/run` on push and pull request) and the `effconv-verify` action.

No network here, so GitHub never runs them in the tests: both files are validated against SchemaStore's
schemas for workflows and actions (`check-jsonschema`, its vendored copies, offline), checked for what GitHub
and this project need, and their shell steps are run as a runner would run them (bash -eo pipefail, the step's
`env` and `if` worked out from the `${{ }}` expressions they use, GITHUB_OUTPUT / GITHUB_STEP_SUMMARY files):
the action's own verify steps run `effconv verify` on the official-b0 fixture, once passing and once failing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from tests.conftest import PROJECT_ROOT
from tests.support.helpers import run_cli

WORKFLOW = PROJECT_ROOT / ".github" / "workflows" / "ci.yml"
ACTION = PROJECT_ROOT / ".github" / "actions" / "effconv-verify" / "action.yml"
EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
REPO_PATH = re.compile(r"(?<![\w/.$-])((?:\./)?(?:\.ci|scripts)/[\w.-]+)")


def _load(path: Path) -> dict:
    return YAML(typ="safe", pure=True).load(path.read_text())  # YAML 1.2: `on` stays a string key


def _steps(doc: dict) -> list[dict]:
    if "runs" in doc:
        return doc["runs"]["steps"]
    return [step for job in doc["jobs"].values() for step in job["steps"]]


def _step(doc: dict, name: str) -> dict:
    return next(s for s in _steps(doc) if s.get("name") == name)


def _check_jsonschema(schema: str, path: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", f"vendor.{schema}", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


# --- the schema -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("schema", "path"), [("github-workflows", WORKFLOW), ("github-actions", ACTION)])
def test_files_pass_schemastores_schema(schema, path):
    result = _check_jsonschema(schema, path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_catches_what_github_refuses(tmp_path):
    """The validator is not a formality: a job without runs-on, a step without uses or run, a composite step
    without a shell are refused."""
    broken = {
        "no-runs-on.yml": ("github-workflows", "on: [push]\njobs:\n  a:\n    steps:\n      - run: echo\n"),
        "empty-step.yml": (
            "github-workflows",
            "on: [push]\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - name: nothing\n",
        ),
        "no-shell.yml": (
            "github-actions",
            "name: a\ndescription: b\nruns:\n  using: composite\n  steps:\n    - run: echo\n",
        ),
    }
    for name, (schema, text) in broken.items():
        (tmp_path / name).write_text(text)
        assert _check_jsonschema(schema, tmp_path / name).returncode == 1, name


# --- the workflow ---------------------------------------------------------------------------------------------


def test_workflow_runs_ci_on_push_and_pull_request():
    doc = _load(WORKFLOW)
    assert {"push", "pull_request"} <= set(doc["on"])
    assert doc["jobs"], "no jobs"
    for name, job in doc["jobs"].items():
        assert job.get("runs-on"), f"job {name} has no runs-on"
        assert job["steps"], f"job {name} has no steps"
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step), step  # exactly one of them
    steps = _steps(doc)
    checkouts = [s for s in steps if s.get("uses", "").startswith("actions/checkout@")]
    assert [c["with"]["path"] for c in checkouts] == ["main", "shared-checkout"]
    assert "vars.EFFCONV_SHARED_REPOSITORY" in checkouts[1]["with"]["repository"]
    run = _step(doc, ".ci/run")
    assert run["working-directory"] == "main" and run["run"] == "bash .ci/run"


def test_workflow_publishes_the_reports_even_when_ci_fails():
    doc = _load(WORKFLOW)
    summary = _step(doc, "Parity table to the job summary")
    assert summary["if"] == "always()" and "GITHUB_STEP_SUMMARY" in summary["run"]
    assert "reports/parity.md" in summary["run"]
    upload = _step(doc, "Upload reports/")
    assert upload["if"] == "always()" and upload["uses"].startswith("actions/upload-artifact@")
    paths = upload["with"]["path"].split()
    assert {p.rsplit(".", 1)[1] for p in paths} == {"md", "json", "xml", "png"}
    assert all(p.startswith("main/reports/") for p in paths)


@pytest.mark.parametrize("path", [WORKFLOW, ACTION])
def test_every_command_and_action_the_files_name_exists(path):
    doc = _load(path)
    named = []
    for step in _steps(doc):
        if "run" in step:
            named += REPO_PATH.findall(EXPRESSION.sub("", step["run"]))
        uses = step.get("uses", "")
        if uses.startswith("./"):
            assert (PROJECT_ROOT / uses).is_dir(), uses
        elif uses:
            assert re.fullmatch(r"[\w-]+/[\w-]+@v\d+", uses), f"{uses}: pin an official action's major version"
    for command in named:
        file = PROJECT_ROOT / command
        assert file.is_file() and file.read_text().startswith("#!"), f"{path.name} runs {command}, not in the repo"
    if path == WORKFLOW:
        assert ".ci/run" in named


def test_the_jobs_docs_ci_md_gives_are_valid_and_name_real_inputs_and_options(tmp_path):
    from effconv.cli import main

    blocks = re.findall(r"```yaml\n(.*?)```", (PROJECT_ROOT / "docs" / "ci.md").read_text(), re.S)
    assert len(blocks) == 2
    action = _load(ACTION)
    options = {o for p in main.commands["verify"].params for o in p.opts}
    for i, block in enumerate(blocks):
        job = YAML(typ="safe", pure=True).load(block)
        (tmp_path / f"job{i}.json").write_text(json.dumps({"on": "push", **job}))
        result = _check_jsonschema("github-workflows", tmp_path / f"job{i}.json")
        assert result.returncode == 0, result.stdout
        for step in _steps(job):
            uses = step.get("uses", "")
            if "effconv-verify" in uses:
                local = PROJECT_ROOT / uses.split("/", 2)[2].split("@")[0]  # OWNER/effconv/<path>@ref
                assert local == ACTION.parent and set(step["with"]) <= set(action["inputs"])
                assert set(shlex.split(step["with"]["args"])) - {"4"} <= options
            if "effconv verify" in step.get("run", ""):
                assert set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", step["run"])) <= options


# --- a runner, for the steps' shell scripts -------------------------------------------------------------------


class Runner:
    """Runs a workflow's or action's `run` steps as GitHub does (bash --noprofile --norc -eo pipefail), with the
    `${{ }}` expressions these files use in `env` and `if`: contexts `inputs`, `vars`, `github`,
    `steps.<id>.outputs`; `always()`, `success()`, `==`, `!=`, `&&`, `||`. `uses` steps are only recorded."""

    def __init__(self, workspace: Path, inputs=None, variables=None, github=None, path_dirs=()):
        self.workspace, self.failed, self.ran, self.results = workspace, False, [], {}
        self.context = {"inputs": inputs or {}, "vars": variables or {}, "github": github or {}, "steps": {}}
        self.summary = workspace / "summary.md"
        self.path_dirs = [str(d) for d in path_dirs]

    def value(self, reference: str) -> str:
        node = self.context
        for part in reference.split("."):
            node = node.get(part, "") if isinstance(node, dict) else ""
        return "" if node is None else str(node)

    def expand(self, text: str) -> str:
        return EXPRESSION.sub(lambda m: self.value(m.group(1)), str(text))

    def condition(self, expression: str | None) -> bool:
        text = expression or "success()"
        text = EXPRESSION.sub(r"\1", text).replace("always()", "True").replace("success()", str(not self.failed))
        text = re.sub(r"\b(?:inputs|vars|github|steps)(?:\.[\w-]+)+", lambda m: repr(self.value(m.group(0))), text)
        text = text.replace("&&", " and ").replace("||", " or ")
        return bool(eval(text, {"__builtins__": {}}, {}))  # only what the substitutions above leave

    def run(self, steps: list[dict]) -> None:
        for index, step in enumerate(steps):
            if not self.condition(step.get("if")):
                continue
            self.ran.append(step.get("name", step.get("uses")))
            if "run" not in step:
                continue
            output = self.workspace / f"output-{index}"
            output.touch()
            env = {**os.environ, **{k: self.expand(v) for k, v in (step.get("env") or {}).items()}}
            env |= {"GITHUB_OUTPUT": str(output), "GITHUB_STEP_SUMMARY": str(self.summary)}
            env |= {"GITHUB_PATH": str(self.workspace / "path"), "RUNNER_TEMP": str(self.workspace)}
            env["PATH"] = os.pathsep.join([*self.path_dirs, env["PATH"]])
            cwd = self.workspace / step.get("working-directory", ".")
            script = self.workspace / f"step-{index}.sh"
            script.write_text(self.expand(step["run"]))
            proc = subprocess.run(
                ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            self.results[step.get("name", index)] = proc
            self.failed |= proc.returncode != 0
            if "id" in step:
                lines = output.read_text().splitlines()
                self.context["steps"][step["id"]] = {"outputs": dict(line.split("=", 1) for line in lines if line)}


def test_workflow_refuses_to_run_without_a_source_for_shared(tmp_path):
    doc = _load(WORKFLOW)
    check = _step(doc, "Check that ../shared has a source")
    runner = Runner(tmp_path)
    runner.run([check])
    assert runner.failed and "EFFCONV_SHARED_REPOSITORY" in runner.results[check["name"]].stdout
    runner = Runner(tmp_path, variables={"EFFCONV_SHARED_REPOSITORY": "someone/effconv-shared"})
    runner.run([check])
    assert not runner.failed, runner.results[check["name"]].stdout


def test_workflow_lays_shared_beside_the_project_read_only_and_summarises(tmp_path):
    (tmp_path / "main" / "reports").mkdir(parents=True)
    (tmp_path / "shared-checkout" / "data" / "fixtures" / "official-b0").mkdir(parents=True)
    doc = _load(WORKFLOW)
    names = ("Lay ../shared beside the project, read-only", "Parity table to the job summary")
    runner = Runner(tmp_path, variables={"EFFCONV_SHARED_SUBDIR": "data"})
    runner.run([_step(doc, n) for n in names])
    assert not runner.failed
    assert (tmp_path / "main" / ".." / "shared" / "fixtures" / "official-b0").is_dir()  # ../shared from main/
    assert "stopped before the parity matrix" in runner.summary.read_text()  # no report yet: said so
    if os.geteuid() != 0:  # root writes anywhere
        assert not os.access(tmp_path / "shared" / "fixtures", os.W_OK)
    (tmp_path / "main" / "reports" / "parity.md").write_text("| arch | verdict |\n|---|---|\n| b0 | PASS |\n")
    runner.run(
        [_step(doc, names[1]), _step(doc, "Make ../shared writable again (a self-hosted runner cleans its workspace)")]
    )
    assert "| b0 | PASS |" in runner.summary.read_text() and not runner.failed
    assert os.access(tmp_path / "shared-checkout" / "data", os.W_OK)


# --- the effconv-verify action --------------------------------------------------------------------------------


def test_action_is_composite_and_every_run_step_names_its_shell():
    doc = _load(ACTION)
    assert doc["runs"]["using"] == "composite"
    assert doc["inputs"]["src"]["required"] is True
    for step in doc["runs"]["steps"]:
        assert ("uses" in step) != ("run" in step), step
        if "run" in step:
            assert step["shell"] == "bash", step.get("name")
    ids = {s["id"] for s in doc["runs"]["steps"] if "id" in s}
    for name, output in doc["outputs"].items():
        for reference in EXPRESSION.findall(output["value"]):
            parts = reference.split(".")
            assert parts[0] != "steps" or parts[1] in ids, (name, reference)
            assert parts[0] != "inputs" or parts[1] in doc["inputs"], (name, reference)


def test_action_installs_this_checkout_and_passes_options_verify_has():
    from effconv.cli import main
    from effconv.parity.reports import REPORT_SUFFIXES

    doc = _load(ACTION)
    install = _step(doc, "Install effconv")
    source = (ACTION.parent / install["env"]["EFFCONV_SOURCE"].replace("${{ github.action_path }}/", "")).resolve()
    assert source == PROJECT_ROOT.resolve() and (source / "pyproject.toml").is_file()
    pyproject = (source / "pyproject.toml").read_text()
    assert all(f"\n{extra} = [" in pyproject for extra in ("tf", "keras"))  # the extras it installs
    options = {o for p in main.commands["verify"].params for o in p.opts}
    script = _step(doc, "effconv verify")["run"]
    assert set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", script)) <= options
    assert set(shlex.split(doc["inputs"]["args"]["default"])) <= options
    suffixes = re.search(r"for suffix in ([\w ]+); do", script).group(1).split()
    assert {f".{s}" for s in suffixes} == set(REPORT_SUFFIXES)


def _run_action(tmp_path: Path, **inputs) -> Runner:
    doc = _load(ACTION)
    given = {k: v.get("default", "") for k, v in doc["inputs"].items()} | {"install": "false"} | inputs
    runner = Runner(
        tmp_path,
        inputs=given,
        github={"action_path": str(ACTION.parent)},
        path_dirs=[Path(sys.executable).parent],  # the effconv of this environment (install: false)
    )
    runner.run(doc["runs"]["steps"])
    return runner


@pytest.mark.slow
def test_action_passes_on_parity_and_publishes_the_reports(tmp_path, fixture_ckpt):
    weights = tmp_path / "b0.pth"
    assert run_cli("convert", "--src", fixture_ckpt, "--out", weights, "--variant", "standard", "-q").exit_code == 0
    runner = _run_action(tmp_path, src=str(fixture_ckpt), weights=str(weights), **{"input-sizes": "225"})
    assert not runner.failed, {name: r.stdout[-2000:] + r.stderr[-2000:] for name, r in runner.results.items()}
    assert runner.context["steps"]["verify"]["outputs"] == {"exit-code": "0", "passed": "true"}
    reports = tmp_path / "effconv-reports"
    assert {p.name for p in reports.iterdir()} == {"parity.md", "parity.json", "parity.xml", "parity.png"}
    assert (reports / "parity.md").read_text() in runner.summary.read_text()
    assert "b0@225" in runner.summary.read_text()  # the size asked for
    assert "Upload the reports" in runner.ran and "Fail the job on a parity failure or an error" not in runner.ran


@pytest.mark.slow
def test_action_fails_the_job_on_a_parity_failure(tmp_path, fixture_ckpt):
    runner = _run_action(tmp_path, src=str(fixture_ckpt), args="--atol 1e-9 --rtol 0")  # in-memory conversion
    assert runner.failed
    assert runner.context["steps"]["verify"]["outputs"] == {"exit-code": "1", "passed": "false"}
    assert "FAIL" in runner.summary.read_text() and (tmp_path / "effconv-reports" / "parity.json").is_file()
    assert runner.ran[-2:] == ["Upload the reports", "Fail the job on a parity failure or an error"]
    assert "parity failure" in runner.results["Fail the job on a parity failure or an error"].stdout
