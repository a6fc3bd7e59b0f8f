"""The README and docs/ stay true to the code: every ``rlhf-ray`` command in their code blocks parses
and its overrides are real config fields, every config field they name exists, every repo path they
name exists, and the commands that are cheap to run here print what the docs say they print."""

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from rlhf_ray.cli import _parser, main
from rlhf_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "examples").glob("**/README.md"))]
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")
COMMAND = re.compile(r"^(\$ )?([A-Z_][A-Z0-9_]*=\S* )*(\S*/)?rlhf-ray( |$)")
FILE_SUFFIXES = {"py", "md", "json", "jsonl", "yaml", "png", "pt", "safetensors", "parquet", "gguf", "log", "sh"}


def _code_lines(text: str):
    """(line number, line) of the lines in fenced code blocks, continuation lines joined."""
    inside, pending, start = False, "", 0
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        line = line.split("  # ")[0].rstrip() if not line.lstrip().startswith("#") else ""
        if pending:
            line = pending + " " + line.strip()
        else:
            start = n
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        pending = ""
        yield start, line


def _commands():
    for doc in DOCS:
        for n, line in _code_lines(doc.read_text()):
            if not COMMAND.match(line.strip()):  # (program output, other tools)
                continue
            words = shlex.split(line.strip().removeprefix("$ "))
            while words and ENV_ASSIGNMENT.match(words[0]):
                words = words[1:]
            if words and Path(words[0]).name == "rlhf-ray":
                yield pytest.param(words[1:], id=f"{doc.name}:{n}")


def _config_fields() -> set[str]:
    cfg = load_config()
    names = set()
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if dataclasses.is_dataclass(value):
            names |= {f"{section.name}.{f.name}" for f in dataclasses.fields(value)}
        else:
            names.add(section.name)
    return names


def test_the_docs_exist_and_the_readme_links_every_guide():
    readme = (ROOT / "README.md").read_text()
    guides = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert guides, "docs/ has no guides"
    for name in guides:
        assert f"docs/{name}" in readme, f"README.md does not link docs/{name}"


@pytest.mark.parametrize("argv", list(_commands()))
def test_every_command_in_the_docs_parses_with_real_fields(argv):
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        if argv and argv[-1] in ("--help", "-h", "--version") and e.code == 0:
            return
        raise AssertionError(f"rlhf-ray {shlex.join(argv)}: argparse refused it") from None
    if args.command == "import-gguf":  # the wheel's model by name, or a GGUF file in the repo
        assert args.gguf_file == "smollm2" or (ROOT / args.gguf_file).is_file(), args.gguf_file
        return
    assert not args.config or (ROOT / args.config).is_file(), f"--config {args.config}: no such file in the repo"
    load_config(ROOT / args.config if args.config else None, args.overrides)  # raises ConfigError naming the field


def test_every_config_field_the_docs_name_exists():
    sections = {"model", "sft", "data", "rm", "serve", "ppo", "rollout", "learner"}
    fields = _config_fields()
    unknown = []
    for doc in DOCS:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            for m in re.finditer(r"(?<![\w./-])([a-z]+)\.([a-z_][a-z0-9_]*)\b(?![(/-])", line):
                section, name = m.groups()
                if section in sections and f"{section}.{name}" not in fields and name not in FILE_SUFFIXES:
                    unknown.append(f"{doc.name}:{n}: {section}.{name}")
    assert not unknown, "fields the config does not have:\n" + "\n".join(unknown)


def test_every_repo_path_the_docs_name_exists():
    missing = []
    for doc in DOCS:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            for m in re.finditer(r"`((?:rlhf_ray|tests|benchmarks|examples|docs|\.ci)/[\w./-]*[\w/])`", line):
                path = m.group(1).split(":")[0]
                if not (ROOT / path).exists() and not any(c in path for c in "*{<"):
                    missing.append(f"{doc.name}:{n}: {path}")
    assert not missing, "paths that do not exist:\n" + "\n".join(missing)


def test_the_commands_the_docs_show_print_what_they_say(capsys):
    """The cheap commands, run: --version, show-config, and a config error as the README quotes it."""
    assert main(["show-config", "rm.num_workers=4"]) == 0
    assert "  num_workers: 4\n" in capsys.readouterr().out
    assert main(["train-rm", "rm.num_worker=2"]) == 2
    err = capsys.readouterr().err
    assert "did you mean rm.num_workers (not num_worker)?" in err
    assert "did you mean rm.num_workers (not num_worker)?" in (ROOT / "README.md").read_text()
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and re.match(r"rlhf-ray \d+\.\d+", capsys.readouterr().out)


def _doc_default(value) -> str:
    """A default as the reference tables write it: strings in backticks ('' when empty), booleans in
    YAML's words, lists as []."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"`{value}`" if value else "`''`"
    if isinstance(value, tuple):
        return "`[]`" if not value else repr(list(value))
    return str(value)


def test_the_ppo_reference_tables_list_every_field_with_its_default():
    """docs/ppo.md's tables by purpose hold every ppo.*, rollout.* and learner.* field (those placing
    actors by node resource are in docs/cluster.md) with the schema's default."""
    cfg = load_config()
    rows = dict(re.findall(r"^\| `((?:ppo|rollout|learner)\.\w+)` \| ([^|]+?) \|", (ROOT / "docs/ppo.md").read_text(), re.M))
    wanted = {name for name in _config_fields() if name.split(".")[0] in ("ppo", "rollout", "learner")}
    assert set(rows) == wanted - {"rollout.node_resource", "learner.node_resource"}
    for name, written in rows.items():
        section, key = name.split(".")
        assert written == _doc_default(getattr(getattr(cfg, section), key)), name
