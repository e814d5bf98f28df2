"""README's commands as a user types them, for the tests that run them.

Every command README shows (in its ```bash blocks and the first column of its tables) is run
by a test as a subprocess; tests/test_readme.py fails when one is not. A test takes its
command from here, `command(KEY)`, so it runs what README prints, and `typed(...)` makes the
substitutions a test machine needs: small data for the paths, the tiny model for the weights,
this environment's programs for `python`, `prefect`, `dask` and `torchrun` (as after
`. .venv/bin/activate`).

A command's KEY is its program (with `-m MODULE`, or the sub-command of prefect, dask and
make) and its flags, sorted, with `...` when README elides arguments:
`python -m flows.extract_clip --dask-address --dask-resources --dataset --model ...`; a
second command with the same key is `KEY #2`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BIN = Path(sys.executable).parent
PROGRAMS = ("python", "torchrun", "prefect", "dask", "make")
"""Commands of these programs are tracked; `export`, `pip`, `.` (activate) and the like are not."""
SUBCOMMANDS = {"prefect": 2, "dask": 1, "make": 1}
"""Words after the program that name what it does (`prefect deployment run`, `dask worker`)."""


@dataclass(frozen=True)
class Command:
    """One README command: its text (continuation lines joined, comment dropped), its words as
    the shell splits them, and the README line it starts on."""

    text: str
    words: tuple[str, ...]
    line: int
    occurrence: int = 1
    """1 for the first README command of its key, 2 for the second, ... (key `... #2`)."""

    @property
    def key(self) -> str:
        words = [word.strip("[]") for word in self.words]
        head = words[:1 + SUBCOMMANDS.get(words[0], 0)]
        if "-m" in words:
            head += ["-m", words[words.index("-m") + 1]]
        flags = sorted({word.split("=", 1)[0] for word in words if word.startswith("--")})
        if words[0] == "make":  # variables, as make takes them
            flags = sorted({word.split("=", 1)[0] for word in words[2:] if "=" in word})
        key = " ".join(head + flags + (["..."] if "..." in words else []))
        return key if self.occurrence == 1 else f"{key} #{self.occurrence}"


def commands(readme: Path = README) -> list[Command]:
    """Every tracked command of README, in order."""
    found: list[Command] = []
    lines = readme.read_text().splitlines()
    in_block, pending, start = False, "", 0
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            in_block = line.strip() in ("```bash", "```sh", "```shell") if not in_block else False
            continue
        if in_block:
            if not pending:
                start = number
            pending += line.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            found += _parse(pending, start)
            pending = ""
        elif line.startswith("|"):
            first_cell = line.split("|")[1]
            for span in re.findall(r"`([^`]+)`", first_cell):
                found += _parse(span, number)
    seen: dict[str, int] = {}
    for index, one in enumerate(found):  # the same key again (same flags): `KEY #2`, ...
        seen[one.key] = seen.get(one.key, 0) + 1
        found[index] = dataclasses.replace(one, occurrence=seen[one.key])
    return found


def _parse(text: str, line: int) -> list[Command]:
    words = shlex.split(text, comments=True)
    if not words or words[0] not in PROGRAMS:
        return []
    return [Command(" ".join(shlex.quote(word) for word in words), tuple(words), line)]


def command(key: str) -> Command:
    """The README command whose key is `key` (the test fails when README no longer has it)."""
    matches = [found for found in commands() if found.key == key]
    assert matches, f"README shows no command {key!r} any more: update the test that ran it"
    return matches[0]


def typed(found: Command, replace: Mapping[str, str | Sequence[str]] | None = None,
          drop: Sequence[str] = (), append: Sequence[str] = ()) -> list[str]:
    """The argv a user types for `found`, with the test machine's substitutions.

    replace: `--flag` -> its value(s) in place of README's (every value up to the next flag);
    `--flag name` -> the value of a `--flag name=value` (prefect's --param);
    any other word (a placeholder such as OUT, or `...`) -> the word(s) in its place.
    drop: flags to leave out with their values (an optional part, e.g. `--device` without a GPU).
    append: words added at the end (what a test needs beyond README's, e.g. `--epochs 1`).
    The brackets of optional parts go; programs resolve to this environment's.
    """
    replace = dict(replace or {})
    words = [word.strip("[]") if word.startswith("[") or word.endswith("]") else word
             for word in found.words]
    argv: list[str] = []
    index = 0
    while index < len(words):
        word = words[index]
        values_end = index + 1
        while values_end < len(words) and not words[values_end].startswith("-"):
            values_end += 1
        if word in drop:
            index = values_end
            continue
        named = f"{word} {words[index + 1].split('=', 1)[0]}" if index + 1 < len(words) else ""
        if named in replace:
            argv += [word, f"{words[index + 1].split('=', 1)[0]}={replace.pop(named)}"]
            index += 2
        elif word.startswith("--") and word in replace:
            value = replace.pop(word)
            argv += [word, *([value] if isinstance(value, str) else value)]
            index = values_end
        elif word in replace:
            value = replace.pop(word)
            argv += [value] if isinstance(value, str) else list(value)
            index += 1
        else:
            argv.append(word)
            index += 1
    assert not replace, f"{found.text!r} has no {sorted(replace)} to replace"
    program = argv[0]
    argv[0] = sys.executable if program == "python" else str(BIN / program)
    if program == "make":
        argv[0] = "make"
    return argv + list(append)


def user_env(prefect_home: Path, **extra: str) -> dict[str, str]:
    """The environment of a user's shell after `. .venv/bin/activate`: this environment's
    programs first on PATH, Prefect's ephemeral API (no PREFECT_API_URL) keeping its database
    in `prefect_home`, no telemetry, no weights downloads; plus a marker variable that every
    process started from it inherits (see `leftover_processes`) and `extra`."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "HF_HUB_OFFLINE": "1",
           "README_TEST_MARKER": uuid.uuid4().hex, **extra}
    env.pop("PREFECT_API_URL", None)
    return env


def run(argv: Sequence[str], env: Mapping[str, str], cwd: Path = REPO,
        timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command to its end; stdout and stderr as text."""
    return subprocess.run(list(argv), cwd=cwd, env=dict(env), capture_output=True, text=True,
                          timeout=timeout)


def output(result: subprocess.CompletedProcess) -> str:
    """What the user saw (stdout then stderr), for assertion messages and checks."""
    return result.stdout + result.stderr


def leftover_processes(env: Mapping[str, str]) -> list[str]:
    """Processes still running that were started from `env` (they carry its marker), as
    "pid: command line": what a command left behind after it ended."""
    import psutil

    marker = f"README_TEST_MARKER={env['README_TEST_MARKER']}"
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if process.pid != os.getpid() and marker in _environ(process.pid):
                found.append(f"{process.pid}: {' '.join(process.info['cmdline'] or [])}")
        except (psutil.Error, OSError):
            continue
    return found


def _environ(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")


def with_new_marker(env: Mapping[str, str], **extra: str) -> dict[str, str]:
    """`env` (same Prefect home) with a marker of its own, so that `leftover_processes` sees
    only what a command started from it left behind; plus `extra`."""
    return {**env, "README_TEST_MARKER": uuid.uuid4().hex, **extra}


def wait_for_no_leftovers(env: Mapping[str, str], seconds: float = 30) -> list[str]:
    """`leftover_processes(env)` once it is empty, or what is still there after `seconds`
    (processes that are shutting down get that long to go)."""
    import time

    deadline = time.monotonic() + seconds
    while (left := leftover_processes(env)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left
