"""The command line with bad input: one line on stderr and exit status 2, before anything
starts; never a traceback. Every case runs the real command in a subprocess."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

import shardline as sl
from shardline.cli import build_parser
from shardline.transport import KeyPair


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardline.cli", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=None if env is None else {**os.environ, **env})


def assert_one_line_error(out: subprocess.CompletedProcess[str], *words: str) -> None:
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


# -- keys ------------------------------------------------------------------------------

def test_keys_generate_refuses_to_replace_a_keypair_without_force(tmp_path: Path) -> None:
    out = cli("keys", "generate", str(tmp_path / "k"))
    assert out.returncode == 0, out.stderr
    first = KeyPair.load(tmp_path / "k")
    assert_one_line_error(cli("keys", "generate", str(tmp_path / "k")), "--force",
                          "already holds a keypair")
    assert KeyPair.load(tmp_path / "k") == first          # untouched
    out = cli("keys", "generate", str(tmp_path / "k"), "--force")
    assert out.returncode == 0, out.stderr
    second = KeyPair.load(tmp_path / "k")
    assert second.public != first.public and second.public.decode() in out.stdout


def test_keypair_write_keeps_an_existing_one(tmp_path: Path) -> None:
    pair = KeyPair.write(tmp_path)
    with pytest.raises(FileExistsError):
        KeyPair.write(tmp_path)
    assert KeyPair.load(tmp_path) == pair
    assert KeyPair.write(tmp_path, overwrite=True) != pair


@pytest.mark.parametrize("where", ["/proc/forbidden", "FILE/sub"])
def test_keys_generate_where_it_cannot_write(where: str, tmp_path: Path) -> None:
    if where.startswith("FILE"):
        (tmp_path / "file").write_text("not a directory")
        where = str(tmp_path / "file" / "sub")
    assert_one_line_error(cli("keys", "generate", where), "cannot write a keypair", where)


# -- node ------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "words"), [
    (["--metrics-port", "99999"], ["--metrics-port", "99999", "65535"]),
    (["--metrics-port", "http"], ["--metrics-port", "'http'"]),
    (["--log-level", "bogus"], ["--log-level", "'bogus'", "warning"]),
    (["--allow", "not a module!"], ["--allow", "'not a module!'", "module name"]),
    (["--allow", "myapp..actors"], ["--allow", "module name"]),
    (["--allow", "myapp.class"], ["--allow", "module name"]),  # a keyword
    (["--peer-timeout", "0"], ["--peer-timeout", "above 0"]),
    (["--peer-timeout", "nan"], ["--peer-timeout"]),
    (["--max-frames", "0"], ["--max-frames", "1 or more"]),
    (["--max-frame-size", "-1"], ["--max-frame-size"]),
    (["--max-header-size", "1k"], ["--max-header-size", "not an integer"]),
    (["--listen", "tcp://127.0.0.1:notaport"], ["port"]),
    (["--allow-keys", "KEYFILE"], ["--allow-keys needs --keys", "plaintext"]),
    (["--server-key", "KEYFILE"], ["--server-key", "--join"]),
    (["--rank", "2"], ["--rank", "--join"]),
    (["--join", "tcp://127.0.0.1:1", "--rank", "0"], ["--rank", "1 or more"]),
    (["--join", "tcp://127.0.0.1:1", "--join-timeout", "-5"], ["--join-timeout"]),
    (["--join", "driver:5555"], ["tcp://"]),
    (["--join", "tcp://127.0.0.1:1", "--server-key", "not-a-key"], ["not-a-key"]),
    (["--keys", "NOKEYS"], ["no CURVE key", "shardline keys generate"]),
    (["--bogus"], ["--bogus"]),
])
def test_node_bad_values(args: list[str], words: list[str], tmp_path: Path) -> None:
    key = KeyPair.write(tmp_path / "k")
    args = [a.replace("KEYFILE", str(tmp_path / "k" / "node.key"))
            .replace("NOKEYS", str(tmp_path / "none")) for a in args]
    assert key.public
    assert_one_line_error(cli("node", *args), *words)


def test_node_bad_log_level_in_the_environment() -> None:
    assert_one_line_error(cli("node", env={"SHARDLINE_LOG": "loud"}), "$SHARDLINE_LOG",
                          "'loud'")


def test_node_metrics_port_in_use_names_the_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = cli("node", "--metrics-port", str(port))
    assert_one_line_error(out, f"cannot serve metrics on port {port}")
    assert "ExceptionGroup" not in out.stderr


def test_node_with_keys_but_no_allow_keys_warns_and_serves(tmp_path: Path) -> None:
    KeyPair.write(tmp_path / "k")
    proc = subprocess.Popen([sys.executable, "-m", "shardline.cli", "node", "--keys",
                             str(tmp_path / "k")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().startswith("shardline node tcp://127.0.0.1:")
        warning = proc.stderr.readline()
        assert "warning: --keys without --allow-keys" in warning
        assert str(tmp_path / "k") in warning
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _shardline_without_cwd_on_path() -> list[str]:
    """The command as a user's shell runs it: the console script, whose sys.path[0] is
    its own directory, not the working directory (``python -m`` would add that)."""
    script = Path(sys.executable).with_name("shardline")
    if script.is_file():
        return [str(script)]
    if sys.version_info < (3, 11):
        pytest.skip("no console script and no python -P to run without the cwd on sys.path")
    return [sys.executable, "-P", "-m", "shardline.cli"]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_node_imports_allowed_modules_from_the_working_directory(
        tmp_path: Path, anyio_backend: str) -> None:
    """The README's ``shardline node --allow myapp.actors``, run beside ``myapp/``."""
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "actors.py").write_text(
        "import shardline as sl\n\n"
        "class Counter(sl.Actor):\n"
        "    def __init__(self, start: int = 0) -> None:\n"
        "        self.value = start\n\n"
        "    async def incr(self, by: int = 1) -> int:\n"
        "        self.value += by\n"
        "        return self.value\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen([*_shardline_without_cwd_on_path(), "node", "--allow",
                             "myapp.actors"], stdout=subprocess.PIPE, text=True,
                            cwd=tmp_path, env=env)
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().split()[2]
        async with sl.Node() as node:
            with anyio.fail_after(30):
                c = await (await node.connect(address)).spawn("myapp.actors:Counter", 5)
                assert await c.incr(2) == 7
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        if proc.stdout is not None:
            proc.stdout.close()


