"""The user-facing docs against the code, so that a doc claim that drifts fails here:

* every ``python -m pm_dist.*`` / ``torchrun … -m pm_dist.*`` / ``python -m benchmarks.*`` command
  shown in a code block parses with the real command line (flags spelled out exactly: no argparse
  abbreviations), and each training command's config file and overrides load (a command naming a
  plugin of the reader's, ``--plugin``/``PM_DIST_PLUGINS``, only parses); an inline command names
  a real module;
* every error shown after a ``$ python -m pm_dist.train …`` line, and every ``config error: …``
  quoted in the text, is the message the command prints;
* every ``--flag`` named in the text exists on one of pm_dist's commands or benchmarks;
* every config key named (``run.steps``, ``head.memory.*``, ``key=value``) exists in the config tree,
  and docs/training.md's key table lists every key of the sections it covers, with the code's
  defaults;
* every repository path (``pm_dist/…``, ``configs/…``, ``tests/…``) exists, and every
  ``pm_dist.x.y`` named is importable;
* the statements of docs/training.md about exponents, ``head.memory.*`` overrides and the epoch
  resolution's log line hold.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from pm_dist.config import RunConfig, load_config
from pm_dist.config_io import ConfigError, typed_keys

ROOT = Path(__file__).resolve().parents[1]
FILES = ["README.md", "docs/models.md", "docs/evaluation.md", "docs/training.md", "docs/data.md",
         "docs/extending.md", "docs/architecture.md", "docs/heads.md", "docs/prototype_memory.md",
         "docs/launch.md", "docs/benchmarks.md", "docs/mining.md"]
TEXT = {f: (ROOT / f).read_text() for f in FILES}
SECTIONS = tuple(typed_keys(RunConfig))
FILE_ENDINGS = (".md", ".py", ".json", ".jsonl", ".yaml", ".pt", ".pth", ".png", ".txt", ".npy",
                ".bin", ".onnx", ".log", ".csv", ".arrow")


def _fenced(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)


def _indented(text: str) -> list[str]:
    """Markdown's other code block: lines indented by four spaces after a blank line (outside
    fences), the indent removed."""
    out, unfenced = [], re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    for m in re.finditer(r"(?:^|\n)\n((?: {4}[^\n]*\n?)+)", unfenced):
        out.append("\n".join(line[4:] for line in m.group(1).splitlines()) + "\n")
    return out


def _blocks(text: str) -> list[str]:
    return _fenced(text) + _indented(text)


def _prose(text: str) -> str:
    text = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    return re.sub(r"(?:^|\n)\n(?: {4}[^\n]*\n?)+", "\n\n", text)


def _spans(text: str) -> list[str]:
    """Inline code spans of the prose (they may wrap over a line break), whitespace collapsed."""
    return [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", _prose(text))]


COMMAND = re.compile(r"-m (pm_dist|benchmarks)\.")


def _commands(text: str) -> list[str]:
    out, variables = [], {}
    for block in _blocks(text):
        lines = block.replace("\\\n", " ").splitlines()
        for line in lines:
            m = re.match(r'^(\w+)="(.*)"$', line.strip())
            if m:
                variables[m.group(1)] = m.group(2)
                continue
            for name, value in variables.items():
                line = line.replace(f"${name}", value)
            if line.lstrip().startswith(("$", "#")):  # a shell session (tested below), a comment
                continue
            line = re.sub(r"\[--[^\]]*\]", "", line)  # usage notation: [--opset 17]
            if COMMAND.search(line):
                out.append(line)
    return out


def _sessions(text: str) -> list[tuple[str, list[str]]]:
    """``$ command`` lines of the code blocks, each with the output lines shown after it."""
    out = []
    for block in _blocks(text):
        for line in block.splitlines():
            if line.startswith("$ "):
                out.append((line[2:], []))
            elif out and line.strip() and block.find(out[-1][0]) >= 0:
                out[-1][1].append(line)
    return out


@pytest.fixture
def strict_argparse(monkeypatch):
    """argparse without abbreviations: ``--embedding`` must not pass for ``--embedding-size``."""
    init = argparse.ArgumentParser.__init__

    def no_abbrev(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        init(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "__init__", no_abbrev)


def _parsers() -> dict:
    from pm_dist import embed, evaluate, export, train
    from pm_dist.data import convert

    def train_parser():
        parser = {}

        def capture(self, *a, **k):  # train builds its parser inside parse_args
            parser["p"] = self
            raise SystemExit(0)

        saved = argparse.ArgumentParser.parse_args
        argparse.ArgumentParser.parse_args = capture
        try:
            with contextlib.suppress(SystemExit):
                train.parse_args([])
        finally:
            argparse.ArgumentParser.parse_args = saved
        return parser["p"]

    return {"pm_dist.train": train_parser(), "pm_dist.evaluate": evaluate.build_parser(),
            "pm_dist.export": export.build_parser(), "pm_dist.embed": embed.build_parser(),
            "pm_dist.data.convert": convert.parser(),
            **{module: _benchmark_parser(module) for module in BENCHMARKS}}


BENCHMARKS = sorted(f"benchmarks.{p.stem}" for p in (ROOT / "benchmarks").glob("*.py")
                    if p.stem not in ("__init__", "common") and "def main(" in p.read_text())


class _Captured(Exception):
    pass


def _benchmark_parser(module: str) -> argparse.ArgumentParser:
    """The parser a benchmark's ``main`` builds (each builds it inside main), taken at its
    ``parse_args`` call, before the benchmark runs anything."""
    def capture(self, *a, **k):
        raise _Captured(self)

    saved = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture
    try:
        importlib.import_module(module).main([])
    except _Captured as c:
        return c.args[0]
    finally:
        argparse.ArgumentParser.parse_args = saved
    raise AssertionError(f"{module}.main never parsed its arguments")


def _parse(line: str):
    from pm_dist import embed, evaluate, export, train
    from pm_dist.data import convert

    tokens = shlex.split(line, comments=True)
    i = tokens.index("-m")
    module, argv = tokens[i + 1], tokens[i + 2:]
    argv = [a for a in argv if a not in ("…", "...", "$@")]  # "$@": a launcher script's arguments
    parsers = {"pm_dist.evaluate": evaluate.build_parser, "pm_dist.export": export.build_parser,
               "pm_dist.embed": embed.build_parser, "pm_dist.data.convert": convert.parser}
    # the reader's own plugin (docs/extending.md): the command line parses, its config is theirs
    plugin = "--plugin" in argv or any(t.startswith("PM_DIST_PLUGINS=") for t in tokens[:i])
    if module == "pm_dist.train":
        args = train.parse_args(argv)
        if not plugin:
            load_config(args.config, args.overrides)
    elif module in parsers:
        parsers[module]().parse_args(argv)
    elif module in BENCHMARKS:
        _benchmark_parser(module).parse_args(argv)
    else:
        pytest.fail(f"no parser known for {module}")
    return module


COMMANDS = [(f, c) for f in FILES for c in _commands(TEXT[f])]


def test_the_docs_show_commands():
    modules = {shlex.split(c, comments=True)[shlex.split(c, comments=True).index("-m") + 1]
               for f, c in COMMANDS if f == "README.md"}
    assert {"pm_dist.train", "pm_dist.data.convert", "pm_dist.export", "pm_dist.evaluate",
            "pm_dist.embed"} <= modules
    assert any(f == "docs/data.md" for f, _ in COMMANDS)


@pytest.mark.parametrize("where,line", COMMANDS, ids=[f"{f}:{i}" for i, (f, _) in enumerate(COMMANDS)])
def test_command_parses(where, line, monkeypatch, strict_argparse):
    monkeypatch.chdir(ROOT)
    try:
        _parse(line)
    except SystemExit as exc:
        pytest.fail(f"{where}: `{line.strip()}` does not parse (exit {exc.code})")


def test_inline_commands_name_real_modules():
    """Inline mentions (`python -m pm_dist.export --encoder runs/x/checkpoints`) are often partial;
    their flags are checked below, their module here."""
    known = set(_parsers())
    named = {(f, m) for f in FILES for s in _spans(TEXT[f]) for m in re.findall(r"-m ([\w.]+)", s)}
    assert len(named) > 10
    assert not sorted((f, m) for f, m in named if m not in known)


def test_the_benchmark_commands_are_checked():
    assert {"benchmarks.encoder_speed", "benchmarks.accuracy", "benchmarks.head_scaling",
            "benchmarks.train_throughput"} <= {shlex.split(c, comments=True)[shlex.split(
                c, comments=True).index("-m") + 1] for _, c in COMMANDS}
    with pytest.raises(SystemExit):
        _benchmark_parser("benchmarks.encoder_speed").parse_args(["--arch", "r5O"])


def test_strict_parsing_refuses_an_abbreviation(strict_argparse):
    with pytest.raises(SystemExit):
        _parse("python -m pm_dist.evaluate --model m.pt --embedding 512")


# --- errors shown are the real messages ------------------------------------------------------
def _train_stderr(argv: list[str]) -> tuple[int, str]:
    from pm_dist.train import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


SESSIONS = [(f, cmd, out) for f in FILES for cmd, out in _sessions(TEXT[f])]


def test_the_docs_show_sessions():
    assert len([s for s in SESSIONS if s[0] == "docs/training.md"]) >= 5


@pytest.mark.parametrize("where,command,output", SESSIONS,
                         ids=[f"{f}:{c.split()[-1]}" for f, c, _ in SESSIONS])
def test_shell_sessions_show_real_output(where, command, output, monkeypatch):
    monkeypatch.chdir(ROOT)
    tokens = shlex.split(command)
    assert tokens[:3] == ["python", "-m", "pm_dist.train"], f"{where}: no runner for `{command}`"
    code, err = _train_stderr(tokens[3:])
    assert code == 2 and err.splitlines() == output, f"{where}: `{command}` printed {err!r}"


# config error messages quoted in the prose → the arguments that produce them
QUOTED_ERRORS = {
    "config error: run.steps: expected an integer, got '1e3'": ["run.steps=1e3"],
    "config error: run: run.steps=101160 and run.epochs=20 are mutually exclusive: set one "
    "(e.g. run.steps=null run.epochs=20)": ["--config", "configs/ms1mv3_r50_pm.yaml", "run.epochs=20"],
    "config error: run.wandb: true needs the wandb package, which is not installed: pip install "
    "'pm_dist[wandb]' (or pip install wandb), or set run.wandb=false": ["run.wandb=true"],
}


def test_every_quoted_config_error_is_known():
    quoted = {s for f in FILES for s in _spans(TEXT[f]) if s.startswith("config error:")}
    assert quoted == set(QUOTED_ERRORS), "a config error quoted in the docs has no test here"


@pytest.mark.parametrize("message", sorted(QUOTED_ERRORS))
def test_quoted_config_errors_are_real(message, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    code, err = _train_stderr(QUOTED_ERRORS[message])
    assert (code, err.strip()) == (2, message)


# --- flags, keys, paths, names ---------------------------------------------------------------
OTHER_TOOLS_FLAGS = {"--standalone", "--nproc_per_node", "--nnodes", "--max-restarts",  # torchrun
                     "--rdzv_id", "--rdzv_backend", "--rdzv_endpoint",
                     "--logdir",  # tensorboard
                     "--account", "--cpus-per-task", "--gpus-per-node", "--kill-on-bad-exit",  # slurm
                     "--no-requeue", "--nodes", "--ntasks-per-node", "--open-mode", "--partition",
                     "--requeue", "--signal", "--time"}


def _all_flags() -> set[str]:
    flags = set()
    for parser in _parsers().values():
        stack = [parser]
        while stack:
            p = stack.pop()
            for action in p._actions:
                flags.update(s for s in action.option_strings if s.startswith("--"))
                if isinstance(action, argparse._SubParsersAction):
                    stack.extend(action.choices.values())
    return flags


def test_flags_named_in_the_text_exist():
    known = _all_flags() | OTHER_TOOLS_FLAGS
    named = {(f, flag) for f in FILES for s in _spans(TEXT[f])
             for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", s)}
    assert len(named) > 20
    missing = sorted((f, flag) for f, flag in named if flag not in known)
    assert not missing, f"flags named in the docs that no pm_dist command or benchmark has: {missing}"


REMOVED_KEYS = {"data.proposal_fraction"}  # named as gone; must be refused
NOT_KEYS = {"deepspeed.initialize"}  # DeepSpeed's function, named in the text
PLUGIN_KEYS = {"head.centers"}  # docs/extending.md's example head: tests/plugins/toy_plugin.py


def _head_attribute(key: str) -> bool:
    """``head.step``, ``head.shard_state()``: the head object's attributes, not config keys."""
    from pm_dist.heads import Head
    from pm_dist.heads.memory import PrototypeMemory

    section, _, name = key.partition(".")
    if section != "head" or "." in name:
        return False
    memory_source = (ROOT / "pm_dist" / "heads" / "memory.py").read_text()
    return (hasattr(Head, name) or hasattr(PrototypeMemory, name)
            or re.search(rf"self\.{name}\s*[:=]", memory_source) is not None)


