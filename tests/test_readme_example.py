"""The README's worked example of the catalogue, run as it is written: its `creditline
serve` lines as servers (on a free port, their data in a directory of the test's), every
other line as a CLI command against the one serving; what the README says of the
accounts it shows is checked here."""

from __future__ import annotations

import contextlib
import json
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from creditline.store.redis_process import free_port

from tests.processes import serve, stop, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
MARKER = "A worked example on the example catalogue"
GROUPS_MARKER = "### Shared balances"


def readme_example(marker: str = MARKER) -> list[list[str]]:
    """The commands of the README's example after `marker`, each as its words."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text[text.index(marker):].split("```sh\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines()
            if line.strip() and not line.startswith("#")]


def _serve(words: list[str], port: int, data: Path) -> subprocess.Popen[str]:
    assert words[:2] == ["creditline", "serve"], words
    flags = words[2:]
    flags[flags.index("--embedded-redis-dir") + 1] = str(data)
    flags[flags.index("--plan-path") + 1] = str(ROOT / flags[flags.index("--plan-path") + 1])
    process = serve(*flags, "--listen-address", f"127.0.0.1:{port}")
    wait_for_port(port, process)
    return process


def run_cli(words: list[str], port: int) -> dict[str, Any]:
    assert words[0] == "creditline", words
    finished = subprocess.run(
        [sys.executable, "-m", "creditline", words[1], "--server", f"127.0.0.1:{port}",
         *words[2:]], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)
    assert finished.returncode == 0, (words, finished.stderr)
    result: dict[str, Any] = json.loads(finished.stdout)
    return result


def _bucket(account: dict[str, Any], bucket_id: str) -> dict[str, Any] | None:
    return next((b for b in account.get("buckets", []) if b["bucket_id"] == bucket_id), None)


def test_the_readme_worked_example_does_what_the_readme_says(tmp_path: Path) -> None:
    shown: list[dict[str, Any]] = []
    process = None
    port = free_port()
    try:
        for words in readme_example():
            if words[1] == "serve":
                if process is not None:
                    stop(process)
                process = _serve(words, port, tmp_path / "trial")
                continue
            answer = run_cli(words, port)
            if words[1:3] == ["account", "show"]:
                shown.append(answer)
            elif words[1] == "plans":
                assert len(answer["plans"]) == 3 and len(answer["offers"]) == 4
    finally:
        if process is not None:
            stop(process)
    first, week_later = shown
    assert (first["plan_id"], first["balance_micros"], first["charged_micros"],
            first["purchased_micros"], first["fees_micros"]) == (
        "premium", "6906000", "94000", "2000000", "1000000")
    add_on, sms = _bucket(first, "bob-1.1"), _bucket(first, "sms-week#1")
    assert add_on is not None and add_on["remaining_units"] == "1072693248"
    assert sms is not None and sms["remaining_units"] == "200"
    assert [(s["offer_id"], s["state"], s["periods"]) for s in first["subscriptions"]] == [
        ("sms-week", "active", 1)]
    assert (week_later["balance_micros"], week_later["fees_micros"]) == ("5906000", "2000000")
    assert [s["periods"] for s in week_later["subscriptions"]] == [2]
    assert _bucket(week_later, "bob-1.1") is None
    sms = _bucket(week_later, "sms-week#1")
    assert sms is not None and sms["remaining_units"] == "200"


@contextlib.contextmanager
def cli_server(data: Path) -> Iterator[int]:
    """`creditline serve` with its defaults on a free port, its embedded Redis's data in
    `data`: the port, while it serves."""
    port = free_port()
    process = serve("--embedded-redis-dir", str(data), "--listen-address", f"127.0.0.1:{port}")
    try:
        wait_for_port(port, process)
        yield port
    finally:
        stop(process)


def test_the_readme_shared_balance_example_does_what_the_readme_says(tmp_path: Path) -> None:
    with cli_server(tmp_path / "trial") as port:
        answers = [(words, run_cli(words, port)) for words in readme_example(GROUPS_MARKER)]
    initial = next(answer for words, answer in answers if words[1] == "initial")
    assert initial["rating_groups"][0]["granted"]["time_s"] == "190"
    alice, family = (answer for words, answer in answers if words[1:3] == ["account", "show"])
    assert (alice["group_id"], alice["balance_micros"], alice["member_spent_micros"],
            alice["member_limit_micros"], alice["available_micros"]) == (
        "family", "28000000", "2000000", "3000000", "1000000")
    assert (family["member_ids"], family["charged_micros"]) == (
        ["family/alice", "family/bob"], "2000000")