# -- run -------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "words"), [
    (["--timeout", "0", "x.py"], ["--timeout", "above 0"]),
    (["--restarts", "-1", "x.py"], ["--restarts", "0 or more"]),
    (["--peer-timeout", "soon", "x.py"], ["--peer-timeout", "'soon'"]),
    (["--allow", "my app", "x.py"], ["--allow", "module name"]),
    (["--keys", "k", "--insecure", "x.py"], ["--insecure", "not allowed with"]),
    ([], ["script"]),
])
def test_run_bad_values(args: list[str], words: list[str]) -> None:
    assert_one_line_error(cli("run", *args), *words)


def test_run_without_a_launcher_says_what_to_set(tmp_path: Path) -> None:
    env = {k: "" for k in ("SHARDLINE_RANK", "SHARDLINE_WORLD_SIZE", "SHARDLINE_HEAD",
                           "RANK", "WORLD_SIZE", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")}
    clean = {k: v for k, v in os.environ.items() if k not in env}
    out = subprocess.run([sys.executable, "-m", "shardline.cli", "run", "x.py"],
                         capture_output=True, text=True, timeout=60, env=clean, cwd=tmp_path)
    assert_one_line_error(out, "SHARDLINE_RANK")


def test_run_a_script_that_is_not_there(tmp_path: Path) -> None:
    out = cli("run", "nothere.py", cwd=tmp_path, env={
        "SHARDLINE_RANK": "0", "SHARDLINE_WORLD_SIZE": "1",
        "SHARDLINE_HEAD": "127.0.0.1:1"})
    assert_one_line_error(out, "no script at nothere.py")


# -- demo ------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "words"), [
    (["--seconds", "-1"], ["--seconds", "above 0"]),
    (["--seconds", "0"], ["--seconds", "above 0"]),
    (["--seconds", "inf"], ["--seconds"]),
    (["--steps", "0"], ["--steps", "1 or more"]),
    (["--stages", "9"], ["--stages 9", "6 layers", "--stages 6 or fewer"]),
    (["--stages", "4", "--schedule", "zbv"], ["8 pipeline stages", "--stages 3 or fewer"]),
    (["--schedule", "bogus"], ["--schedule bogus", "1f1b", "dualpipev"]),
    (["--schedule", "interleaved-1f1b", "--stages", "3"], ["divisible"]),
    (["--schedule", "dualpipev", "--microbatches", "2"], ["DualPipeV"]),
    (["--microbatches", "8", "--batch", "4"], ["--batch 4", "8 microbatches"]),
    (["--replicas", "2", "--batch", "6"], ["--batch 6", "2 replica"]),
    (["--workers", "-1"], ["--workers", "0 or more"]),
    (["--stages", "0"], ["--stages", "1 or more"]),
    (["--out", "/proc/nowhere"], ["--out /proc/nowhere"]),
])
def test_demo_refuses_bad_values_before_starting_anything(args: list[str],
                                                          words: list[str]) -> None:
    out = cli("demo", *args)
    assert_one_line_error(out, *words)
    assert out.stdout == ""   # the banner comes only once everything is checked


# -- serve's log level goes through the same main -------------------------------------

def test_serve_bad_log_level() -> None:
    assert_one_line_error(cli("serve", "--log-level", "bogus"), "--log-level", "'bogus'")


# -- help ------------------------------------------------------------------------------

def _subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


@pytest.mark.parametrize("path", [("node",), ("demo",), ("run",), ("keys", "generate")])
def test_every_option_says_what_it_means_and_its_default(path: tuple[str, ...]) -> None:
    parser = _subparser(build_parser(), *path)
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and len(action.help) > 15, f"{name} has no help"
        if action.option_strings and not isinstance(action, argparse._StoreTrueAction):
            assert "default" in action.help, f"{name}'s help does not give its default"
    out = cli(*path, "--help")
    assert out.returncode == 0 and "default" in out.stdout