def _session_keys() -> set[str]:
    """Keys misspelt on purpose in the error sessions (their output is tested above)."""
    return {k for _, command, _ in SESSIONS for k in _config_keys(command)}


def _config_keys(text: str) -> set[str]:
    pattern = rf"(?<![\w./-])((?:{'|'.join(SECTIONS)})\.[A-Za-z_][\w.]*(?:\.\*)?)"
    keys = set()
    for key in re.findall(pattern, text):
        key = key.rstrip(".")
        if key.endswith(FILE_ENDINGS):
            continue
        keys.add(key[:-2] if key.endswith(".*") else key)
    return keys


def _key_exists(key: str) -> bool:
    node = RunConfig
    for part in key.split("."):
        if node is None:
            return False
        keys = typed_keys(node)
        if part not in keys:
            return False
        hint = keys[part]
        node = hint if isinstance(hint, type) and hasattr(hint, "__dataclass_fields__") else None
    return True


def test_config_keys_named_in_the_docs_exist():
    named = {(f, k) for f in FILES for k in _config_keys(TEXT[f])}
    assert len(named) > 60 and ("docs/training.md", "head.memory") in named
    ignored = REMOVED_KEYS | NOT_KEYS | PLUGIN_KEYS | _session_keys()
    missing = sorted((f, k) for f, k in named
                     if k not in ignored and not _key_exists(k) and not _head_attribute(k))
    assert not missing, f"config keys named in the docs that the config does not have: {missing}"
    toy = (ROOT / "tests" / "plugins" / "toy_plugin.py").read_text()
    for key in PLUGIN_KEYS:
        assert f'register_head("{key.split(".")[1]}"' in toy, key
    for key in REMOVED_KEYS:
        assert not _key_exists(key)
        with pytest.raises(ConfigError):
            load_config(None, [f"{key}=0.5"])


