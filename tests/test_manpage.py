"""The generated man page and bash completion (libvirt_bpfcg.manpage / .completion): every
sub-command and option of the real parser appears, groff renders the page without a
warning, and the completion script is valid bash that completes what the parser accepts."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from typing import List

import pytest

from libvirt_bpfcg import completion, manpage
from libvirt_bpfcg.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_tools(*tools: str) -> None:
    """groff and man come from Debian packages: install them once if missing (never skip:
    a machine where these checks cannot run must fail, not pass)."""
    packages = {"groff": "groff-base", "man": "man-db", "bash": "bash"}
    missing = [packages[t] for t in tools if shutil.which(t) is None]
    if missing:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                        *missing], check=True, env=env, stdout=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


@pytest.fixture(scope="module")
def page(parser: argparse.ArgumentParser) -> str:
    return manpage.render(parser)


@pytest.fixture(scope="module")
def rendered(page: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The page as a reader sees it (plain text, no overstrike)."""
    ensure_tools("groff")
    path = tmp_path_factory.mktemp("man") / "libvirt-bpfcg.8"
    path.write_text(page)
    proc = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-P", "-cbou", str(path)],
                          capture_output=True, text=True, check=True,
                          env=dict(os.environ, LC_ALL="C.UTF-8"))
    assert proc.stderr == ""
    return proc.stdout


def commands(parser: argparse.ArgumentParser) -> List[str]:
    return [" ".join(path) for path, _sub, _help in manpage.iter_commands(parser)]


def test_parser_has_the_commands_this_test_relies_on(parser):
    assert {"allow", "revoke", "status", "plan"} <= set(commands(parser))


def test_every_subcommand_has_a_subsection_with_its_usage(parser, page, rendered):
    for name in commands(parser):
        assert f'.SS "{name.replace("-", chr(92) + "-")}"' in page
        assert f"libvirt-bpfcg {name} [-h]" in " ".join(rendered.split())


def test_every_option_of_every_command_is_documented(parser, rendered):
    flat = " ".join(rendered.split())
    subs = [parser] + [sub for _path, sub, _help in manpage.iter_commands(parser)]
    for sub in subs:
        for action in sub._actions:
            if action.help == argparse.SUPPRESS:
                continue
            for option in action.option_strings:
                assert option in flat, f"{sub.prog}: {option} missing from the man page"


def test_required_sections_are_there(rendered):
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "COMMANDS", "MODES",
                    "METADATA EXTRAS", "CONFIGURATION", "EXIT STATUS", "FILES", "SEE ALSO"):
        assert re.search(rf"^{section}$", rendered, re.M), section
    for path in ("/etc/libvirt/libvirt-bpfcg.conf", "/etc/libvirt/hooks/qemu.d/50-libvirt-bpfcg",
                 "/run/libvirt-bpfcg", "/sys/fs/bpf/libvirt-bpfcg"):
        assert path in rendered
    for mode in ("none", "own", "libvirt", "foreign"):
        assert re.search(rf"^ +{mode}\b", rendered, re.M), mode


def test_groff_and_man_give_no_warnings(page, tmp_path):
    ensure_tools("groff", "man")
    path = tmp_path / "libvirt-bpfcg.8"
    path.write_text(page)
    groff = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(path)],
                           capture_output=True, text=True)
    assert (groff.returncode, groff.stderr) == (0, "")
    # What lintian runs on a packaged page.
    man = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(path)],
                         capture_output=True, text=True,
                         env=dict(os.environ, LC_ALL="C.UTF-8", MANROFFSEQ="", MANWIDTH="80"))
    assert (man.returncode, man.stderr) == (0, "")


def test_text_that_looks_like_roff_requests_is_escaped():
    assert manpage.esc(".TH x\n'quote\nback\\slash") == "\\&.TH x\n\\&'quote\nback\\eslash"
    assert manpage.esc_opt("--json") == "\\-\\-json"


def test_page_is_reproducible(parser, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1764115200")
    first = manpage.render(parser)
    assert '"2025-11-26"' in first.splitlines()[2]
    assert manpage.render(build_parser()) == first


def test_module_entry_point_writes_the_page():
    proc = subprocess.run([sys.executable, "-m", "libvirt_bpfcg.manpage"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    assert proc.stdout.startswith('.\\" Generated by')
    assert ".SH COMMANDS" in proc.stdout


# --- bash completion ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def completion_file(parser, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("completion") / "libvirt-bpfcg.bash"
    path.write_text(completion.render(parser))
    return str(path)


def complete(completion_file: str, *words: str) -> List[str]:
    """COMPREPLY for the command line `words` (the last word is the one being completed),
    computed by the generated function in a real bash."""
    script = (f'source {completion_file}\n'
              'COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1))\n'
              '_libvirt_bpfcg\n'
              'printf "%s\\n" "${COMPREPLY[@]}"\n')
    proc = subprocess.run(["bash", "-c", script, "bash", "libvirt-bpfcg", *words],
                          capture_output=True, text=True, check=True,
                          env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
    assert proc.stderr == ""
    return [line for line in proc.stdout.splitlines() if line]


def test_completion_script_is_valid_bash(completion_file):
    proc = subprocess.run(["bash", "-n", completion_file], capture_output=True, text=True)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_completion_registers_for_the_command(completion_file):
    proc = subprocess.run(["bash", "-c", f"source {completion_file}; complete -p libvirt-bpfcg"],
                          capture_output=True, text=True, check=True)
    assert "-F _libvirt_bpfcg libvirt-bpfcg" in proc.stdout


def test_completes_subcommand_names(parser, completion_file):
    top = [path[0] for path in (p for p, _s, _h in manpage.iter_commands(parser)) if
           len(path) == 1]
    assert sorted(complete(completion_file, "")) == sorted(top)
    assert complete(completion_file, "pl") == ["plan"]
    assert complete(completion_file, "--debug", "st") == ["status"]


def test_completes_options_of_the_subcommand(parser, completion_file):
    assert complete(completion_file, "allow", "--do") == ["--domain"]
    assert complete(completion_file, "allow", "--state-dir", "/tmp", "--js") == ["--json"]
    plan_options = set(complete(completion_file, "plan", "--"))
    assert "--config" in plan_options and "--domain" not in plan_options
    assert set(complete(completion_file, "-")) >= {"--help", "--version", "--debug"}


def test_option_values_are_left_to_file_name_completion(completion_file):
    # Nothing offered: bash's own -o default completion (file names) takes over.
    assert complete(completion_file, "plan", "--config", "") == []
    assert complete(completion_file, "plan", "") == []
