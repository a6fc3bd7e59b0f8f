"""``rlhf-ray show-config``: every field of a config with its value and the comment the schema gives it,
as YAML that can be edited into a config file."""

from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize

import yaml

from rlhf_ray.config.schema import Config


def field_comments(cls: type) -> dict[str, list[str]]:
    """The comment lines written above each field of the dataclass ``cls`` (and after it on its line),
    from its source."""
    source = inspect.getsource(cls)
    comments: dict[str, list[str]] = {}
    pending: list[str] = []
    names = {f.name for f in dataclasses.fields(cls)}
    last_field, last_row = None, -1
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if tok.start[0] == last_row and last_field:  # after the field on its line
                comments[last_field].append(text)
            else:
                pending.append(text)
        elif tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in names and tok.string not in comments:
            comments[tok.string], pending = pending, []
            last_field, last_row = tok.string, tok.start[0]
        elif tok.type == tokenize.NL and tok.start[1] == 0 and not tok.line.strip():
            pending = []  # a blank line ends a comment block
    return comments


def _yaml_value(value) -> str:
    if isinstance(value, tuple):
        value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-4].strip() if text.endswith("\n...") else text.removesuffix("...").strip()


def describe_config(cfg: Config) -> str:
    """``cfg`` as commented YAML: one block per section, each field under its comment."""
    out = ["# Every field of the config with its value here; a config file (--config FILE.yaml) sets any of",
           "# them, and the command line too (section.field=value, e.g. rm.num_workers=2)."]
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(value):
            out += ["", *[f"# {c}" for c in field_comments(Config).get(section.name, [])],
                    f"{section.name}: {_yaml_value(value)}"]
            continue
        out += ["", f"{section.name}:"]
        comments = field_comments(type(value))
        for f in dataclasses.fields(value):
            out += [f"  # {c}" for c in comments.get(f.name, [])]
            out.append(f"  {f.name}: {_yaml_value(getattr(value, f.name))}")
    return "\n".join(out) + "\n"