REPO_DIRS = ("pm_dist/", "configs/", "docs/", "tests/", "launch/", "benchmarks/")


def test_repository_paths_named_exist():
    named = {(f, s) for f in FILES for s in _spans(TEXT[f]) if s.startswith(REPO_DIRS) and " " not in s}
    assert len(named) > 20

    def exists(path: str) -> bool:  # a file, or a test: tests/test_x.py::test_name (… a prefix)
        path, _, test = path.partition("::")
        if not (ROOT / path).exists():
            return False
        name = test.rstrip("…").split("[")[0]
        end = "" if test.endswith("…") else r"\b"
        return not test or re.search(rf"^(async )?def {re.escape(name)}{end}", (ROOT / path).read_text(),
                                     flags=re.M) is not None

    missing = sorted((f, p) for f, p in named if not exists(p))
    assert not missing, f"paths named in the docs that do not exist: {missing}"


ONNX_PROPS = {"pm_dist.arch", "pm_dist.embedding_size", "pm_dist.image_size", "pm_dist.input",
              "pm_dist.output"}  # metadata keys of the exported ONNX file, not modules


def test_pm_dist_names_resolve():
    export_source = (ROOT / "pm_dist" / "export.py").read_text()
    for prop in ONNX_PROPS:
        assert f'"{prop}"' in export_source, prop
    names = {s for f in FILES for s in _spans(TEXT[f]) if re.fullmatch(r"pm_dist(\.\w+)+", s)}
    assert len(names - ONNX_PROPS) >= 5
    for name in sorted(names - ONNX_PROPS):
        parts = name.split(".")
        for i in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            for attr in parts[i:]:
                assert hasattr(obj, attr), f"{name}: {'.'.join(parts[:i])} has no {attr}"
                obj = getattr(obj, attr)
            break
        else:
            pytest.fail(f"{name} does not import")


