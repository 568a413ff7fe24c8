"""README.md tells the truth: its output blocks are what scripts/update_readme.py got by
running the commands shown, and they still agree with the engine (re-run the script when
a change moves an output); it points at nothing outside the repository."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from lanner import LLM, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
_spec = importlib.util.spec_from_file_location("update_readme", ROOT / "scripts/update_readme.py")
update_readme = importlib.util.module_from_spec(_spec)  # what the README shows being run
_spec.loader.exec_module(update_readme)  # type: ignore[union-attr]


def block(name: str) -> list[str]:
    """The lines of generated block ``name``, without its fence."""
    match = re.search(rf"<!-- generated: {name} -->\n```\w*\n(.*?)```\n<!-- end generated -->",
                      README, re.DOTALL)  # fmt: skip
    assert match, f"README.md lost its generated block {name!r}"
    return match.group(1).rstrip("\n").split("\n")


@pytest.fixture(scope="module")
def llm() -> LLM:
    llm = LLM(max_model_len=512)  # the demo model, every other option at its default
    if llm.engine.core.loaded.dtype != torch.float32:
        pytest.skip("README's outputs come from a CPU that runs the demo model in float32")
    return llm


def greedy_text(llm: LLM, prompt: str, max_tokens: int) -> str:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    return llm.generate(prompt, params)[0].outputs[0].text


def test_nothing_outside_the_repository() -> None:
    assert "../" not in README
    for link in re.findall(r"\]\(([^)#]+)\)", README):
        if not link.startswith("http"):
            assert (ROOT / link).exists(), link


def test_run_demo_output(llm: LLM) -> None:
    *text, summary = block("demo")
    prompt = "def fibonacci(n):"
    assert "\n".join(text) == (prompt + greedy_text(llm, prompt, 128)).rstrip()
    assert re.fullmatch(r"--- \d+ prompt \+ 128 output tokens \(length\) \| TTFT .*", summary)


def test_offline_sampled_example(llm: LLM) -> None:
    outputs = llm.generate(
        update_readme.OFFLINE_PROMPTS, SamplingParams(**update_readme.OFFLINE_PARAMS)
    )
    expected = [f"{o.outputs[0].text!r} {o.outputs[0].finish_reason}" for o in outputs]
    assert block("offline") == expected


def test_served_outputs_are_the_offline_engines(llm: LLM) -> None:
    """The server's greedy outputs equal the offline LLM's (tests/entrypoints check that
    on a tiny model), so the README's can be checked without starting one."""
    completion_line, *chat_lines = block("serve")
    completion = update_readme.SERVE_COMPLETION
    text, reason = completion_line.rsplit(" ", 1)
    assert ast.literal_eval(text) == greedy_text(llm, completion["prompt"], 32)
    assert reason == "length"
    chat = update_readme.SERVE_CHAT
    reply = llm.chat(chat["messages"], SamplingParams(temperature=0, max_tokens=40))
    assert "\n".join(chat_lines) == reply[0].outputs[0].text.rstrip()
    replies = [json.loads(line) for line in block("curl") if line.startswith("{")]
    curl = update_readme.CURL_COMPLETION
    assert replies[0]["choices"][0]["text"] == greedy_text(llm, curl["prompt"], 16)
    assert replies[1]["error"]["param"] == "top_p"


def test_the_test_commands_duration_is_stated() -> None:
    match = re.search(r"<!-- generated: tests -->\n(.*?)<!-- end generated -->", README,
                      re.DOTALL)  # fmt: skip
    assert match and re.search(r"took \d+(\.\d+)? min", match.group(1))


def readme_commands(program: str) -> list[list[str]]:
    """Every ``program ...`` line of the README's bash blocks (continuations joined,
    comments dropped), split as the shell would."""
    commands = []
    for body in re.findall(r"```bash\n(.*?)```", README, re.DOTALL):
        for line in body.replace("\\\n", " ").splitlines():
            words: list[str] = []
            for word in [*shlex.split(line, comments=True), "&"]:
                if word not in _SHELL_SEPARATORS:
                    words.append(word)
                    continue
                if words and words[0] == program:  # one command of a `a & b` line
                    commands.append(words[1:])
                words = []
    return commands


_SHELL_SEPARATORS = {"&", "&&", ";", "|", "||"}
# Code spans that show another program's command line: its flags are not lanner's.
_OTHER_PROGRAMS = ("ray ", "pip ", "curl ", "vllm ")


def test_every_cli_command_shown_parses() -> None:
    """What the README tells a newcomer to type is accepted by today's parser: every
    subcommand and flag exists and takes the value shown."""
    from lanner.entrypoints.cli import build_parser

    commands = readme_commands("lanner")
    assert len(commands) >= 8, commands
    for words in commands:
        try:
            build_parser().parse_args(words)
        except SystemExit as exit_:
            raise AssertionError(f"README shows `lanner {shlex.join(words)}`: rejected") from exit_


def test_every_flag_named_exists() -> None:
    """Flags the README names in its prose (`--flag`) are options of some command."""
    from lanner.entrypoints.cli import build_parser

    known: set[str] = set()
    parsers = [build_parser()]
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            known.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    named = set()  # in code spans and bash lines, except a script's own (python ... x.py --flag)
    for span in re.findall(r"`([^`\n]+)`", README) + [
        shlex.join(w) for w in readme_commands("lanner")
    ]:
        if not re.search(r"\.(py|sh)\b|python", span) and not span.startswith(_OTHER_PROGRAMS):
            named.update(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", span))
    script_lines = [line for line in README.splitlines() if re.search(r"\.(py|sh)\b", line)]
    of_scripts = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", "\n".join(script_lines)))
    missing = sorted(named - known - of_scripts)
    assert not missing, f"README names flags no lanner command has: {missing}"


def test_every_script_shown_exists() -> None:
    shown = r"(?<![\w/.~-])((?:scripts|benchmarks|lanner|tests|docs)/[\w/.-]+\.(?:py|sh|json|md))"
    for path in set(re.findall(shown, README)):
        assert (ROOT / path).exists(), f"README names {path}, which is not in the repository"
