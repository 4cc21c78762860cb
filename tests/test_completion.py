"""`dengine completion bash`: the generated script completes commands, options and option values
in a real bash."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = subprocess.run(
        [sys.executable, "-m", "dengine", "completion", "bash"], capture_output=True, text=True, check=True
    )
    path = tmp_path_factory.mktemp("completion") / "dengine.bash"
    path.write_text(out.stdout)
    return path


def complete(script: Path, line: str) -> list[str]:
    """What bash offers for ``line`` (a trailing space means a new, empty word)."""
    words = shlex.split(line) + ([""] if line.endswith(" ") else [])
    program = (
        f"source {shlex.quote(str(script))}\n"
        f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})\n"
        f"COMP_CWORD={len(words) - 1}\n"
        '_dengine\nprintf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    out = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True)
    return [w for w in out.stdout.splitlines() if w]


def test_commands_and_subcommands(script: Path) -> None:
    assert complete(script, "dengine k") == ["kv"]
    top = complete(script, "dengine ")
    assert {"demo", "serve", "cluster", "kv", "status", "member", "snapshot", "completion"} <= set(top)
    assert not any(w.startswith("_") for w in top), "internal commands stay hidden"
    assert set(complete(script, "dengine kv ")) >= {"put", "get", "delete", "cas", "range", "watch"}
    assert complete(script, "dengine member pro") == ["promote"]
    assert complete(script, "dengine snapshot ") == ["-h", "--help", "create"]


def test_options_follow_the_command_path_past_positional_values(script: Path) -> None:
    assert complete(script, "dengine kv get mykey --con") == ["--consistency"]
    assert complete(script, "dengine member promote 4 --f") == ["--force"]
    assert "--join" in complete(script, "dengine serve --")


def test_option_values(script: Path) -> None:
    assert complete(script, "dengine kv get k --consistency l") == ["linearizable", "lease"]
    assert complete(script, "dengine serve --log-format ") == ["text", "json"]
    assert complete(script, "dengine cluster --nodes ") == ["1", "3", "5", "7"]
    # A free-form value (a file here) offers no words, so bash falls back to file names.
    assert complete(script, "dengine serve --config ") == []


def test_an_unknown_shell_is_a_usage_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dengine", "completion", "tcsh"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 2 and "invalid choice" in out.stderr