def test_python_imports_in_the_docs_work():
    for f in FILES:
        for block in re.findall(r"```python\n(.*?)```", TEXT[f], flags=re.S):
            for line in block.splitlines():
                if re.match(r"(from pm_dist\S* import |import pm_dist)", line):
                    exec(line, {})


# --- docs/training.md's statements on values ----------------------------------------------------
def test_exponents_parse_as_training_md_says(tmp_path):
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 1e-3
    assert load_config(None, ["optim.lr=1.0e-3"]).optim.lr == 1e-3
    path = tmp_path / "run.yaml"
    path.write_text("optim: {lr: 1e-3, weight_decay: 5e-4}\n")
    cfg = load_config(str(path))
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (1e-3, 5e-4)
    assert load_config(None, ["run.steps=1000"]).run.steps == 1000


def test_memory_override_without_a_file_updates_the_default(monkeypatch):
    monkeypatch.chdir(ROOT)
    text = TEXT["docs/training.md"]
    assert "python -m pm_dist.train head.memory.ema_alpha=0.7" in text
    default = load_config(None).head.sections["memory"]
    memory = load_config(None, ["head.memory.ema_alpha=0.7"]).head.sections["memory"]
    assert memory.ema_alpha == 0.7 and memory.capacity == default.capacity == 512
    assert f"capacity {default.capacity} included" in text
    from_file = load_config("configs/cpu_demo.yaml", ["head.memory.ema_alpha=0.7"]).head.sections["memory"]
    assert from_file.ema_alpha == 0.7 and from_file.capacity == default.capacity


