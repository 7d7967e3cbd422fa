"""Every ``python -m pm_dist.*`` / ``torchrun … -m pm_dist.*`` command shown in README.md and the
user-facing docs parses with the real command line (flags exist, values are accepted), and each
training command's config file and overrides load."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = ["README.md", "docs/models.md", "docs/evaluation.md", "docs/training.md"]


def _commands(text: str) -> list[str]:
    out, variables = [], {}
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        lines = block.replace("\\\n", " ").splitlines()
        for line in lines:
            m = re.match(r'^(\w+)="(.*)"$', line.strip())
            if m:
                variables[m.group(1)] = m.group(2)
                continue
            for name, value in variables.items():
                line = line.replace(f"${name}", value)
            if line.lstrip().startswith("$"):  # a shell session showing an error on purpose
                continue
            line = re.sub(r"\[--[^\]]*\]", "", line)  # usage notation: [--opset 17]
            if re.search(r"-m pm_dist\.", line):
                out.append(line)
    return out


def _parse(line: str):
    from pm_dist import embed, evaluate, export, train
    from pm_dist.config import load_config
    from pm_dist.data import convert

    tokens = shlex.split(line, comments=True)
    i = tokens.index("-m")
    module, argv = tokens[i + 1], tokens[i + 2:]
    argv = [a for a in argv if a not in ("…", "...")]
    parsers = {"pm_dist.evaluate": evaluate.build_parser, "pm_dist.export": export.build_parser,
               "pm_dist.embed": embed.build_parser, "pm_dist.data.convert": convert.parser}
    if module == "pm_dist.train":
        args = train.parse_args(argv)
        load_config(args.config, args.overrides)
    elif module in parsers:
        parsers[module]().parse_args(argv)
    return module


COMMANDS = [(f, c) for f in FILES for c in _commands((ROOT / f).read_text())]


def test_the_docs_show_commands():
    modules = {shlex.split(c, comments=True)[shlex.split(c, comments=True).index("-m") + 1]
               for f, c in COMMANDS if f == "README.md"}
    assert {"pm_dist.train", "pm_dist.data.convert", "pm_dist.export", "pm_dist.evaluate",
            "pm_dist.embed"} <= modules


@pytest.mark.parametrize("where,line", COMMANDS, ids=[f"{f}:{i}" for i, (f, _) in enumerate(COMMANDS)])
def test_command_parses(where, line, monkeypatch):
    monkeypatch.chdir(ROOT)
    try:
        _parse(line)
    except SystemExit as exc:
        pytest.fail(f"{where}: `{line.strip()}` does not parse (exit {exc.code})")
