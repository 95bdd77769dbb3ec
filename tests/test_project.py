"""The project's own contract: install files agree, the README's commands are the ones CI runs."""

import re
import shlex
import tomllib
from pathlib import Path

import yaml

from capi_lab.train import resolve_config

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- setup -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README.md must hold the set-up commands in a ```bash block after <!-- setup -->"
    return [ln.strip() for ln in block.group(1).splitlines() if ln.strip() and not ln.startswith("#")]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    cmds = _readme_commands()
    assert len(cmds) == 2
    run_cmd, test_cmd = cmds
    assert "python3 -m venv .venv" in run_cmd and "python3 -m venv .venv" in test_cmd
    assert "pytest" in test_cmd
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci, ".ci/run must run the README's test command verbatim"


def test_readme_first_command_opens_the_app():
    run_cmd = _readme_commands()[0]
    assert run_cmd.endswith(".venv/bin/python app/main.py") and (ROOT / "app" / "main.py").is_file()


def test_readme_quickstart_training_arguments_are_valid():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- quickstart -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README.md's Pretrain section must hold the quick-start run after <!-- quickstart -->"
    args = shlex.split(block.group(1).split("-m capi_lab.train", 1)[1])
    run = resolve_config(args)  # raises SystemExit on a bad flag
    assert run.max_steps == 150 and run.data == "demo-photos" and run.capi.image_size == 32


def test_environment_yml_installs_the_same_package():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = env["dependencies"]
    python = next(d for d in deps if isinstance(d, str) and d.startswith("python="))
    major_minor = python.split("=")[1]
    assert project["requires-python"] == f">={major_minor}"
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert pip == ["-e .[dev]"], "conda users get the package with the same extras as the README"
    readme_install = re.search(r'pip install -q -e "(\.\[[a-z,]+\])"', _readme_commands()[1]).group(1)
    assert readme_install == ".[dev]"


def test_pinned_torch_matches_the_machine_wheels():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.14.1" in deps and "torchvision==0.29.1" in deps
    for need in ("timm", "lightning", "gradio", "plotly", "ipywidgets", "umap-learn", "jupyterlab"):
        assert any(d.startswith(need) for d in deps), need


def test_app_examples_are_attributed():
    examples = ROOT / "capi_lab" / "explore" / "examples"
    photos = sorted(p.name for p in examples.glob("*.jpg"))
    assert 6 <= len(photos) <= 8
    attribution = (examples / "ATTRIBUTION.md").read_text()
    for name in photos:
        row = next(line for line in attribution.splitlines() if line.startswith(f"| {name} |"))
        assert "public domain" in row or "CC0" in row


def test_readme_evaluation_commands_parse():
    """Every evaluation, features, visualisation and shard-writer command the README shows is accepted by its
    parser (flags and values), so the README cannot drift from the command lines."""
    import shlex

    from capi_lab import features, visualize
    from capi_lab.data import shards
    from capi_lab.evaluation import __main__ as capi_eval

    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    parsers = {"capi_lab.evaluation": capi_eval.parse_args, "capi_lab.features": features.parse_args,
               "capi_lab.visualize": visualize.parse_args, "capi_lab.data.shards": shards.parse_args}  # fmt: skip
    seen = set()
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        for module, parse in parsers.items():
            prefix = f".venv/bin/python -m {module} "
            if line.startswith(prefix):
                parse(shlex.split(line[len(prefix) :]))
                seen.add(module)
    assert seen == set(parsers)


def test_every_local_link_and_picture_of_the_docs_exists():
    """README and the benchmark notes link files of the tree (screenshots, notebooks, results): none may be missing."""
    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "benchmarks").glob("*.md"))]:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)  # commands, not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            path = target.split("#")[0]
            if path and not re.match(r"[a-z]+:", path) and not (doc.parent / path).exists():
                missing.append(f"{doc.name}: {target}")
    assert not missing, "links to files that are not in the tree: " + ", ".join(missing)