def test_unknown_key_without_a_close_one_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="log_every") as err:
        load_config(None, ["run.qqqqqqqq=1"])
    assert "run.qqqqqqqq" in str(err.value)


def test_world_size_checks_at_start(monkeypatch):
    """'the global batch must divide by the number of processes, and the Prototype Memory needs
    capacity ≥ classes_per_batch × world size ...; the error says the minimum'."""
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match="does not split over 3 ranks"):
        load_config(None).preflight(3)
    with pytest.raises(ConfigError, match="1024"):  # 64 classes × 16 ranks
        load_config(None, ["head.memory.capacity=600"]).preflight(16)


# --- defaults stated in docs/data.md ---------------------------------------------------------
def test_data_config_defaults_as_data_md_states():
    import ast
    import dataclasses

    from pm_dist.data import DataConfig

    text = TEXT["docs/data.md"]
    section = text[text.index("## Configuration"):text.index("## Arrow dataset format")]
    stated = dict(re.findall(r"`(\w+)` \[([^\]]+)\]", section))
    assert len(stated) >= 15
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    defaults = DataConfig()
    for name, value in stated.items():
        assert name in fields, f"docs/data.md names DataConfig.{name}, which does not exist"
        assert getattr(defaults, name) == ast.literal_eval(value), name
    # the converter's defaults: `--shard-rows` [10000]
    convert = _parsers()["pm_dist.data.convert"]
    rec = next(a for a in convert._actions if isinstance(a, argparse._SubParsersAction)).choices["rec"]
    for flag, value in re.findall(r"`(--[a-z-]+)` \[([^\]]+)\]", text):
        action = next(a for a in rec._actions if flag in a.option_strings)
        assert action.default == ast.literal_eval(value), flag


# --- links --------------------------------------------------------------------------------------
def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for heading in re.findall(r"^#+ (.*)$", _prose(text), flags=re.M):
        out.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return out


def test_relative_links_and_anchors_resolve():
    checked = 0
    for f in FILES:
        for target in re.findall(r"\]\(([^)\s]+)\)", _prose(TEXT[f])):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (ROOT / f).parent / path if path else ROOT / f
            assert file.exists(), f"{f}: link to {target}: no such file"
            if anchor:
                assert anchor in _anchors(file.read_text()), f"{f}: link to {target}: no such heading"
            checked += 1
    assert checked >= 10


# --- docs/training.md's tables ----------------------------------------------------------------
def _table(text: str, start: str, end: str) -> list[list[str]]:
    part = text[text.index(start):text.index(end)]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in part.splitlines() if line.startswith("|")]
    return rows[2:]  # past the header and its rule


def _names_under(cls) -> set[str]:
    """Keys and the Literal choices of every key below a config section."""
    import dataclasses
    import typing

    names, stack = set(), [cls]
    while stack:
        node = stack.pop()
        for key, hint in typed_keys(node).items():
            names.add(key)
            for arg in (hint, *typing.get_args(hint)):
                if dataclasses.is_dataclass(arg):
                    stack.append(arg)
                if typing.get_origin(arg) is typing.Literal:
                    names.update(map(str, typing.get_args(arg)))
    return names


def test_config_tree_table_names_real_keys():
    from pm_dist.models import MODEL_NAMES
    from pm_dist.models.registry import ALIASES

    rows = _table(TEXT["docs/training.md"], "### The config tree", "### Every key")
    assert [r[0].strip("`") for r in rows] == list(SECTIONS)
    # values a key takes that the types do not list (free strings checked by validate())
    values = set(MODEL_NAMES) | set(ALIASES) | {"synthetic", "arrow", "uniform", "count", "prototype_memory"}
    for row in rows:
        section = row[0].strip("`")
        known = _names_under(typed_keys(RunConfig)[section]) | values
        for token in re.findall(r"`([^`]+)`", row[1]):
            if "." in token:  # a full key: test_config_keys_named_in_the_docs_exist
                continue
            first, *rest = token.split("/")
            assert first in known and all(r.isdigit() for r in rest), f"{section}: `{token}`"


def _leaf_keys(cls, prefix: str = "") -> dict[str, tuple]:
    """``{"run.steps": (type hint, default), ...}`` for every key below ``cls``."""
    import dataclasses

    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else
                         f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
                for f in dataclasses.fields(cls)}
    out = {}
    for key, hint in typed_keys(cls).items():
        if dataclasses.is_dataclass(hint):
            out.update(_leaf_keys(hint, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = (hint, defaults[key])
    return out


# sections documented with their defaults elsewhere: data.md's and prototype_memory.md's tables
ELSEWHERE = {"data": "docs/data.md", "head.memory": "docs/prototype_memory.md"}


def test_every_key_table_lists_every_key_with_its_default():
    """docs/training.md's "Every key" table against the config tree, both directions: every key of
    pm_dist's sections (not a plugin's) is a row, every row a key, and each default is the code's."""
    from pm_dist.config_io import _coerce

    text = TEXT["docs/training.md"]
    assert all(f"({Path(doc).name}#configuration)" in text[text.index("### Every key"):]
               for doc in ELSEWHERE.values())
    rows = {r[0].strip("`"): r[1] for r in _table(text, "### Every key", "### Overrides")}
    keys = {k: v for k, v in _leaf_keys(RunConfig).items()
            if not k.startswith(tuple(f"{s}." for s in ELSEWHERE))}
    keys = {k: v for k, v in keys.items()  # a plugin's head (tests/plugins) registered by another test
            if not k.startswith("head.") or k.split(".")[1] not in _plugin_sections()}
    assert sorted(set(keys) - set(rows)) == [], "keys missing from the table"
    assert sorted(set(rows) - set(keys)) == [], "rows of the table that are no config key"
    for key, shown in rows.items():
        hint, default = keys[key]
        value = _coerce(yaml.safe_load(shown.strip("`")), hint, key)
        assert value == default, f"{key}: the table says {shown}, the code {default!r}"


def test_cpu_demo_shows_every_key_with_its_default(monkeypatch):
    """'`configs/cpu_demo.yaml` shows every key with its default' (docs/training.md)."""
    from pm_dist.config_io import to_dict

    monkeypatch.chdir(ROOT)
    assert "`configs/cpu_demo.yaml` shows every key with its default" in TEXT["docs/training.md"]

    def flat(tree: dict, prefix: str = "") -> set[str]:
        out = set()
        for key, value in tree.items():
            if isinstance(value, dict):
                out |= flat(value, f"{prefix}{key}.")
            else:
                out.add(f"{prefix}{key}")
        return out

    shown = flat(yaml.safe_load((ROOT / "configs" / "cpu_demo.yaml").read_text()))
    keys = {k for k in _leaf_keys(RunConfig) if not k.startswith("head.")
            or k.split(".")[1] not in _plugin_sections()}
    assert shown == keys - {"head.memory.num_classes"}  # set by the trainer, never by a config
    assert to_dict(load_config("configs/cpu_demo.yaml")) == to_dict(load_config(None))


def _plugin_sections() -> set[str]:
    from pm_dist.config import HeadSection

    return {name for name, cls in HeadSection.open_sections().items()
            if not cls.__module__.startswith("pm_dist.")}


def test_memory_options_table_matches_memory_config():
    import dataclasses

    from pm_dist.heads.memory_config import MemoryConfig

    rows = _table(TEXT["docs/prototype_memory.md"], "## Configuration", "The margin (CosFace")
    shown = {r[0].strip("`"): r[1].strip("`") for r in rows}
    fields = {f.name: f.default for f in dataclasses.fields(MemoryConfig) if f.init}
    assert set(shown) == set(fields)
    for name, value in shown.items():
        if name == "num_classes":
            assert value == "from the data" and fields[name] is None
            continue
        assert yaml.safe_load(value) == fields[name] or value == str(fields[name]), name


def test_epoch_resolution_line_is_what_the_run_prints(monkeypatch):
    """The sample line of docs/training.md's "Epochs instead of steps" is describe_resolution's
    output for the command shown above it (the embedded default's synthetic identities)."""
    from pm_dist.data.datasets import build_dataset
    from pm_dist.train import parse_args
    from pm_dist.training.optim import describe_resolution, resolve_epochs
    from pm_dist.training.outputs import dataset_images

    monkeypatch.chdir(ROOT)
    text = TEXT["docs/training.md"]
    section = text[text.index("## Epochs instead of steps"):]
    command, shown = _blocks(section)[:2]
    argv = shlex.split(command.replace("\\\n", " "))
    args = parse_args(argv[argv.index("-m") + 2:])
    cfg = load_config(args.config, args.overrides)
    line = describe_resolution(resolve_epochs(cfg, dataset_images(build_dataset(cfg.data), needed=True)))
    assert shown.strip() == line


def test_recipe_table_matches_the_recipes(monkeypatch):
    monkeypatch.chdir(ROOT)
    rows = _table(TEXT["docs/training.md"], "### Recipes", "`cpu_demo.yaml` is the embedded")
    assert sorted(r[0].strip("`") for r in rows) == sorted(
        f"configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml"))
    heads = {"prototype_memory": "Prototype Memory", "partial_fc": "Partial FC", "full_fc": "Full FC"}
    for path, _data, encoder, head, _gpus in rows:
        cfg = load_config(path.strip("`"))
        assert heads[cfg.head.name] in head, path
        if cfg.head.name == "prototype_memory":
            assert f"{cfg.head.options.capacity:,}" in head, path
        if cfg.head.name == "partial_fc":
            assert f"sample rate {cfg.head.options.sample_rate:g}" in head, path
        arch = {"iresnet50": "IResNet-50", "iresnet100": "IResNet-100"}.get(cfg.model.name,
                                                                          f"`{cfg.model.name}`")
        assert arch in encoder, path


# --- Python signatures quoted in the text -------------------------------------------------------
SIGNATURES = {  # the name as the docs write it → where it lives
    "load_any_encoder": "pm_dist.models.loading.load_any_encoder",
    "save_encoder": "pm_dist.models.save_encoder",
    "load_encoder": "pm_dist.models.load_encoder",
    "export_onnx": "pm_dist.export.export_onnx",
    "check_onnx": "pm_dist.export.check_onnx",
    "VerificationSet.from_arrays": "pm_dist.eval.VerificationSet.from_arrays",
    "DataConfig.from_dict": "pm_dist.data.DataConfig.from_dict",
    "SyntheticIdentities": "pm_dist.data.synthetic.SyntheticIdentities",
    "verification_pairs": "pm_dist.data.synthetic.SyntheticIdentities.verification_pairs",
    "identification_split": "pm_dist.data.synthetic.SyntheticIdentities.identification_split",
    "doppelganger_pairs": "pm_dist.data.synthetic.SyntheticIdentities.doppelganger_pairs",
    "PKSampler": "pm_dist.data.sampler.PKSampler",
    "global_batch": "pm_dist.data.sampler.PKSampler.global_batch",
    "local_batch": "pm_dist.data.sampler.PKSampler.local_batch",
    "set_proposer": "pm_dist.data.sampler.PKSampler.set_proposer",
    "build_train_loader": "pm_dist.data.build_train_loader",
    "classes": "pm_dist.data.sampler.PKSampler.classes",
    "PKBatch": "pm_dist.data.sampler.PKBatch",
    "counts": "pm_dist.data.datasets.ArrowDataset.counts",  # the index protocol (index.py)
    "sample_index": "pm_dist.data.datasets.ArrowDataset.sample_index",
    "count_array": "pm_dist.data.datasets.ArrowDataset.count_array",
}


def _resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_quoted_signatures_match_the_code():
    import ast
    import inspect

    seen = set()
    for f in FILES:
        for span in _spans(TEXT[f]):
            m = re.fullmatch(r"([\w.]+)\((.*)\)(?: -> .*)?", span)
            if not m or m.group(1) not in SIGNATURES:
                continue
            seen.add(m.group(1))
            params = [p for p in inspect.signature(_resolve(SIGNATURES[m.group(1)])).parameters.values()
                      if p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            shown = [a.strip() for a in m.group(2).split(",") if a.strip() not in ("", "*")]
            open_ended = shown and shown[-1] in ("...", "…")
            shown = [a for a in shown if a not in ("...", "…")]
            where = f"{f}: `{span}`"
            assert [a.split("=")[0] for a in shown] == [p.name for p in params[:len(shown)]], where
            left_out = [p.name for p in params[len(shown):] if p.default is p.empty]
            assert open_ended or not left_out, f"{where} leaves out required {left_out}"
            for a, p in zip(shown, params):
                if "=" in a:
                    assert ast.literal_eval(a.split("=", 1)[1]) == p.default, where
    assert seen == set(SIGNATURES)
